"""What autograd keeps for backward, the memory the fast backends minimise."""
from __future__ import annotations

from typing import Callable, Iterable

import torch


def owned_tensors(layer, x: torch.Tensor | None = None, backend=None) -> list[torch.Tensor]:
    """The input and everything an adapted layer holds anyway (weight, bias, cores, frozen copy
    and the backend's cached T(θ0)): tensors whose being saved costs no extra memory."""
    owned = [layer.weight, *layer.cores]
    if x is not None:
        owned.append(x)
    if layer.bias is not None:
        owned.append(layer.bias)
    if layer.frozen_cores is not None:
        owned += list(layer.frozen_cores)
        owned.append(layer.frozen_delta_weight(backend))
    return owned


def saved_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct tensors autograd saves for backward while running ``fn``,
    not counting those sharing storage with ``exclude``."""
    skip = {t.data_ptr() for t in exclude}
    kept = {}

    def pack(t):
        if t.data_ptr() not in skip:
            kept[t.data_ptr()] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(kept.values())
