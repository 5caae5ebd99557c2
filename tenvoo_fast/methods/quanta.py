"""QuanTA (adapters.md §4): the network of a Linear weight's update and its layer. The
``tenvoo-l``/``tenvoo-q`` methods use it for their Linear targets (:mod:`.tenvoo`)."""
from __future__ import annotations

from typing import Optional, Sequence

from torch import nn

from ..contraction.network import Core, TensorNetwork
from ..nn.linear import AdaptedLinear
from .channels import factors_for, resolve_factors
from .common import apply_init_mode, check_rank, uniform_fan_in

#: Gates for axis pairs (-1,-2), (-1,-3), (-2,-3), contracted to the full matrix [out, in].
QUANTA_WEIGHT_EQUATION = "efbc,diaf,ghde->ghiabc"
#: The same gates applied to activations x viewed as (..., n1, n2, n3).
QUANTA_ACTIVATION_EQUATION = "...abc,efbc,diaf,ghde->...ghi"


def quanta(in_factors: Sequence[int], out_factors: Sequence[int], rank: int, *,
           init: str = "frozen-copy", layer: str = "QuanTA") -> TensorNetwork:
    """QuanTA for a Linear weight ``[m1*m2*m3, n1*n2*n3]``; rank is used only when n != m."""
    r = check_rank(rank, layer)
    n1, n2, n3 = in_factors
    m1, m2, m3 = out_factors
    equal = tuple(in_factors) == tuple(out_factors)
    if equal:
        shapes = [(n2, n3, n2, n3), (n1, n3, n1, n3), (n1, n2, n1, n2)]
    else:
        shapes = [(r, r, n2, n3), (r, m3, n1, r), (m1, m2, r, r)]
    letters = QUANTA_WEIGHT_EQUATION.split("->")[0].split(",")
    inits = apply_init_mode([uniform_fan_in(s[2] * s[3], 3.0) for s in shapes], init, layer)
    cores = tuple(Core(tuple(s), idx, it) for s, idx, it in zip(shapes, letters, inits))
    return TensorNetwork(
        method="quanta", cores=cores, output="ghiabc",
        weight_shape=(m1 * m2 * m3, n1 * n2 * n3),
        meta=dict(rank=r, in_factors=(n1, n2, n3), out_factors=(m1, m2, m3), equal=equal,
                  init=init))


class QuanTALinear(AdaptedLinear):
    """Linear adapted with QuanTA: ``y = x (W - Q(θ0) + Q(θ))ᵀ + b``; ``.gates`` in spec order."""
    strategies = ("merged", "factorized")
    #: The gates applied to the activations (the factorized strategy).
    activation_equation = QUANTA_ACTIVATION_EQUATION

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int,
                    factors: Optional[Sequence[Sequence[int]]] = None, init: str = "frozen-copy",
                    name: Optional[str] = None) -> "QuanTALinear":
        """Wrap ``linear``; ``factors=((n1, n2, n3), (m1, m2, m3))`` overrides the table."""
        def network(name):
            fin, fout = resolve_factors(factors, linear.in_features, linear.out_features,
                                        layer=name)
            return quanta(fin, fout, rank, init=init, layer=name)
        return cls._adapt(linear, name, network, frozen_copy=(init == "frozen-copy"))

    @property
    def gates(self) -> nn.ParameterList:
        return self.cores


def build_linear(linear, config, name):
    """QuanTALinear for a Linear target of an :class:`~tenvoo_fast.AdapterConfig`."""
    f = factors_for(config.factors, name, linear.in_features, linear.out_features)
    return QuanTALinear.from_linear(linear, config.rank, factors=f, init=config.init, name=name)
