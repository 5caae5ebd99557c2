"""LoHa (adapters.md §5): ΔW = s · (w1a @ w1b) ⊙ (w2a @ w2b) on Conv3d, Conv2d and Linear
layers."""
from __future__ import annotations

import math
from typing import Sequence

from ..contraction.network import ZEROS, Core, Init, TensorNetwork
from ..nn.conv2d import AdaptedConv2d
from ..nn.conv3d import AdaptedConv3d
from ..nn.linear import AdaptedLinear
from .common import TAP_LETTERS, alpha_scale, check_rank
from .registry import register_baseline


def loha(cout: int, cin: int, taps: Sequence[int], rank: int, alpha=None, *,
         layer: str = "LoHa") -> TensorNetwork:
    """LoHa: ΔW = s * (w1a @ w1b) ⊙ (w2a @ w2b); w1a, w2a (Cout, r); w1b, w2b (r, Cin*k)."""
    r = check_rank(rank, layer)
    k = tuple(taps)
    kl = TAP_LETTERS[:len(k)]
    flat = cin * math.prod(k)
    view = (r, cin, *k)
    cores = (Core((cout, r), "Or", Init("normal", 0.1)),
             Core((r, flat), "rI" + kl, Init("normal", 1.0), view),
             Core((cout, r), "Os", ZEROS),
             Core((r, flat), "sI" + kl, Init("normal", 1.0), view))
    return TensorNetwork("loha", cores, "OI" + kl, (cout, cin, *k), alpha_scale(alpha, r),
                         meta=dict(rank=r, alpha=alpha))


class LoHaConv3d(AdaptedConv3d):
    """LoHa on a Conv3d: ΔW = s * (w1a @ w1b) ⊙ (w2a @ w2b); cores (w1a, w1b, w2a, w2b).
    ``LoHaConv3d.from_conv(conv, rank, alpha=None, name=None)``."""
    network_of = staticmethod(loha)


class LoHaConv2d(AdaptedConv2d):
    """LoHa on a Conv2d (the reference runs it), as :class:`LoHaConv3d`."""
    network_of = staticmethod(loha)


class LoHaLinear(AdaptedLinear):
    """LoHa on a Linear: ΔW = s * (w1a @ w1b) ⊙ (w2a @ w2b).
    ``LoHaLinear.from_linear(linear, rank, alpha=None, name=None)``."""
    network_of = staticmethod(loha)


register_baseline("loha", LoHaConv3d, LoHaLinear, "LoHa on Conv3d, Conv2d and Linear layers",
                  conv2d_class=LoHaConv2d)
