"""The ``merged`` strategy's ops: build the effective weight, run the framework's conv/linear.

- ``tenvoo_fast::build_delta(cores, ...)``: ΔW = scale * contraction, in the weight's layout.
- ``tenvoo_fast::weight_grad_to_cores(grad_weight, cores, ...)``: every core's gradient from
  dL/dΔW in one reverse sweep of the contraction tree (partial products reused), with no state
  kept from the forward pass.
- ``tenvoo_fast::merged_conv3d`` / ``merged_linear``: ``op(x, W + (T(θ) - T(θ0)))`` whose
  backward *recomputes*: only the input, the cores and tensors the layer already owns are saved,
  never the effective weight or the contraction's intermediates.

``impl`` picks who runs the contraction (:mod:`tenvoo_fast.kernels`): ``torch`` runs the
compiled program (:mod:`tenvoo_fast.contraction.program`) as strided GEMMs; ``triton`` runs the
same program in a few launches (the small steps in one kernel, the weight-sized step fused with
``W - T(θ0)`` and the cast in another: five launches per training step); ``native`` runs the
weight-sized step in csrc and the small steps in torch. The redundant axes are pre-reduced
first (:mod:`tenvoo_fast.contraction.prereduce`). Each op has a fake kernel, so adapted models trace
under ``torch.compile``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import kernels
from ..kernels import workspace
from ..contraction import last_step, program, sweep
from ..contraction.prereduce import plan, reduced_cores, stored_grads
from ..contraction.reference import contraction_dtype
from .autograd import register_recompute_autograd
from .define import custom_op, exact_math
from .geometry import (ConvGeometry, check_conv_args, check_linear_args, conv_output_like,
                       memory_format)

#: How many tensors ``frozen`` holds for the merged ops: none, or T(θ0).
FROZEN_COUNTS = (0, 1)


def _compiled(cores: list[Tensor], equation: str):
    """(pre-reduction plan, reduced cores, :class:`~tenvoo_fast.contraction.program.Program`):
    how the ``torch`` kernels run the whole contraction (strided GEMMs, no operand copies)."""
    p, _, reduced = reduced_cores(cores, equation)
    return p, reduced, program.program_for(p.equation, p.shapes)


def _fused(cores: list[Tensor], equation: str, impl: str):
    """The one-launch tree program (:mod:`tenvoo_fast.triton_kernels.launch_tree`) when ``impl``
    has one and can run these cores (fp32), else None."""
    if impl != "triton" or any(c.dtype != torch.float32 for c in cores):
        return None
    # Core shapes are fixed by the adapter (int() specialises symbolic ones when tracing).
    return kernels.tree(impl).fused_for(equation, _shapes(cores))


def _shapes(cores) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(int(d) for d in c.shape) for c in cores)


def saved_numel(cores: list[Tensor], equation: str, impl: str) -> int:
    """Elements of the buffer a merged op keeps from forward for backward (the program's
    small intermediates; none for the kernels that rebuild them)."""
    fused = _fused(cores, equation, impl)
    if fused is not None:
        return fused.saved_numel
    if impl != "torch":
        return 0
    p = plan(equation, _shapes(cores))
    return program.kept_numel(program.program_for(p.equation, p.shapes))


def _contract(cores: list[Tensor], equation: str, weight_shape: list[int], scale: float,
              impl: str) -> Tensor:
    fused = _fused(cores, equation, impl)
    if fused is not None:
        tree = kernels.tree(impl)
        return tree.build(fused, tree.forward(fused, cores), cores, weight_shape, scale)
    if impl == "torch":
        _, reduced, prog = _compiled(cores, equation)
        _, left, right = program.run_forward(prog, reduced)
        return kernels.last_step("torch").build_weight(prog, left, right, weight_shape, scale)
    p, dtype, reduced = reduced_cores(cores, equation)
    steps, nodes = sweep.forward_tree(p.equation, reduced)
    lay, left, right = last_step.step_layout(steps[-1], nodes)
    return kernels.last_step(impl).build(lay, left, right, weight_shape, scale)


# -- build_delta ---------------------------------------------------------------------------------
@custom_op("tenvoo_fast::build_delta", mutates_args=())
def build_delta(cores: list[Tensor], equation: str, weight_shape: list[int],
                scale: float, impl: str) -> Tensor:
    """ΔW = scale * einsum(equation, *cores).reshape(weight_shape), fp32 (fp64 for fp64)."""
    with exact_math(cores[0].device.type):
        return _contract(cores, equation, weight_shape, scale, impl)


@build_delta.register_fake
def _(cores, equation, weight_shape, scale, impl):
    torch._check(len(equation.split("->")[0].split(",")) == len(cores),
                 lambda: f"{equation} names {equation.count(',') + 1} cores, got {len(cores)}")
    return cores[0].new_empty(weight_shape, dtype=contraction_dtype(cores))


# -- weight_grad_to_cores ------------------------------------------------------------------------
@custom_op("tenvoo_fast::weight_grad_to_cores", mutates_args=())
def weight_grad_to_cores(grad_weight: Tensor, cores: list[Tensor], equation: str,
                         weight_shape: list[int], scale: float, impl: str) -> list[Tensor]:
    """dL/dcore_k for every core, given dL/dΔW (reverse sweep, nothing saved)."""
    with exact_math(cores[0].device.type):
        fused = _fused(cores, equation, impl)
        if fused is not None:
            tree = kernels.tree(impl)
            return tree.core_grads(fused, tree.forward(fused, cores), cores, grad_weight, scale)
        if impl == "torch":
            p, reduced, prog = _compiled(cores, equation)
            kept, _, _ = program.run_forward(prog, reduced)
            g = kernels.last_step("torch").grad_gemm(prog, grad_weight, scale, reduced[0].dtype)
            return split_grads(program.run_backward(prog, reduced, kept, g, p), cores)
        p, dtype, reduced = reduced_cores(cores, equation)
        steps, nodes = sweep.forward_tree(p.equation, reduced)
        grads = _reverse(steps, nodes, reduced, grad_weight, scale, impl)
        return stored_grads(p, grads, cores)


def split_grads(flat: Tensor, cores: list[Tensor]) -> list[Tensor]:
    """The cores' gradients as views of ``flat`` (back to back, in the cores' dtype: one cast
    when it differs); the eager autograd takes views as they are, a custom op's return is
    unaliased by :func:`~tenvoo_fast.ops.define.custom_op`."""
    if all(c.dtype == cores[0].dtype for c in cores) and flat.dtype != cores[0].dtype:
        flat = flat.to(cores[0].dtype)
    out, at = [], 0
    for c in cores:
        n = c.numel()
        out.append(flat[at:at + n].view(c.shape).to(c.dtype))
        at += n
    return out


def _reverse(steps, nodes, reduced, grad_weight, scale, impl):
    """The reverse sweep from dL/dW; its first (weight-sized) step by ``impl``."""
    lay, left, right = last_step.step_layout(steps[-1], nodes)
    last = kernels.last_step(impl).grads(lay, grad_weight, left, right, scale)
    return sweep.reverse_tree(steps, nodes, len(reduced), last)


@weight_grad_to_cores.register_fake
def _(grad_weight, cores, equation, weight_shape, scale, impl):
    torch._check(list(grad_weight.shape) == list(weight_shape),
                 lambda: f"grad_weight is {list(grad_weight.shape)}, the weight {weight_shape}")
    return [torch.empty_like(c) for c in cores]


# -- merged conv3d / linear ----------------------------------------------------------------------
def _fused_effective(steps, nodes, base, frozen, weight_shape, scale, impl, out_dtype):
    """W + (T(θ) - T(θ0)), formed in fp32 (fp64) and cast to ``out_dtype`` last, the last
    contraction step fused with the fold (one pass over the weight)."""
    lay, left, right = last_step.step_layout(steps[-1], nodes)
    frozen_delta = frozen[0] if frozen else None
    return kernels.last_step(impl).build(lay, left, right, weight_shape, scale, base,
                                         frozen_delta, out_dtype)


def _effective(base, frozen, cores, equation, scale, impl, out_dtype,
               keep: bool = False) -> tuple[Tensor, Tensor]:
    """(effective weight, what backward keeps: the program's small intermediates (``torch``)
    or nothing (the other kernels rebuild them)); ``keep``: the weight outlives the op (a
    fresh tensor, not the CPU scratch buffer)."""
    if keep:
        with workspace.kept("weight"):
            return _effective(base, frozen, cores, equation, scale, impl, out_dtype)
    with exact_math(base.device.type):
        fused = _fused(cores, equation, impl)
        if fused is not None:
            tree = kernels.tree(impl)
            saved = tree.forward(fused, cores)
            return tree.build(fused, saved, cores, list(base.shape), scale, base,
                              frozen[0] if frozen else None, out_dtype), saved
        if impl == "torch":
            _, reduced, prog = _compiled(cores, equation)
            saved, left, right = program.run_forward(prog, reduced)
            return kernels.last_step("torch").build_weight(
                prog, left, right, list(base.shape), scale, base,
                frozen[0] if frozen else None, out_dtype), saved
        p, _, reduced = reduced_cores(cores, equation)
        steps, nodes = sweep.forward_tree(p.equation, reduced)
        return _fused_effective(steps, nodes, base, frozen, list(base.shape), scale, impl,
                                out_dtype), base.new_empty(0, dtype=reduced[0].dtype)


@custom_op("tenvoo_fast::merged_conv3d", mutates_args=())
def merged_conv3d(x: Tensor, base: Tensor, cores: list[Tensor], frozen: list[Tensor],
                  bias: Optional[Tensor], equation: str, scale: float, conv: list[int],
                  impl: str, keep_weight: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(conv3d(x, W + (T(θ) - T(θ0)), bias) in x's dtype, the weight formed in fp32 first;
    what backward keeps: the contraction's small intermediates, and the effective weight if
    ``keep_weight`` (else an empty tensor: backward rebuilds it)); ``frozen`` is ``[T(θ0)]``
    (empty: no frozen copy), ``conv`` stride + padding + dilation. The output is in x's
    :func:`memory_format` whatever layout the framework's conv picks (as the fake kernel
    says)."""
    w, saved = _effective(base, frozen, cores, equation, scale, impl, x.dtype, keep_weight)
    b = None if bias is None else bias.to(x.dtype)
    g = ConvGeometry.unpack(conv)
    y = F.conv3d(x, w, b, g.stride, g.padding, g.dilation)
    return y.contiguous(memory_format=memory_format(x)), saved, _kept_weight(w, x, keep_weight)


def _kept_weight(w: Tensor, x: Tensor, keep: bool) -> Tensor:
    return w if keep else x.new_empty(0)


@merged_conv3d.register_fake
def _(x, base, cores, frozen, bias, equation, scale, conv, impl, keep_weight):
    check_conv_args(x, base, cores, frozen, bias, conv, FROZEN_COUNTS)
    return (conv_output_like(x, base, conv), _saved_like(cores, equation, impl),
            _weight_like(base, x, keep_weight))


def _weight_like(base: Tensor, x: Tensor, keep: bool) -> Tensor:
    return base.new_empty(base.shape, dtype=x.dtype) if keep else x.new_empty(0)


def _saved_like(cores, equation, impl) -> Tensor:
    return cores[0].new_empty(saved_numel(cores, equation, impl),
                              dtype=contraction_dtype(cores))


@custom_op("tenvoo_fast::merged_linear", mutates_args=())
def merged_linear(x: Tensor, base: Tensor, cores: list[Tensor], frozen: list[Tensor],
                  bias: Optional[Tensor], equation: str, scale: float,
                  impl: str, keep_weight: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(linear(x, W + (T(θ) - T(θ0)), bias) in x's dtype, the weight formed in fp32 first;
    what backward keeps, as :func:`merged_conv3d`)."""
    w, saved = _effective(base, frozen, cores, equation, scale, impl, x.dtype, keep_weight)
    return (F.linear(x, w, None if bias is None else bias.to(x.dtype)), saved,
            _kept_weight(w, x, keep_weight))


@merged_linear.register_fake
def _(x, base, cores, frozen, bias, equation, scale, impl, keep_weight):
    check_linear_args(x, base, cores, frozen, bias, FROZEN_COUNTS)
    return (x.new_empty((*x.shape[:-1], base.shape[0])), _saved_like(cores, equation, impl),
            _weight_like(base, x, keep_weight))


def _backward(grad_out, x, base, cores, frozen, bias, saved, weight, need_x, need_bias, equation,
              scale, conv, impl) -> list[Tensor]:
    """[grad_x, grad_bias, *grad_cores] of a merged conv3d (``conv``: 9 ints) or linear
    (``conv`` empty); unneeded gradients come back empty.

    The effective weight is ``weight`` where the forward kept it, else rebuilt (its small
    intermediates come from ``saved`` with the ``torch`` kernels, else from a new forward
    sweep kept for this call only); the framework's conv/linear backward runs once on it, and
    the reverse sweep turns dL/dW into every core's gradient.
    """
    rebuild = need_x and weight.numel() == 0
    with exact_math(x.device.type):
        shape = list(base.shape)
        fused = _fused(cores, equation, impl)
        if fused is not None:
            w = (kernels.tree(impl).build(fused, saved, cores, shape, scale, base,
                                          frozen[0] if frozen else None, x.dtype)
                 if rebuild else None)
        elif impl == "torch":
            p = plan(equation, _shapes(cores))
            prog = program.program_for(p.equation, p.shapes)
            # The forward packed the pre-reduced cores into ``saved`` (all, or none of them).
            reduced = (None if program.keeps_cores(prog) else
                       reduced_cores(cores, equation)[2])
            left, right, state = program.operands(prog, reduced, saved, p)
            w = (kernels.last_step("torch").build_weight(prog, left, right, shape, scale, base,
                                                      frozen[0] if frozen else None, x.dtype)
                 if rebuild else None)
        else:
            p, dtype, reduced = reduced_cores(cores, equation)
            steps, nodes = sweep.forward_tree(p.equation, reduced)
            w = (_fused_effective(steps, nodes, base, frozen, shape, scale, impl, x.dtype)
                 if rebuild else None)
        if need_x and not rebuild:
            w = weight
        g = grad_out.to(x.dtype)
        if conv:
            geo = ConvGeometry.unpack(conv)
            gx, gw, gb = torch.ops.aten.convolution_backward(
                g, x, w if w is not None else base.to(x.dtype), [shape[0]] if need_bias else None,
                geo.stride, geo.padding, geo.dilation, False, [0, 0, 0], 1,
                [need_x, True, need_bias])
        else:
            g2, x2 = g.reshape(-1, shape[0]), x.reshape(-1, shape[1])
            gw = g2.t().matmul(x2)
            gx = g.matmul(w) if need_x else None
            gb = g2.sum(0) if need_bias else None
        if fused is not None:
            core_grads = kernels.tree(impl).core_grads(fused, saved, cores, gw, scale)
        elif impl == "torch":
            gt = kernels.last_step("torch").grad_gemm(prog, gw, scale, contraction_dtype(cores))
            core_grads = split_grads(program.run_backward(prog, reduced, saved, gt, p, state),
                                     cores)
        else:
            core_grads = stored_grads(p, _reverse(steps, nodes, reduced, gw, scale, impl), cores)
        # Separate empties: a custom op's outputs may not alias each other.
        return [gx.contiguous() if gx is not None else x.new_empty(0),
                gb.to(bias.dtype) if gb is not None else x.new_empty(0)] + core_grads


@custom_op("tenvoo_fast::merged_conv3d_backward", mutates_args=())
def merged_conv3d_backward(grad_out: Tensor, x: Tensor, base: Tensor, cores: list[Tensor],
                           frozen: list[Tensor], bias: Optional[Tensor], saved: Tensor,
                           weight: Tensor, need_x: bool, need_bias: bool, equation: str,
                           scale: float, conv: list[int], impl: str,
                           keep_weight: bool) -> list[Tensor]:
    """[grad_x, grad_bias, *grad_cores] of :func:`merged_conv3d` (``weight``: the effective
    weight it kept, or empty)."""
    return _backward(grad_out, x, base, cores, frozen, bias, saved, weight, need_x, need_bias,
                     equation, scale, conv, impl)


@custom_op("tenvoo_fast::merged_linear_backward", mutates_args=())
def merged_linear_backward(grad_out: Tensor, x: Tensor, base: Tensor, cores: list[Tensor],
                           frozen: list[Tensor], bias: Optional[Tensor], saved: Tensor,
                           weight: Tensor, need_x: bool, need_bias: bool, equation: str,
                           scale: float, impl: str,
                           keep_weight: bool) -> list[Tensor]:
    """[grad_x, grad_bias, *grad_cores] of :func:`merged_linear`."""
    return _backward(grad_out, x, base, cores, frozen, bias, saved, weight, need_x, need_bias,
                     equation, scale, [], impl)


def _contiguous_like(x: Tensor) -> Tensor:
    """The merged ops' input gradient: contiguous, whatever x's layout."""
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


register_recompute_autograd(merged_conv3d, merged_conv3d_backward, _contiguous_like, keeps=2)
register_recompute_autograd(merged_linear, merged_linear_backward, _contiguous_like, keeps=2)
