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

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from ..dispatch.devices import GPU, H100, H200

__all__ = ["GPU", "H100", "H200", "DeviceWork"]
from .launches import classify


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
