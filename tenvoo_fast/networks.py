"""The adapter mathematics, written once, as data.

Every adapter's update ΔW is a tensor network: a list of cores (stored shape, einsum letters,
initialisation) contracted by one einsum whose output is laid out exactly like the layer's
weight (``[Cout, Cin, kD, kH, kW]`` or ``[out, in]``), times a scale. Backends read a
:class:`TensorNetwork`; none re-states the math. The definitions follow
``shared/spec/adapters.md``; each builder cites the section it implements.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

from .errors import AdapterError


@dataclass(frozen=True)
class Init:
    """How a core is initialised: ``uniform`` on [-value, value], ``normal`` with std value, or ``zeros``."""
    kind: str
    value: float = 0.0


ZEROS = Init("zeros")


@dataclass(frozen=True)
class Core:
    """One core: the shape it is stored (and checkpointed) with, and its einsum letters.

    ``view`` is the shape the contraction reads it as, when that differs from the stored shape
    (a free reshape, e.g. LoHa's ``(r, Cin*k)`` factor read as ``(r, Cin, kD, kH, kW)``).
    """
    shape: tuple[int, ...]
    indices: str
    init: Init
    view: Optional[tuple[int, ...]] = None

    @property
    def contraction_shape(self) -> tuple[int, ...]:
        return self.view if self.view is not None else self.shape

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class TensorNetwork:
    """ΔW = scale * einsum(equation, *cores).reshape(weight_shape)."""
    method: str
    cores: tuple[Core, ...]
    output: str
    weight_shape: tuple[int, ...]
    scale: float = 1.0
    #: Extra, method-specific facts (factors, rank, ...) for reprs, checkpoints and kernels.
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def equation(self) -> str:
        return ",".join(c.indices for c in self.cores) + "->" + self.output

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        return tuple(c.shape for c in self.cores)

    @property
    def num_params(self) -> int:
        return sum(c.numel for c in self.cores)


def _check_rank(rank: int, layer: str) -> int:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise AdapterError(f"{layer}: rank must be an integer >= 1, got {rank!r}")
    return rank


def _uniform_fan_in(fan_in: int, gain2: float) -> Init:
    """Uniform on [-b, b], b = sqrt(gain2 / fan_in) (gain2 = 6 for TenVOO, 3 for QuanTA)."""
    return Init("uniform", math.sqrt(gain2 / fan_in))


def _kaiming_uniform_a5(fan_in: int) -> Init:
    """torch.nn.init.kaiming_uniform_(a=sqrt(5)): b = sqrt(6 / ((1 + 5) * fan_in)) = 1/sqrt(fan_in)."""
    return Init("uniform", 1.0 / math.sqrt(fan_in))


# ---------------------------------------------------------------------------------------------
# TenVOO (adapters.md §3)

#: Core letters, in checkpoint order; the spec's strings, verbatim.
TENVOO_EQUATIONS = {
    "L": "bade,cefg,xghi,yijk,zklm,Cmno,BopA,fdqh,lrpn,jqr->abcxyzABC",
    "Q": "bade,cefg,xghi,yijk,zjlm,Cmop,BpqA,oqrs,dftr,hlst->abcxyzABC",
}
#: The same network with its output in the conv weight's layout [Cout, Cin, kD, kH, kW], which
#: equals the spec's ``T.reshape(Cin, kD, kH, kW, Cout).permute(4, 0, 1, 2, 3)``.
TENVOO_WEIGHT_OUTPUT = "ABCabcxyz"


def tenvoo(variant: str, in_factors: Sequence[int], out_factors: Sequence[int],
           kernel_size: Sequence[int], rank: int, *, init: str = "frozen-copy",
           layer: str = "TenVOO") -> TensorNetwork:
    """TenVOO-L or TenVOO-Q for a Conv3d weight ``[o1*o2*o3, i1*i2*i3, kD, kH, kW]``."""
    variant = str(variant).upper()
    if variant not in TENVOO_EQUATIONS:
        raise AdapterError(f"{layer}: unknown TenVOO variant {variant!r}; use 'L' or 'Q'")
    r = _check_rank(rank, layer)
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
    inits = [_uniform_fan_in(f, 6.0) for f in fans]
    inits = _apply_init_mode(inits, init, layer)
    cores = tuple(Core(tuple(s), idx, it) for s, idx, it in zip(shapes, letters, inits))
    cin, cout = i1 * i2 * i3, o1 * o2 * o3
    return TensorNetwork(
        method=f"tenvoo-{variant.lower()}", cores=cores, output=TENVOO_WEIGHT_OUTPUT,
        weight_shape=(cout, cin, kD, kH, kW),
        meta=dict(variant=variant, rank=r, in_factors=(i1, i2, i3), out_factors=(o1, o2, o3),
                  kernel_size=(kD, kH, kW), init=init))


def tenvoo_num_params(variant: str, in_factors, out_factors, kernel_size, rank: int) -> int:
    """The paper's Eq. (6), for checking the network's parameter count."""
    i1, i2, i3 = in_factors
    o1, o2, o3 = out_factors
    kD, kH, kW = kernel_size
    r = rank
    if variant.upper() == "L":
        return (i1 * i2 + o1 * o2) * r ** 2 + (i3 + o3 + kD + kH + kW + 1) * r ** 3 + 2 * r ** 4
    return (i1 * i2 + o1 * o2 + kH) * r ** 2 + (i3 + o3 + kD + kW) * r ** 3 + 3 * r ** 4


# ---------------------------------------------------------------------------------------------
# QuanTA (adapters.md §4)

#: Gates for axis pairs (-1,-2), (-1,-3), (-2,-3), contracted to the full matrix [out, in].
QUANTA_WEIGHT_EQUATION = "efbc,diaf,ghde->ghiabc"
#: The same gates applied to activations x viewed as (..., n1, n2, n3).
QUANTA_ACTIVATION_EQUATION = "...abc,efbc,diaf,ghde->...ghi"


def quanta(in_factors: Sequence[int], out_factors: Sequence[int], rank: int, *,
           init: str = "frozen-copy", layer: str = "QuanTA") -> TensorNetwork:
    """QuanTA for a Linear weight ``[m1*m2*m3, n1*n2*n3]``; rank is used only when n != m."""
    r = _check_rank(rank, layer)
    n1, n2, n3 = in_factors
    m1, m2, m3 = out_factors
    equal = tuple(in_factors) == tuple(out_factors)
    if equal:
        shapes = [(n2, n3, n2, n3), (n1, n3, n1, n3), (n1, n2, n1, n2)]
    else:
        shapes = [(r, r, n2, n3), (r, m3, n1, r), (m1, m2, r, r)]
    letters = QUANTA_WEIGHT_EQUATION.split("->")[0].split(",")
    inits = _apply_init_mode([_uniform_fan_in(s[2] * s[3], 3.0) for s in shapes], init, layer)
    cores = tuple(Core(tuple(s), idx, it) for s, idx, it in zip(shapes, letters, inits))
    return TensorNetwork(
        method="quanta", cores=cores, output="ghiabc",
        weight_shape=(m1 * m2 * m3, n1 * n2 * n3),
        meta=dict(rank=r, in_factors=(n1, n2, n3), out_factors=(m1, m2, m3), equal=equal,
                  init=init))


def _apply_init_mode(inits: list, init: str, layer: str) -> list:
    if init == "frozen-copy":
        return inits
    if init == "zero-last":
        return inits[:-1] + [ZEROS]
    raise AdapterError(f"{layer}: unknown init {init!r}; use 'frozen-copy' or 'zero-last'")


# ---------------------------------------------------------------------------------------------
# Baselines (adapters.md §5). ``kernel`` is () for Linear, (kD, kH, kW) for Conv3d.

_KERNEL_LETTERS = "xyz"


def _scale(alpha, rank: int) -> float:
    return float(rank if alpha is None else alpha) / rank


def lora(cout: int, cin: int, kernel: Sequence[int], rank: int, alpha=None, *,
         layer: str = "LoRA") -> TensorNetwork:
    """LoRA / LoCon: ΔW = s * up ×_r down; down (r, Cin, *k) Kaiming-uniform, up (Cout, r, 1..) zeros."""
    r = _check_rank(rank, layer)
    k = tuple(kernel)
    kl = _KERNEL_LETTERS[:len(k)]
    fan_in = cin * math.prod(k)
    down = Core((r, cin, *k), "rI" + kl, _kaiming_uniform_a5(fan_in))
    up = Core((cout, r, *(1,) * len(k)), "Or" + "uvw"[:len(k)], ZEROS)
    return TensorNetwork("lora", (down, up), "OI" + kl, (cout, cin, *k), _scale(alpha, r),
                         meta=dict(rank=r, alpha=alpha))


def loha(cout: int, cin: int, kernel: Sequence[int], rank: int, alpha=None, *,
         layer: str = "LoHa") -> TensorNetwork:
    """LoHa: ΔW = s * (w1a @ w1b) ⊙ (w2a @ w2b); w1a, w2a (Cout, r); w1b, w2b (r, Cin*k)."""
    r = _check_rank(rank, layer)
    k = tuple(kernel)
    kl = _KERNEL_LETTERS[:len(k)]
    flat = cin * math.prod(k)
    view = (r, cin, *k)
    cores = (Core((cout, r), "Or", Init("normal", 0.1)),
             Core((r, flat), "rI" + kl, Init("normal", 1.0), view),
             Core((cout, r), "Os", ZEROS),
             Core((r, flat), "sI" + kl, Init("normal", 1.0), view))
    return TensorNetwork("loha", cores, "OI" + kl, (cout, cin, *k), _scale(alpha, r),
                         meta=dict(rank=r, alpha=alpha))


def lycoris_factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS's split ``dimension = m * n`` with ``m <= n`` as balanced as allowed by ``factor``."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (n, m) if m > n else (m, n)
    if factor < 0:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def lokr(cout: int, cin: int, kernel: Sequence[int], rank: int, alpha=None, *,
         factor: int = -1, full_w2: Optional[bool] = None, layer: str = "LoKr") -> TensorNetwork:
    """LoKr: ΔW = s * kron(w1, w2) over Cout = u1*u2, Cin = v1*v2.

    w1 (u1, v1) Kaiming-uniform; w2 (u2, v2, *k) in full (zeros), or as (u2, r) @ (r, v2*k) with
    the last factor zero. ``full_w2=None`` follows LyCORIS: full when r >= max(u2, v2) / 2.
    """
    r = _check_rank(rank, layer)
    k = tuple(kernel)
    kl = _KERNEL_LETTERS[:len(k)]
    u1, u2 = lycoris_factorization(cout, factor)
    v1, v2 = lycoris_factorization(cin, factor)
    if full_w2 is None:
        full_w2 = r >= max(u2, v2) / 2
    w1 = Core((u1, v1), "ps", _kaiming_uniform_a5(v1))
    if full_w2:
        cores = (w1, Core((u2, v2, *k), "qt" + kl, ZEROS))
    else:
        flat = v2 * math.prod(k)
        cores = (w1, Core((u2, r), "qr", _kaiming_uniform_a5(r)),
                 Core((r, flat), "rt" + kl, ZEROS, (r, v2, *k)))
    return TensorNetwork("lokr", cores, "pqst" + kl, (cout, cin, *k), _scale(alpha, r),
                         meta=dict(rank=r, alpha=alpha, factor=factor, full_w2=bool(full_w2),
                                   out_split=(u1, u2), in_split=(v1, v2)))
