"""The backends, as data: who runs an adapted layer, what each needs, and ``auto``'s ranking.

- ``reference``: the published contraction (opt_einsum, autograd through it) and the framework's
  conv/linear; any device, any dtype. It defines correctness.
- ``torch``: the ``torch.library`` ops (:mod:`tenvoo_fast.ops`) with their torch kernels; any
  device. Earlier releases called it ``recompute`` (still accepted).
- ``triton``: the same ops with their heavy steps in Triton kernels; CUDA, or CPU tensors under
  ``TRITON_INTERPRET=1``.
- ``cpu`` / ``cuda``: the same ops with the weight-sized step in the native (csrc) kernels.

Under ``auto`` a layer runs on the first backend of its ranking that is available and supports
it. On the CPU the ranking is :data:`AUTO_RANKING`'s, measured (README, "Speed and memory";
``benchmarks/results/``); on CUDA it is predicted per layer and input shape by the GPU cost
model (:mod:`.gpu_costs`: counted launches times the host's or a graph replay's cost per launch,
plus a roofline of the adapter's work). A backend not ranked for a device is never picked
there, but runs when named.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from ..errors import AdapterError
from . import gpu_costs

#: Under ``auto`` on the CPU: (device type, layer kind) -> backends to try, best first.
AUTO_RANKING: dict[tuple[str, str], tuple[str, ...]] = {
    ("cpu", "conv3d"): ("torch", "cpu", "reference"),
    ("cpu", "linear"): ("reference", "torch", "cpu"),
}
#: Under ``auto`` on any device other than the CPU and CUDA.
DEFAULT_RANKING = ("reference", "torch")
#: The order :func:`available_backends` lists backends in (fastest kernels first).
LISTING = ("triton", "torch", "cpu", "cuda", "reference")
#: Old names that still select a backend.
ALIASES = {"recompute": "torch"}


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_unavailable() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install 'tenvoo_fast[triton]')"
    if not (torch.cuda.is_available() or interpreting()):
        return "no CUDA GPU (set TRITON_INTERPRET=1 to run the kernels on the CPU, slowly)"
    return None


def _native_unavailable(device_type: str) -> Callable[[], Optional[str]]:
    def reason():
        from ..kernels import native   # loads the extension: only when asked
        return native.unavailable_reason(device_type)
    return reason


def _on_device(device_type: str):
    other = "cuda" if device_type == "cpu" else "cpu"

    def check(layer, x):
        if x.device.type != device_type:
            return (f"the {device_type!r} backend runs {device_type} tensors and the input is "
                    f"on {x.device}; use {other!r} or 'auto'")
        return None
    return check


def _cuda_or_interpreter(layer, x):
    if x.device.type != "cuda" and not interpreting():
        return f"input on {x.device.type}; the Triton kernels need CUDA tensors"
    return None


def _no_fp64(layer, x):
    if x.dtype == torch.float64 or layer.weight.dtype == torch.float64:
        return "fp64 (the kernels accumulate in fp32; the reference and torch keep fp64)"
    return None


def _no_conv2d(layer, x):
    if isinstance(layer, nn.Conv2d):
        return "a Conv2d (the fast kernels run Conv3d and Linear layers; the reference runs it)"
    return None


def _no_string_padding(layer, x):
    if isinstance(getattr(layer, "padding", None), str):
        return f"string padding {layer.padding!r} (the reference handles it)"
    return None


@dataclass(frozen=True)
class Backend:
    name: str
    #: Who runs the ops' heavy steps (:mod:`tenvoo_fast.kernels`); None: the reference.
    impl: Optional[str]
    #: Why it cannot run in this process (None: it can).
    unavailable: Callable[[], Optional[str]] = lambda: None
    #: Checks of a layer and input, in order; the first reason found refuses them.
    checks: tuple = field(default=())

    def unavailable_reason(self) -> Optional[str]:
        return self.unavailable()

    def unsupported_reason(self, layer, x: torch.Tensor) -> Optional[str]:
        """None if it can run ``layer`` on ``x``, else why not."""
        for check in self.checks:
            if (reason := check(layer, x)) is not None:
                return reason
        return None


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("reference", None),
    Backend("torch", "torch", checks=(_no_conv2d, _no_string_padding)),
    Backend("triton", "triton", _triton_unavailable,
            (_no_conv2d, _cuda_or_interpreter, _no_fp64, _no_string_padding)),
    Backend("cpu", "native", _native_unavailable("cpu"),
            (_no_conv2d, _on_device("cpu"), _no_string_padding)),
    Backend("cuda", "native", _native_unavailable("cuda"),
            (_no_conv2d, _on_device("cuda"), _no_string_padding)),
)}


def canonical(name: str) -> str:
    return ALIASES.get(name, name)


def get_backend(name: str) -> Backend:
    return BACKENDS[canonical(name)]


def registered_backends() -> list[str]:
    return sorted(BACKENDS)


def available_backends() -> list[str]:
    """Backends that can run in this process, fastest kernels first, then ``"auto"``."""
    return [n for n in LISTING if BACKENDS[n].unavailable_reason() is None] + ["auto"]


def validate(name: str) -> str:
    """``name`` (an alias resolved) if it can be selected here, else AdapterError saying why."""
    name = canonical(name)
    if name == "auto":
        return name
    if name not in BACKENDS:
        raise AdapterError(
            f"unknown backend {name!r}; registered: {registered_backends()} (or 'auto')")
    reason = BACKENDS[name].unavailable_reason()
    if reason is not None:
        raise AdapterError(f"backend {name!r} cannot run here: {reason}; use one of "
                           f"{available_backends()}")
    return name


def layer_kind(layer) -> str:
    if isinstance(layer, nn.Linear):
        return "linear"
    return "conv2d" if isinstance(layer, nn.Conv2d) else "conv3d"


def auto_ranking(layer, x: torch.Tensor) -> tuple[str, ...]:
    """The backends ``auto`` tries for ``layer`` on ``x``'s device, best first. While
    ``torch.compile`` traces, the reference goes last: opt_einsum's path search breaks the
    graph, where the other backends trace as one custom op."""
    if layer_kind(layer) == "conv2d":
        return ("reference",)
    if x.device.type == "cuda":
        ranking = gpu_costs.ranking(layer, tuple(x.shape), layer.compute_dtype(x))
    else:
        ranking = AUTO_RANKING.get((x.device.type, layer_kind(layer)), DEFAULT_RANKING)
    if torch.compiler.is_compiling() and "reference" in ranking:
        ranking = tuple(n for n in ranking if n != "reference") + ("reference",)
    return ranking
