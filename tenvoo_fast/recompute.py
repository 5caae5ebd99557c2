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
from . import factorized, strategy
from . import implicit_gemm  # noqa: F401  (registers the implicit-gemm ops)
from .networks import QUANTA_ACTIVATION_EQUATION


def _views(network, tensors):
    return [t.reshape(core.contraction_shape) for t, core in zip(tensors, network.cores)]


class RecomputeBackend:
    name = "recompute"
    priority = 10
    kernel = "torch"  # who runs the weight-sized steps of the ops (see ops.py)

    def auto_priority(self, device_type: str, layer=None):
        """Rank under ``auto`` for this device and layer (None: never chosen automatically).

        Measured, and why the reference wins where it does:
        - CUDA: the pure-torch recompute path is launch-bound (paper preset, H100, bf16: 695
          vs 514 ms per step), so the reference ranks first there.
        - CPU, Conv3d: recompute is the faster one (e.g. TenVOO-L r=4 512->512: ~0.7x).
        - CPU, Linear: on every DDPM Linear shape the reference was as fast or faster (e.g.
          QuanTA 256->256 on 384 rows: 1.4 vs 2.1 ms); those weights are at most 1 MB, so
          the weight-sized tensors it keeps cost little.
        """
        if device_type != "cpu" or isinstance(layer, torch.nn.Linear):
            return -10
        return self.priority

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
        conv = list(layer.stride) + padding + list(layer.dilation)
        out_spatial = ops.conv_output_spatial(x.shape[2:], layer.kernel_size, layer.stride,
                                              padding, layer.dilation)
        chosen = strategy.conv_strategy(layer, x.shape, out_spatial, self.kernel)
        if chosen != "merged":
            frozen = [] if layer.frozen_cores is None else list(layer.frozen_cores)
            args = (x, layer.weight, list(layer.cores), frozen, layer.bias,
                    layer.network.equation, ",".join(factorized.network_letters(layer.network)),
                    layer.network.scale, conv)
            if chosen == "factorized":
                return torch.ops.tenvoo_fast.factored_conv3d(*args, self.kernel)
            return torch.ops.tenvoo_fast.implicit_conv3d(*args)
        return torch.ops.tenvoo_fast.adapted_conv3d(
            x, layer.weight, layer.frozen_delta_weight(self), _views(layer.network, layer.cores),
            layer.bias, layer.network.equation, layer.network.scale, conv[0:3], conv[3:6],
            conv[6:9], self.kernel)

    def linear(self, layer, x):
        x = x.to(layer.compute_dtype(x))
        if strategy.linear_strategy(layer, x.numel() // x.shape[-1], self.kernel) == "factorized":
            frozen = [] if layer.frozen_cores is None else list(layer.frozen_cores)
            return torch.ops.tenvoo_fast.factored_linear(
                x, layer.weight, list(layer.cores), frozen, layer.bias,
                QUANTA_ACTIVATION_EQUATION, layer.network.scale)
        return torch.ops.tenvoo_fast.adapted_linear(
            x, layer.weight, layer.frozen_delta_weight(self),
            _views(layer.network, layer.cores), layer.bias, layer.network.equation,
            layer.network.scale, self.kernel)
