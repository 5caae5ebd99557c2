"""The ``cpu`` and ``cuda`` backends: fast-path design 1 with the native (csrc) kernels.

The same ``torch.library`` ops as ``recompute`` (``kernel="native"``): the weight-sized step,
fused with the fold and the cast, runs in C++ on the CPU (``cpu``) or in CUDA (``cuda``); the
small contraction steps stay in torch. Available when ``setup.py`` built the extension.
"""
from __future__ import annotations

from . import native
from .recompute import RecomputeBackend


class NativeBackend(RecomputeBackend):
    kernel = "native"

    def __init__(self, device_type: str):
        self.device_type = device_type
        self.name = device_type          # "cpu" or "cuda"
        self.priority = RecomputeBackend.priority - 1   # listed, and ranked, after recompute

    def auto_priority(self, device_type: str, layer=None):
        """Rank under ``auto`` (None: never chosen automatically), from measurements:

        - ``cpu``: just below ``recompute``, which was as fast or faster on the benchmark
          shapes (2-core CPU, fwd+bwd, 512->512 on 8x8x6: TenVOO-L r=4 and TenVOO-Q r=12;
          ``benchmarks/results/cpu-2core-2026-11-24-run4.md``): torch's path runs the GEMM in
          one multi-threaded MKL call, the C++ kernel in per-tile calls, and the pass it saves
          does not make up for that.
        - ``cuda``: not ranked, so ``auto`` never picks it, until it has been measured on a GPU
          (no session with a GPU has run it yet).
        """
        if device_type != self.device_type or device_type != "cpu":
            return None
        return RecomputeBackend.auto_priority(self, device_type, layer)

    def unavailable_reason(self):
        return native.unavailable_reason(self.device_type)

    def unsupported_reason(self, layer, x):
        if x.device.type != self.device_type:
            other = "cuda" if self.device_type == "cpu" else "cpu"
            return (f"the {self.name!r} backend runs {self.device_type} tensors and the input is "
                    f"on {x.device}; use {other!r} or 'auto'")
        return super().unsupported_reason(layer, x)
