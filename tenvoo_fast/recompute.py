"""The ``recompute`` backend: adapted layers through the ``torch.library`` ops of :mod:`ops`.

Fast-path design 1 with the ops' pure-torch kernels: the effective weight is built without
autograd, the framework's conv/linear runs on it, and backward rebuilds what it needs instead of
keeping the effective weight and the contraction's intermediates. Q's redundant axes are
pre-reduced. It runs on any device and is what ``auto`` picks until faster kernels register.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import ops  # noqa: F401  (registers the torch.library ops)


def _views(network, tensors):
    return [t.reshape(core.contraction_shape) for t, core in zip(tensors, network.cores)]


class RecomputeBackend:
    name = "recompute"
    priority = 10
    kernel = "torch"  # who runs the weight-sized steps of the ops (see ops.py)

    def auto_priority(self, device_type: str):
        """Rank under ``auto`` on this device (None: never chosen automatically).

        On CUDA the pure-torch recompute path is launch-bound and measured slower than the
        reference (paper preset, H100, bf16: 695 vs 514 ms per step), so ``auto`` prefers the
        reference there; on the CPU it is the faster one.
        """
        return self.priority if device_type == "cpu" else -10

    def unavailable_reason(self):
        return None

    def unsupported_reason(self, layer, x):
        if isinstance(getattr(layer, "padding", None), str):
            return f"string padding {layer.padding!r} (the reference handles it)"
        return None

    def delta_weight(self, network, tensors):
        return torch.ops.tenvoo_fast.build_delta(
            _views(network, tensors), network.equation, list(network.weight_shape), network.scale,
            self.kernel)

    def conv3d(self, layer, x):
        dt = layer.compute_dtype(x)
        x = x.to(dt)
        padding = list(layer.padding)
        if layer.padding_mode != "zeros":
            x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
            padding = [0, 0, 0]
        return torch.ops.tenvoo_fast.adapted_conv3d(
            x, layer.weight, layer.frozen_delta_weight(self), _views(layer.network, layer.cores),
            layer.bias, layer.network.equation, layer.network.scale, list(layer.stride), padding,
            list(layer.dilation), self.kernel)

    def linear(self, layer, x):
        return torch.ops.tenvoo_fast.adapted_linear(
            x.to(layer.compute_dtype(x)), layer.weight, layer.frozen_delta_weight(self),
            _views(layer.network, layer.cores), layer.bias, layer.network.equation,
            layer.network.scale, self.kernel)
