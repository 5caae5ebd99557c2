"""LoKr (adapters.md §5): ΔW = s · kron(w1, w2) on Conv3d and Linear layers, with LyCORIS's
channel split and its full / low-rank rule for w2."""
from __future__ import annotations

import math
from typing import Optional, Sequence

from ..contraction.network import ZEROS, Core, TensorNetwork
from ..nn.conv2d import AdaptedConv2d
from ..nn.conv3d import AdaptedConv3d
from ..nn.linear import AdaptedLinear
from .common import TAP_LETTERS, alpha_scale, check_rank, kaiming_uniform_a5
from .registry import register_baseline


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


def lokr(cout: int, cin: int, taps: Sequence[int], rank: int, alpha=None, *,
         factor: int = -1, full_w2: Optional[bool] = None, layer: str = "LoKr") -> TensorNetwork:
    """LoKr: ΔW = s * kron(w1, w2) over Cout = u1*u2, Cin = v1*v2.

    w1 (u1, v1) Kaiming-uniform; w2 (u2, v2, *k) in full (zeros), or as (u2, r) @ (r, v2*k) with
    the last factor zero. ``full_w2=None`` follows LyCORIS: full when r >= max(u2, v2) / 2.
    """
    r = check_rank(rank, layer)
    k = tuple(taps)
    kl = TAP_LETTERS[:len(k)]
    u1, u2 = lycoris_factorization(cout, factor)
    v1, v2 = lycoris_factorization(cin, factor)
    if full_w2 is None:
        full_w2 = r >= max(u2, v2) / 2
    w1 = Core((u1, v1), "ps", kaiming_uniform_a5(v1))
    if full_w2:
        cores = (w1, Core((u2, v2, *k), "qt" + kl, ZEROS))
    else:
        flat = v2 * math.prod(k)
        cores = (w1, Core((u2, r), "qr", kaiming_uniform_a5(r)),
                 Core((r, flat), "rt" + kl, ZEROS, (r, v2, *k)))
    return TensorNetwork("lokr", cores, "pqst" + kl, (cout, cin, *k), alpha_scale(alpha, r),
                         meta=dict(rank=r, alpha=alpha, factor=factor, full_w2=bool(full_w2),
                                   out_split=(u1, u2), in_split=(v1, v2)))


class LoKrConv3d(AdaptedConv3d):
    """LoKr on a Conv3d: ΔW = s * kron(w1, w2); cores (w1, w2) or (w1, w2a, w2b).
    ``LoKrConv3d.from_conv(conv, rank, alpha=None, name=None, factor=-1, full_w2=None)``:
    ``factor`` and ``full_w2`` as in :func:`lokr`."""
    network_of = staticmethod(lokr)


class LoKrConv2d(AdaptedConv2d):
    """LoKr on a Conv2d (the reference runs it), as :class:`LoKrConv3d`."""
    network_of = staticmethod(lokr)


class LoKrLinear(AdaptedLinear):
    """LoKr on a Linear: ΔW = s * kron(w1, w2).
    ``LoKrLinear.from_linear(linear, rank, alpha=None, name=None, factor=-1, full_w2=None)``."""
    network_of = staticmethod(lokr)


register_baseline("lokr", LoKrConv3d, LoKrLinear, "LoKr on Conv3d, Conv2d and Linear layers",
                  conv_options={"factor": "lokr_factor"},
                  linear_options={"factor": "lokr_factor"}, conv2d_class=LoKrConv2d)
