"""What a step asks of the device: flops, bytes moved and kernels, per ATen call, and the
roofline time they take at best on a given GPU. Runs on the meta device (no memory, no
compute), so the paper model's step at its full volume can be counted on a laptop.

:class:`DeviceWork` is a ``TorchDispatchMode``: each kernel-launching call (see
:func:`~tenvoo_fast.measure.launches.classify`) adds its flops (PyTorch's own formulas,
``torch.utils.flop_counter``; calls without one count zero), the bytes of its tensor inputs
and outputs (each read or written once: a lower bound), and its roofline time,
``max(flops / peak, bytes / bandwidth)`` plus a fixed per-kernel floor.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from .launches import classify


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


class DeviceWork(TorchDispatchMode):
    """Count ``flops``, ``bytes``, ``kernels`` and ``roofline_s`` (on ``gpu``) of what runs
    inside, in all and per ATen op name (``by_op``: name -> [kernels, flops, bytes, s])."""

    def __init__(self, gpu: GPU = H100):
        super().__init__()
        self.gpu = gpu
        self.flops = self.bytes = self.kernels = 0
        self.roofline_s = 0.0
        self.by_op: dict[str, list] = defaultdict(lambda: [0, 0, 0, 0.0])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if classify(func, args) in ("launch", "copy"):
            self._add(func, args, kwargs, out)
        return out

    def _add(self, func, args, kwargs, out) -> None:
        formula = flop_registry.get(func._overloadpacket)
        flops = int(formula(*args, **kwargs, out_val=out)) if formula is not None else 0
        tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        moved = sum(t.numel() * t.element_size() for t in tensors)
        low = any(t.dtype in (torch.bfloat16, torch.float16) for t in tensors)
        peak = self.gpu.bf16_flops if low else self.gpu.fp32_flops
        seconds = max(flops / peak, moved / self.gpu.bytes_per_s, self.gpu.kernel_floor_s)
        self.flops += flops
        self.bytes += moved
        self.kernels += 1
        self.roofline_s += seconds
        row = self.by_op[func._schema.name.split("::")[-1]]
        row[0] += 1
        row[1] += flops
        row[2] += moved
        row[3] += seconds
