"""The adapter ops, each defined once with ``torch.library`` (fast-path design 1).

- ``tenvoo_fast::build_delta(cores, ...)``: ΔW = scale * contraction, in the weight's layout.
- ``tenvoo_fast::weight_grad_to_cores(grad_weight, cores, ...)``: every core's gradient from
  dL/dΔW in one environment contraction (reverse sweep over the contraction tree, partial
  products reused), with no state kept from the forward pass.
- ``tenvoo_fast::adapted_conv3d`` / ``adapted_linear``: ``op(x, W + (T(θ) - T(θ0)))`` whose
  backward *recomputes*: only the input, the cores and tensors the layer already owns are saved,
  never the effective weight or the contraction's intermediates.

Each op is defined once; ``kernel`` picks who runs the weight-sized step (the last step of the
contraction tree, fused with ``W - T(θ0)`` and the cast, and the first step of the reverse
sweep): ``"torch"``, the pure-torch default (fp32, or fp64 for fp64 inputs) that runs anywhere,
``"triton"`` (:mod:`tenvoo_fast.triton_kernels`, on CUDA or under ``TRITON_INTERPRET=1``), or
``"native"`` (:mod:`tenvoo_fast.native`: the csrc kernels, C++ on the CPU, CUDA on GPUs).
The small steps run in torch either way, with the redundant axes pre-reduced by
:mod:`simplify`. Each op has a fake kernel, so adapted models trace under ``torch.compile``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import environment, last_step, simplify
from .reference import contraction_dtype


def reduced_cores(cores: list[Tensor], equation: str):
    """(plan, contraction dtype, cores with redundant axes pre-reduced) for the fast kernels."""
    p = simplify.plan(equation, tuple(tuple(c.shape) for c in cores))
    dtype = contraction_dtype(cores)
    return p, dtype, simplify.reduce_cores(p, [c.to(dtype) for c in cores])


def conv_output_spatial(spatial, kernel, stride, padding, dilation) -> list[int]:
    """A Conv3d's output voxel counts (PyTorch's formula), for fake kernels and cost models."""
    return [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, k, s, p, d in
            zip(spatial, kernel, stride, padding, dilation)]


def memory_format(x: Tensor) -> torch.memory_format:
    """The layout the ops give their outputs and input gradients: channels-last for a
    channels-last input (and not also contiguous), else contiguous."""
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(
            memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def conv_output_like(x: Tensor, base: Tensor, conv) -> Tensor:
    """An empty Conv3d output for input ``x`` and weight ``base`` (``conv`` = stride + padding +
    dilation), in x's dtype and :func:`memory_format`: the strategy ops' fake kernels."""
    spatial = conv_output_spatial(x.shape[2:], base.shape[2:], conv[0:3], conv[3:6], conv[6:9])
    return torch.empty((x.shape[0], base.shape[0], *spatial), dtype=x.dtype, device=x.device,
                       memory_format=memory_format(x))


def stored_grads(p, grads, cores) -> list[Tensor]:
    """Gradients of the reduced cores -> gradients of the stored cores (contiguous, core dtype)."""
    return [simplify.expand_grad(p, i, g, tuple(c.shape)).to(c.dtype).contiguous()
            for i, (g, c) in enumerate(zip(grads, cores))]


def _last_step(kernel: str):
    """The module that runs the weight-sized steps: pure torch, the Triton kernels, or the
    native (csrc) ones."""
    if kernel == "triton":
        from .triton_kernels import launch
        return launch
    if kernel == "native":
        from . import native
        return native
    if kernel != "torch":
        raise ValueError(f"unknown kernel {kernel!r}: 'torch', 'triton' or 'native'")
    return last_step


def _contract(cores: list[Tensor], equation: str, weight_shape: list[int], scale: float,
              kernel: str) -> Tensor:
    p, dtype, reduced = reduced_cores(cores, equation)
    steps, nodes = environment.forward_tree(p.equation, reduced)
    lay, left, right = last_step.step_layout(steps[-1], nodes)
    return _last_step(kernel).build(lay, left, right, weight_shape, scale)


# -- build_delta ---------------------------------------------------------------------------------
@torch.library.custom_op("tenvoo_fast::build_delta", mutates_args=())
def build_delta(cores: list[Tensor], equation: str, weight_shape: list[int],
                scale: float, kernel: str) -> Tensor:
    """ΔW = scale * einsum(equation, *cores).reshape(weight_shape), fp32 (fp64 for fp64)."""
    with torch.autocast(cores[0].device.type, enabled=False), torch.no_grad():
        return _contract(cores, equation, weight_shape, scale, kernel)


@build_delta.register_fake
def _(cores, equation, weight_shape, scale, kernel):
    return cores[0].new_empty(weight_shape, dtype=contraction_dtype(cores))


# -- weight_grad_to_cores ------------------------------------------------------------------------
@torch.library.custom_op("tenvoo_fast::weight_grad_to_cores", mutates_args=())
def weight_grad_to_cores(grad_weight: Tensor, cores: list[Tensor], equation: str,
                         weight_shape: list[int], scale: float,
                         kernel: str) -> list[Tensor]:
    """dL/dcore_k for every core, given dL/dΔW (environment contraction, nothing saved)."""
    with torch.autocast(cores[0].device.type, enabled=False), torch.no_grad():
        p, dtype, reduced = reduced_cores(cores, equation)
        steps, nodes = environment.forward_tree(p.equation, reduced)
        grads = _reverse(steps, nodes, reduced, grad_weight, scale, kernel)
        return stored_grads(p, grads, cores)


def _reverse(steps, nodes, reduced, grad_weight, scale, kernel):
    """The reverse sweep from dL/dW; its first (weight-sized) step by ``kernel``."""
    lay, left, right = last_step.step_layout(steps[-1], nodes)
    last = _last_step(kernel).grads(lay, grad_weight, left, right, scale)
    return environment.reverse_tree(steps, nodes, len(reduced), last)


@weight_grad_to_cores.register_fake
def _(grad_weight, cores, equation, weight_shape, scale, kernel):
    return [torch.empty_like(c) for c in cores]


# -- adapted layers ------------------------------------------------------------------------------
def _effective(base, frozen_delta, cores, equation, weight_shape, scale, kernel,
               out_dtype) -> Tensor:
    """W + (T(θ) - T(θ0)), formed in fp32 (fp64) and cast to ``out_dtype`` last, the last
    contraction step fused with the fold (one pass over the weight)."""
    with torch.autocast(base.device.type, enabled=False), torch.no_grad():
        p, _, reduced = reduced_cores(cores, equation)
        steps, nodes = environment.forward_tree(p.equation, reduced)
        return _fused_effective(steps, nodes, base, frozen_delta, weight_shape, scale, kernel,
                                out_dtype)


def _fused_effective(steps, nodes, base, frozen_delta, weight_shape, scale, kernel, out_dtype):
    lay, left, right = last_step.step_layout(steps[-1], nodes)
    return _last_step(kernel).build(lay, left, right, weight_shape, scale, base, frozen_delta,
                                    out_dtype)


@torch.library.custom_op("tenvoo_fast::adapted_conv3d", mutates_args=())
def adapted_conv3d(x: Tensor, base: Tensor, frozen_delta: Optional[Tensor], cores: list[Tensor],
                   bias: Optional[Tensor], equation: str, scale: float, stride: list[int],
                   padding: list[int], dilation: list[int], kernel: str) -> Tensor:
    """conv3d(x, W + (T(θ) - T(θ0)), bias) in x's dtype; the weight formed in fp32 first."""
    w = _effective(base, frozen_delta, cores, equation, list(base.shape), scale, kernel, x.dtype)
    b = None if bias is None else bias.to(x.dtype)
    return F.conv3d(x, w, b, stride, padding, dilation)


@adapted_conv3d.register_fake
def _(x, base, frozen_delta, cores, bias, equation, scale, stride, padding, dilation,
      kernel):
    spatial = conv_output_spatial(x.shape[2:], base.shape[2:], stride, padding, dilation)
    return x.new_empty((x.shape[0], base.shape[0], *spatial))


@torch.library.custom_op("tenvoo_fast::adapted_linear", mutates_args=())
def adapted_linear(x: Tensor, base: Tensor, frozen_delta: Optional[Tensor], cores: list[Tensor],
                   bias: Optional[Tensor], equation: str, scale: float,
                   kernel: str) -> Tensor:
    """linear(x, W + (T(θ) - T(θ0)), bias) in x's dtype; the weight formed in fp32 first."""
    w = _effective(base, frozen_delta, cores, equation, list(base.shape), scale, kernel, x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


@adapted_linear.register_fake
def _(x, base, frozen_delta, cores, bias, equation, scale, kernel):
    return x.new_empty((*x.shape[:-1], base.shape[0]))


@torch.library.custom_op("tenvoo_fast::adapted_backward", mutates_args=())
def adapted_backward(grad_out: Tensor, x: Tensor, base: Tensor, frozen_delta: Optional[Tensor],
                     cores: list[Tensor], bias: Optional[Tensor], need_x: bool, need_bias: bool,
                     equation: str, scale: float, conv: list[int],
                     kernel: str) -> list[Tensor]:
    """[grad_x, grad_bias, *grad_cores] of an adapted conv3d (``conv`` = stride + padding +
    dilation, 9 ints) or linear (``conv`` empty); unneeded gradients come back empty.

    One forward sweep of the contraction tree rebuilds T(θ) (and keeps its partial products for
    this call only), the framework's conv/linear backward runs once on the rebuilt effective
    weight, and the reverse sweep turns dL/dW into every core's gradient.
    """
    with torch.autocast(x.device.type, enabled=False), torch.no_grad():
        shape = list(base.shape)
        p, dtype, reduced = reduced_cores(cores, equation)
        steps, nodes = environment.forward_tree(p.equation, reduced)
        w = (_fused_effective(steps, nodes, base, frozen_delta, shape, scale, kernel, x.dtype)
             if need_x else None)
        g = grad_out.to(x.dtype)
        if conv:
            stride, padding, dilation = conv[0:3], conv[3:6], conv[6:9]
            gx, gw, gb = torch.ops.aten.convolution_backward(
                g, x, w if w is not None else base.to(x.dtype), [shape[0]] if need_bias else None,
                stride, padding, dilation, False, [0, 0, 0], 1, [need_x, True, need_bias])
        else:
            g2, x2 = g.reshape(-1, shape[0]), x.reshape(-1, shape[1])
            gw = g2.t().matmul(x2)
            gx = g.matmul(w) if need_x else None
            gb = g2.sum(0) if need_bias else None
        grads = _reverse(steps, nodes, reduced, gw, scale, kernel)
        core_grads = stored_grads(p, grads, cores)
        # Separate empties: a custom op's outputs may not alias each other.
        return [gx.contiguous() if gx is not None else x.new_empty(0),
                gb.to(bias.dtype) if gb is not None else x.new_empty(0)] + core_grads


@adapted_backward.register_fake
def _(grad_out, x, base, frozen_delta, cores, bias, need_x, need_bias, equation, scale, conv,
      kernel):
    return ([torch.empty_like(x) if need_x else x.new_empty(0),
             torch.empty_like(bias) if need_bias else x.new_empty(0)]
            + [torch.empty_like(c) for c in cores])


def _setup_context(ctx, inputs, output):
    x, base, frozen_delta, cores, bias, equation, scale, *rest = inputs
    kernel = rest.pop()
    ctx.save_for_backward(x, base, frozen_delta, bias, *cores)
    ctx.equation, ctx.scale, ctx.kernel = equation, scale, kernel
    ctx.conv = [v for c in rest for v in c]
    ctx.n_nontensor = len(inputs) - 5


def _backward(ctx, grad_out):
    x, base, frozen_delta, bias, *cores = ctx.saved_tensors
    need_x = ctx.needs_input_grad[0]
    need_b = bias is not None and ctx.needs_input_grad[4]
    gx, gb, *grad_cores = torch.ops.tenvoo_fast.adapted_backward(
        grad_out, x, base, frozen_delta, cores, bias, need_x, need_b, ctx.equation, ctx.scale,
        ctx.conv, ctx.kernel)
    return (gx if need_x else None, None, None, grad_cores, gb if need_b else None,
            *[None] * ctx.n_nontensor)


adapted_conv3d.register_autograd(_backward, setup_context=_setup_context)
adapted_linear.register_autograd(_backward, setup_context=_setup_context)
