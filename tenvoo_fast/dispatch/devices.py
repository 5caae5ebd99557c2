"""The GPUs the cost models know: their peaks (for ``auto``'s GPU cost model,
:mod:`.gpu_costs`, and the roofline count, :mod:`tenvoo_fast.measure.roofline`)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPU:
    """A GPU's peaks: dense bf16 tensor-core and fp32 flop/s, memory bytes/s, and the shortest
    time a kernel takes (launch to completion, empty)."""
    name: str
    bf16_flops: float
    fp32_flops: float
    bytes_per_s: float
    kernel_floor_s: float = 2.5e-6


#: Spec-sheet peaks (SXM parts, dense).
H100 = GPU("H100 SXM", 989e12, 67e12, 3.35e12)
H200 = GPU("H200 SXM", 989e12, 67e12, 4.8e12)
