"""The ``triton`` backend: fast-path design 1 with the weight-sized steps in Triton kernels.

The same ``torch.library`` ops as :mod:`recompute` (``kernel="triton"``): the small steps of the
contraction run in torch, and :mod:`tenvoo_fast.triton_kernels` fuses the last one with
``W - T(θ0)`` and the cast to the conv's dtype (one pass over the weight), and turns dL/dW into
the last step's operand gradients (one read of dL/dW each). Runs on CUDA, or on CPU tensors
under ``TRITON_INTERPRET=1`` (how CI checks its numerics; never chosen by ``auto`` there).
"""
from __future__ import annotations

import os

import torch

from .recompute import RecomputeBackend


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class TritonBackend(RecomputeBackend):
    name = "triton"
    priority = 20
    kernel = "triton"

    def auto_priority(self, device_type: str, layer=None):
        """Never the interpreter under ``auto``; on CUDA below the reference for now: on the
        H100 (paper preset, bf16) the model step took 837 ms with it against the reference's
        498 ms, because the small torch steps around the kernels are launch-bound."""
        return -5 if device_type == "cuda" else None

    def unavailable_reason(self):
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed (pip install 'tenvoo_fast[triton]')"
        if not (torch.cuda.is_available() or interpreting()):
            return "no CUDA GPU (set TRITON_INTERPRET=1 to run the kernels on the CPU, slowly)"
        return None

    def unsupported_reason(self, layer, x):
        if x.device.type != "cuda" and not interpreting():
            return f"input on {x.device.type}; the Triton kernels need CUDA tensors"
        if x.dtype == torch.float64 or layer.weight.dtype == torch.float64:
            return "fp64 (the kernels accumulate in fp32; the reference and recompute keep fp64)"
        return super().unsupported_reason(layer, x)
