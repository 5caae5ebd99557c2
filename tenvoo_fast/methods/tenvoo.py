"""TenVOO-L and TenVOO-Q (adapters.md §3): the network of a Conv3d weight's update, its layer,
and the methods ``tenvoo-l`` / ``tenvoo-q`` (TenVOO on Conv3d targets, QuanTA on Linear ones,
as the paper fine-tunes the DDPM)."""
from __future__ import annotations

from typing import Optional, Sequence

from torch import nn

from ..contraction import program
from ..contraction.network import Core, TensorNetwork
from ..contraction.prereduce import plan
from ..errors import AdapterError
from ..nn.conv3d import AdaptedConv3d
from . import quanta
from .channels import factors_for, resolve_factors
from .common import apply_init_mode, check_rank, uniform_fan_in
from .registry import Method, register

#: Core letters, in checkpoint order; the spec's strings, verbatim.
TENVOO_EQUATIONS = {
    "L": "bade,cefg,xghi,yijk,zklm,Cmno,BopA,fdqh,lrpn,jqr->abcxyzABC",
    "Q": "bade,cefg,xghi,yijk,zjlm,Cmop,BpqA,oqrs,dftr,hlst->abcxyzABC",
}
#: The same network with its output in the conv weight's layout [Cout, Cin, kD, kH, kW], which
#: equals the spec's ``T.reshape(Cin, kD, kH, kW, Cout).permute(4, 0, 1, 2, 3)``.
TENVOO_WEIGHT_OUTPUT = "ABCabcxyz"

#: Contraction trees (node-id pairs: 0-9 the cores, 10.. the results in order) that cost the
#: torch path fewer operator calls than opt_einsum's trees on the paper DDPM's convs (r=4):
#: found by ``python benchmarks/search_trees.py L --trials 1600`` (seed 0) and ``... Q --trials
#: 4000 --seed 1``. The planner compares
#: them with opt_einsum's for every layer (:func:`~tenvoo_fast.contraction.program.declare_trees`).
TENVOO_TREES = {
    "L": (((4, 5), (8, 10), (3, 9), (0, 7), (1, 13), (2, 14), (6, 11), (12, 15), (16, 17)),
          ((1, 2), (3, 9), (6, 8), (5, 12), (7, 10), (4, 13), (11, 15), (0, 14), (16, 17))),
    "Q": (((4, 5), (7, 9), (2, 11), (1, 8), (0, 13), (12, 14), (3, 10), (15, 16), (6, 17)),
          ((4, 5), (7, 10), (1, 2), (8, 12), (3, 11), (9, 14), (13, 15), (6, 16), (0, 17)),
          ((6, 7), (5, 10), (1, 2), (4, 11), (9, 13), (8, 14), (12, 15), (0, 16), (3, 17))),
}


def tenvoo(variant: str, in_factors: Sequence[int], out_factors: Sequence[int],
           kernel_size: Sequence[int], rank: int, *, init: str = "frozen-copy",
           layer: str = "TenVOO") -> TensorNetwork:
    """TenVOO-L or TenVOO-Q for a Conv3d weight ``[o1*o2*o3, i1*i2*i3, kD, kH, kW]``."""
    variant = str(variant).upper()
    if variant not in TENVOO_EQUATIONS:
        raise AdapterError(f"{layer}: unknown TenVOO variant {variant!r}; use 'L' or 'Q'")
    r = check_rank(rank, layer)
    i1, i2, i3 = in_factors
    o1, o2, o3 = out_factors
    kD, kH, kW = kernel_size
    if variant == "L":
        shapes = [(i2, i1, r, r), (i3, r, r, r), (kD, r, r, r), (kH, r, r, r), (kW, r, r, r),
                  (o3, r, r, r), (o2, r, r, o1), (r, r, r, r), (r, r, r, r), (r, r, r)]
    else:
        shapes = [(i2, i1, r, r), (i3, r, r, r), (kD, r, r, r), (kH, 1, r, r), (kW, r, r, r),
                  (o3, r, r, r), (o2, r, r, o1), (r, r, r, r), (r, r, r, r), (r, r, r, r)]
    letters = TENVOO_EQUATIONS[variant].split("->")[0].split(",")
    # fan_in: product of the last two dims of 4-D cores, 2r for the 3-D core 9 of L.
    fans = [s[-2] * s[-1] if len(s) == 4 else 2 * r for s in shapes]
    inits = [uniform_fan_in(f, 6.0) for f in fans]
    inits = apply_init_mode(inits, init, layer)
    cores = tuple(Core(tuple(s), idx, it) for s, idx, it in zip(shapes, letters, inits))
    cin, cout = i1 * i2 * i3, o1 * o2 * o3
    return TensorNetwork(
        method=f"tenvoo-{variant.lower()}", cores=cores, output=TENVOO_WEIGHT_OUTPUT,
        weight_shape=(cout, cin, kD, kH, kW),
        meta=dict(variant=variant, rank=r, in_factors=(i1, i2, i3), out_factors=(o1, o2, o3),
                  kernel_size=(kD, kH, kW), init=init))


def _declare_trees() -> None:
    """Declare :data:`TENVOO_TREES` for the equations the programs see (pre-reduced: TenVOO-Q's
    size-1 axis sums cores 2 and 3 first), which do not depend on the channel counts."""
    for variant, trees in TENVOO_TREES.items():
        net = tenvoo(variant, (2, 2, 2), (2, 2, 2), (3, 3, 3), 2)
        program.declare_trees(plan(net.equation, net.contraction_shapes).equation, trees)


_declare_trees()

class TenVOOConv3d(AdaptedConv3d):
    """Conv3d adapted with TenVOO-L or TenVOO-Q: ``y = conv3d(x, W - T(θ0) + T(θ)) + b``.

    ``.cores`` holds the ten cores in the spec's (checkpoint) order.
    """
    strategies = ("merged", "factorized", "implicit-gemm")

    @classmethod
    def from_conv(cls, conv: nn.Conv3d, rank: int, variant: str = "L",
                  factors: Optional[Sequence[Sequence[int]]] = None, init: str = "frozen-copy",
                  name: Optional[str] = None) -> "TenVOOConv3d":
        """Wrap ``conv``; ``factors=((i1, i2, i3), (o1, o2, o3))`` overrides the table."""
        def network(name):
            fin, fout = resolve_factors(factors, conv.in_channels, conv.out_channels, layer=name)
            return tenvoo(variant, fin, fout, conv.kernel_size, rank, init=init, layer=name)
        return cls._adapt(conv, name, network, frozen_copy=(init == "frozen-copy"))


def _conv_builder(variant: str):
    def build(conv, config, name):
        f = factors_for(config.factors, name, conv.in_channels, conv.out_channels)
        return TenVOOConv3d.from_conv(conv, config.rank, variant=variant, factors=f,
                                      init=config.init, name=name)
    return build


for _variant in TENVOO_EQUATIONS:
    register(Method(f"tenvoo-{_variant.lower()}", _conv_builder(_variant), quanta.build_linear,
                    f"TenVOO-{_variant} on Conv3d layers, QuanTA on Linear layers"))
