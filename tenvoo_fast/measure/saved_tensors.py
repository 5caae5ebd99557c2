"""What autograd keeps for backward, the memory the fast backends minimise."""
from __future__ import annotations

from typing import Callable, Iterable

import torch

#: The measurements now running (:class:`SavedBytes`), innermost last.
_ACTIVE: list["SavedBytes"] = []


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
        if not layer.frozen_folded:
            owned.append(layer.frozen_delta_weight(backend))
    return owned


def held_by(model: torch.nn.Module) -> list[torch.Tensor]:
    """Everything ``model`` holds between steps: parameters, buffers and its adapter layers'
    cached tensors (what a step's saved tensors may share without costing memory)."""
    held = [*model.parameters(), *model.buffers()]
    for m in model.modules():
        if hasattr(m, "cached_tensors"):
            held += m.cached_tensors()
    return held


class SavedBytes:
    """While active, the distinct tensors autograd saves for backward, and those a
    checkpointed region keeps as its inputs instead (:func:`note_kept`: inside such a region
    the checkpoint's own hooks take the saved tensors), not counting those sharing storage
    with ``exclude``; ``bytes`` once the block ends."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._skip = {t.data_ptr() for t in exclude}
        self._kept: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self.bytes = 0

    def _pack(self, t):
        self.note(t)
        return t

    def note(self, t: torch.Tensor) -> None:
        if t.data_ptr() not in self._skip:
            self._kept[t.data_ptr()] = t.numel() * t.element_size()

    @property
    def so_far(self) -> int:
        """The bytes noted until now (``bytes`` is set when the block ends)."""
        return sum(self._kept.values())

    def __enter__(self) -> "SavedBytes":
        _ACTIVE.append(self)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        _ACTIVE.remove(self)
        self.bytes = self.so_far


def note_kept(tensors: Iterable) -> None:
    """Tensors kept for backward outside autograd's saved tensors (a checkpointed region's
    inputs), for every measurement running."""
    if not _ACTIVE:
        return
    for t in tensors:
        if isinstance(t, torch.Tensor):
            for m in _ACTIVE:
                m.note(t)


def saved_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct tensors autograd saves for backward while running ``fn``,
    not counting those sharing storage with ``exclude``."""
    with SavedBytes(exclude) as m:
        fn()
    return m.bytes
