"""Backend registry and dispatch: the one place that decides which code runs an adapted layer.

A backend turns an adapted layer and an input into the layer's output (and, through autograd,
its gradients). ``reference`` (opt_einsum, any device) is always present; the fast backends
(``triton``, ``cpu``, ``cuda``) register themselves here when their issue lands and their
kernels can run. ``auto`` picks the first available backend, in priority order, that supports
the device and the layer; an explicitly requested backend that cannot run raises and says why.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Protocol

import torch

from .errors import AdapterError


class Backend(Protocol):
    name: str
    priority: int  # higher wins under "auto"

    def unavailable_reason(self) -> str | None:
        """None if the backend can run in this process, else why not (not installed, no GPU, ...)."""

    def unsupported_reason(self, layer, x: torch.Tensor) -> str | None:
        """None if it can run this layer on this input, else why not (device, shape, dtype)."""

    def delta_weight(self, network, tensors) -> torch.Tensor:
        """ΔW of ``network`` from stored-shape ``tensors``, fp32 (fp64), no autograd needed."""

    def conv3d(self, layer, x: torch.Tensor) -> torch.Tensor: ...

    def linear(self, layer, x: torch.Tensor) -> torch.Tensor: ...


_REGISTRY: dict[str, Backend] = {}
_state = threading.local()
_DEFAULT = "auto"


def register_backend(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend


def get_backend(name: str) -> Backend:
    return _REGISTRY[name]


def registered_backends() -> list[str]:
    return sorted(_REGISTRY)


def available_backends() -> list[str]:
    """Backends that can run in this process, best first, then ``"auto"``."""
    ok = [b for b in _REGISTRY.values() if b.unavailable_reason() is None]
    return [b.name for b in sorted(ok, key=lambda b: -b.priority)] + ["auto"]


def _validate(name: str) -> str:
    if name == "auto":
        return name
    if name not in _REGISTRY:
        raise AdapterError(
            f"unknown backend {name!r}; registered: {registered_backends()} (or 'auto')")
    reason = _REGISTRY[name].unavailable_reason()
    if reason is not None:
        raise AdapterError(f"backend {name!r} cannot run here: {reason}; use one of "
                           f"{available_backends()}")
    return name


def set_backend(name: str) -> None:
    """Select the backend for this thread (``"auto"`` by default)."""
    _state.name = _validate(name)


def current_backend() -> str:
    return getattr(_state, "name", _DEFAULT)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """``with use_backend("reference"): ...`` selects a backend for the block, then restores."""
    previous = current_backend()
    set_backend(name)
    try:
        yield
    finally:
        _state.name = previous


def _auto_priority(backend, layer, x):
    """A backend's rank under ``auto`` for this layer on ``x``'s device (``auto_priority``,
    else its ``priority``); None means ``auto`` never picks it there (it still runs when
    named)."""
    rank = getattr(backend, "auto_priority", None)
    return backend.priority if rank is None else rank(x.device.type, layer)


def resolve(layer, x: torch.Tensor, tuned: str | None = None) -> Backend:
    """The backend that runs ``layer`` on ``x`` now (``tuned``: a measured choice for this
    layer and input, which ``auto`` takes when that backend can run it)."""
    name = current_backend()
    if name == "auto" and tuned is not None:
        backend = _REGISTRY.get(tuned)
        if (backend is not None and backend.unavailable_reason() is None
                and backend.unsupported_reason(layer, x) is None):
            return backend
    if name != "auto":
        backend = _REGISTRY[name]
        reason = backend.unsupported_reason(layer, x)
        if reason is not None:
            raise AdapterError(f"{layer.adapter_name}: backend {name!r} cannot run this layer: "
                               f"{reason}; use_backend('auto') falls back automatically")
        return backend
    ranked = [(rank, b) for b in _REGISTRY.values() if (rank := _auto_priority(b, layer, x)) is not None]
    for _, backend in sorted(ranked, key=lambda rb: -rb[0]):
        if backend.unavailable_reason() is None and backend.unsupported_reason(layer, x) is None:
            return backend
    raise AdapterError(f"{layer.adapter_name}: no backend can run this layer")  # pragma: no cover
