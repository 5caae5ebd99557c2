"""What every family's builder shares: rank checks, initialisation rules and the alpha scale."""
from __future__ import annotations

import math

from ..contraction.network import ZEROS, Init
from ..errors import AdapterError

#: Einsum letters of a Conv3d weight's taps (kD, kH, kW) in the baselines' networks.
TAP_LETTERS = "xyz"
INITS = ("frozen-copy", "zero-last")


def check_rank(rank: int, layer: str) -> int:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise AdapterError(f"{layer}: rank must be an integer >= 1, got {rank!r}")
    return rank


def uniform_fan_in(fan_in: int, gain2: float) -> Init:
    """Uniform on [-b, b], b = sqrt(gain2 / fan_in) (gain2 = 6 for TenVOO, 3 for QuanTA)."""
    return Init("uniform", math.sqrt(gain2 / fan_in))


def kaiming_uniform_a5(fan_in: int) -> Init:
    """torch.nn.init.kaiming_uniform_(a=sqrt(5)): b = sqrt(6 / ((1 + 5) * fan_in)) = 1/sqrt(fan_in)."""
    return Init("uniform", 1.0 / math.sqrt(fan_in))


def apply_init_mode(inits: list, init: str, layer: str) -> list:
    """The tensor-network families' ``init``: ``frozen-copy`` keeps every core's rule,
    ``zero-last`` zeroes the last core (so ΔW starts at 0 without a frozen copy)."""
    if init == "frozen-copy":
        return inits
    if init == "zero-last":
        return inits[:-1] + [ZEROS]
    raise AdapterError(f"{layer}: unknown init {init!r}; use 'frozen-copy' or 'zero-last'")


def alpha_scale(alpha, rank: int) -> float:
    """The baselines' scale ``alpha / rank`` (alpha defaults to the rank: scale 1)."""
    return float(rank if alpha is None else alpha) / rank
