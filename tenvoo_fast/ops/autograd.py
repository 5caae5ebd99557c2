"""The autograd of every adapted op, registered once: save only the inputs, recompute the rest.

Every adapted op is ``op(x, base, cores, frozen, bias, *args)`` (``frozen`` empty: no frozen
copy) with a backward op ``backward_op(grad_out, x, base, cores, frozen, bias, need_x,
need_bias, *args) -> [grad_x, grad_bias, *grad_cores]``; unneeded gradients come back as
separate empty tensors (a custom op's outputs may not alias each other).
"""
from __future__ import annotations

from typing import Callable

import torch


def register_recompute_autograd(op, backward_op, grad_x_like: Callable) -> None:
    """Autograd for ``op`` through ``backward_op``, and ``backward_op``'s fake kernel, whose
    input gradient is ``grad_x_like(x)`` (the real kernel's layout)."""
    def setup_context(ctx, inputs, output):
        x, base, cores, frozen, bias, *args = inputs
        ctx.save_for_backward(x, base, bias, *cores, *frozen)
        ctx.n_cores, ctx.n_frozen, ctx.args = len(cores), len(frozen), args

    def backward(ctx, grad_out):
        x, base, bias, *rest = ctx.saved_tensors
        cores, frozen = rest[:ctx.n_cores], rest[ctx.n_cores:]
        need_x = ctx.needs_input_grad[0]
        need_b = bias is not None and ctx.needs_input_grad[4]
        gx, gb, *grad_cores = backward_op(grad_out, x, base, cores, frozen, bias, need_x, need_b,
                                          *ctx.args)
        return (gx if need_x else None, None, grad_cores, [None] * ctx.n_frozen,
                gb if need_b else None, *[None] * len(ctx.args))

    @backward_op.register_fake
    def _(grad_out, x, base, cores, frozen, bias, need_x, need_bias, *args):
        torch._check(grad_out.dim() == x.dim(),
                     lambda: f"grad_out is {grad_out.dim()}-D, the input {x.dim()}-D")
        return ([grad_x_like(x) if need_x else x.new_empty(0),
                 torch.empty_like(bias) if need_bias else x.new_empty(0)]
                + [torch.empty_like(c) for c in cores])

    op.register_autograd(backward, setup_context=setup_context)
