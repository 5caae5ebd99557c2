"""The ``implicit-gemm`` strategy's ops: the Conv3d runs as an implicit GEMM whose weight tiles
are generated from the cores on chip, so no weight-sized tensor exists in forward or backward,
and the weight gradient goes straight into the cores' gradients.

The small steps of the contraction run in torch as for ``merged``, along the tree of
:func:`tenvoo_fast.contraction.generation.split_tree`, whose last step ``T = P·Q`` is never
formed but fused into the convolution (Triton kernels: :func:`tenvoo_fast.kernels.implicit_conv`).
Backward recomputes P and Q (and keeps the small partial products for this call only): the
input gradient is a second implicit GEMM, and the weight gradient is reduced tile by tile into
dL/dP and dL/dQ, from which the reverse sweep gives every core's gradient. Only the input and
the layer's own tensors are saved.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import kernels
from ..contraction import last_step, sweep
from ..contraction.generation import split_tree
from ..contraction.prereduce import reduced_cores, stored_grads
from .autograd import register_recompute_autograd
from .define import custom_op, exact_math
from .geometry import ConvGeometry, register_cores_conv_fake, input_grad_like, memory_format


def _operands(cores, equation, letters):
    """(plan, reduced cores, steps, nodes, layout, generation, P, Q), P and Q in fp32."""
    p, _, reduced = reduced_cores(cores, equation)
    steps, lay, gen = split_tree(p.equation, tuple(tuple(c.shape) for c in reduced), letters)
    steps, nodes = sweep.forward_tree(p.equation, reduced, steps)
    left, right = nodes[steps[-1].left], nodes[steps[-1].right]
    a, b = last_step.operands(lay, left, right, torch.float32)
    P, Q = (a, b) if gen.p_side == "left" else (b, a)
    return p, reduced, steps, nodes, lay, gen, P, Q


def _frozen_operands(frozen, equation, letters):
    if not frozen:
        return None, None
    return _operands(frozen, equation, letters)[-2:]


@custom_op("tenvoo_fast::implicit_conv3d", mutates_args=())
def implicit_conv3d(x: Tensor, base: Tensor, cores: list[Tensor], frozen: list[Tensor],
                    bias: Optional[Tensor], equation: str, letters: str, scale: float,
                    conv: list[int], impl: str) -> Tensor:
    """``conv3d(x, W + scale*(T(θ) - T(θ0)), bias)`` with the weight generated tile by tile
    inside an implicit GEMM (``letters`` = "out,in,tap", ``conv`` = stride + padding +
    dilation; ``frozen``: the frozen cores, empty for no frozen copy)."""
    with exact_math(x.device.type):
        *_, gen, P, Q = _operands(cores, equation, letters)
        P0, Q0 = _frozen_operands(frozen, equation, letters)
        geo = ConvGeometry.unpack(conv)
        spatial = geo.output_spatial(x.shape[2:], base.shape[2:])
        return kernels.implicit_conv(impl).forward(x, gen, P, Q, P0, Q0, base, bias, scale, geo,
                                                   spatial, memory_format(x))


register_cores_conv_fake(implicit_conv3d)


@custom_op("tenvoo_fast::implicit_conv3d_backward", mutates_args=())
def implicit_conv3d_backward(grad_out: Tensor, x: Tensor, base: Tensor, cores: list[Tensor],
                             frozen: list[Tensor], bias: Optional[Tensor], need_x: bool,
                             need_bias: bool, equation: str, letters: str, scale: float,
                             conv: list[int], impl: str) -> list[Tensor]:
    """[grad_x, grad_bias, *grad_cores] of :func:`implicit_conv3d`: P and Q recomputed, the input
    gradient by a second implicit GEMM, dL/dW reduced tile by tile into dL/dP and dL/dQ."""
    with exact_math(x.device.type):
        p, reduced, steps, nodes, lay, gen, P, Q = _operands(cores, equation, letters)
        launch = kernels.implicit_conv(impl)
        geo = ConvGeometry.unpack(conv)
        g = grad_out.to(x.dtype)
        dP, dQ = launch.operand_grads(x, g, gen, P, Q, scale, geo, list(base.shape[2:]))
        da, db = (dP, dQ) if gen.p_side == "left" else (dQ, dP)
        grads = sweep.reverse_tree(steps, nodes, len(reduced), (
            last_step.unmatrix(da, lay, lay.batch + lay.rows + lay.bond, lay.left_idx),
            last_step.unmatrix(db, lay, lay.batch + lay.bond + lay.cols, lay.right_idx)))
        core_grads = stored_grads(p, grads, cores)
        gx = x.new_empty(0)  # (separate empties: a custom op's outputs may not alias)
        if need_x:
            P0, Q0 = _frozen_operands(frozen, equation, letters)
            gx = launch.input_grad(g, list(x.shape), gen, P, Q, P0, Q0, base, scale, geo,
                                   memory_format(x))
        gb = g.sum((0, 2, 3, 4)).to(bias.dtype) if need_bias else x.new_empty(0)
        return [gx, gb] + core_grads


register_recompute_autograd(implicit_conv3d, implicit_conv3d_backward, input_grad_like)
