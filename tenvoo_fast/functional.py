"""Adapted Conv3d, Conv2d and Linear forwards as functions of the layer and the input: what the
layers in :mod:`tenvoo_fast.nn` and :mod:`tenvoo_fast.methods` call.

Each asks :mod:`tenvoo_fast.dispatch` which backend and strategy run the layer, then runs them:
the reference (the published contraction and the framework's conv/linear, autograd through
both) or one of the ``torch.library`` ops of :mod:`tenvoo_fast.ops` with the backend's kernels
(in eager mode through the same bodies, :func:`tenvoo_fast.ops.autograd.call`).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from . import dispatch, ops  # noqa: F401  (ops registers torch.ops.tenvoo_fast)
from .contraction import reference
from .contraction.partition import channel_letters
from .dispatch import context
from .kernels import native_layer
from .ops.autograd import call
from .ops.geometry import ConvGeometry


def adapted_conv3d(layer, x: torch.Tensor) -> torch.Tensor:
    """``layer`` (an adapted Conv3d) applied to ``x`` by the backend and strategy dispatch
    chooses."""
    return _run(layer, x, _reference_conv, _fast_conv3d)


def adapted_conv2d(layer, x: torch.Tensor) -> torch.Tensor:
    """``layer`` (an adapted Conv2d) applied to ``x``: by the reference, the one backend dispatch
    picks for a Conv2d (a named fast backend is refused, saying so)."""
    return _run(layer, x, _reference_conv, None)


def adapted_linear(layer, x: torch.Tensor) -> torch.Tensor:
    """``layer`` (an adapted Linear) applied to ``x``, as :func:`adapted_conv3d`."""
    return _run(layer, x, _reference_linear, _fast_linear)


def _run(layer, x, reference_op, fast_op):
    x = layer.check_input(x)
    if x.device.type == "meta":
        # Shape-only (a model built under torch.device("meta")): every backend's output has
        # the reference's shape and dtype, and only the reference's plain torch ops run on
        # meta tensors, whichever backend is selected.
        layer.execution_backend, layer.execution_strategy = "reference", None
        return reference_op(layer, x)
    backend, tuned = dispatch.backend_for(layer, x)
    with context.tuned(tuned) if tuned is not None else contextlib.nullcontext():
        if backend.impl is None:
            return reference_op(layer, x)
        return fast_op(layer, x, backend)


def lora_bypass_conv(layer, x: torch.Tensor) -> torch.Tensor:
    """``conv(x, W) + s * up(down(x))``: a LoRA Conv3d / Conv2d in peft's bypass form (always
    torch)."""
    x = layer.check_input(x)
    dt = layer.compute_dtype(x)
    base = layer._conv_forward(x, layer.weight.to(dt), None if layer.bias is None
                               else layer.bias.to(dt))
    h = layer._conv_forward(x, layer.down.to(dt), None)
    conv = F.conv3d if layer.weight.dim() == 5 else F.conv2d
    return base + layer.network.scale * conv(h, layer.up.to(dt))


def delta_weight(network, tensors, backend) -> torch.Tensor:
    """ΔW of ``network`` from stored-shape ``tensors`` by ``backend``'s kernels, fp32 (fp64)."""
    if backend.impl is None:
        return reference.delta_weight(network, tensors)
    return torch.ops.tenvoo_fast.build_delta(
        network.views(tensors), network.equation, list(network.weight_shape), network.scale,
        backend.impl)


def _bias(layer, x):
    b = layer.bias
    return None if b is None else b.to(layer.compute_dtype(x))


def _frozen_cores(layer) -> list:
    """The frozen cores the factorized paths subtract; none once T(θ0) is in the weight."""
    if layer.frozen_cores is None or layer.frozen_folded:
        return []
    return list(layer.frozen_cores._buffers.values())


def _frozen_delta(layer, backend) -> list:
    t = layer.frozen_delta_weight(backend)
    return [] if t is None else [t]


def _reference_conv(layer, x):
    return layer._conv_forward(x, layer.effective_weight().to(layer.compute_dtype(x)),
                               _bias(layer, x))


def _reference_linear(layer, x):
    return F.linear(x, layer.effective_weight().to(layer.compute_dtype(x)), _bias(layer, x))


def _keep_weight(x) -> bool:
    """Keep the effective weight for backward: the policy says so and the backward will need
    it (for the input's gradient)."""
    return (x.requires_grad and torch.is_grad_enabled()
            and dispatch.current_weight_policy() == "keep")


def _fast_conv3d(layer, x, backend):
    dt = layer.compute_dtype(x)
    x = x.to(dt)
    padding = tuple(layer.padding)
    if layer.padding_mode != "zeros":
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        padding = (0, 0, 0)
    geo = ConvGeometry(tuple(layer.stride), padding, tuple(layer.dilation))
    out_spatial = geo.output_spatial(x.shape[2:], layer.kernel_size)
    chosen = dispatch.conv_strategy(layer, x.shape, out_spatial, backend.impl, x.device.type,
                                    x.dtype)
    net = layer.network
    if chosen == "merged":
        cores, frozen = layer.core_list(), _frozen_delta(layer, backend)
        if dispatch.runs_native_layer(backend.impl, x, layer.weight, cores, frozen):
            return native_layer.merged(net, x, layer.weight, cores, frozen[0] if frozen else None,
                                       layer.bias, tuple(geo.pack()), _keep_weight(x))
        return call(ops.merged.merged_conv3d,
                    x, layer.weight, net.views(cores), frozen, layer.bias, net.equation,
                    net.scale, geo.pack(), backend.impl, _keep_weight(x))[0]
    op = (ops.factorized.factorized_conv3d if chosen == "factorized"
          else ops.implicit_gemm.implicit_conv3d)
    return call(op, x, layer.weight, layer.core_list(), _frozen_cores(layer), layer.bias,
                net.equation, ",".join(channel_letters(net)), net.scale, geo.pack(),
                backend.impl)


def _fast_linear(layer, x, backend):
    x = x.to(layer.compute_dtype(x))
    net = layer.network
    if dispatch.linear_strategy(layer, x.numel() // x.shape[-1], backend.impl,
                                x.device.type, x.dtype) == "factorized":
        return call(ops.factorized.factorized_linear,
                    x, layer.weight, layer.core_list(), _frozen_cores(layer), layer.bias,
                    layer.activation_equation, net.scale)
    cores, frozen = layer.core_list(), _frozen_delta(layer, backend)
    if dispatch.runs_native_layer(backend.impl, x, layer.weight, cores, frozen):
        return native_layer.merged(net, x, layer.weight, cores, frozen[0] if frozen else None,
                                   layer.bias, (), _keep_weight(x))
    return call(ops.merged.merged_linear,
                x, layer.weight, net.views(cores), frozen, layer.bias, net.equation, net.scale,
                backend.impl, _keep_weight(x))[0]
