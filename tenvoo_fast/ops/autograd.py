"""The autograd of every adapted op, registered once: save only the inputs, recompute the rest.

Every adapted op is ``op(x, base, cores, frozen, bias, *args)`` (``frozen`` empty: no frozen
copy) with a backward op ``backward_op(grad_out, x, base, cores, frozen, bias, need_x,
need_bias, *args) -> [grad_x, grad_bias, *grad_cores]``; unneeded gradients come back as
separate empty tensors (a custom op's outputs may not alias each other).

An op registered with ``keeps=k`` returns ``(output, *kept)``: the ``k`` kept tensors (forward
results the backward reuses, not differentiable; empty when there is nothing to keep) are
saved too and handed to the backward op after ``bias``.
"""
from __future__ import annotations

from typing import Callable

import torch

from .define import BODY_OF

#: op -> the ``autograd.Function`` that runs it in eager mode (:func:`call`).
EAGER: dict = {}


def call(op, x, base, cores, frozen, bias, *args):
    """``op(x, base, cores, frozen, bias, *args)``: through ``torch.library`` when compiling,
    else through the same bodies in an ``autograd.Function`` (same numbers, less host time)."""
    if torch.compiler.is_compiling():
        return op(x, base, cores, frozen, bias, *args)
    return EAGER[op].apply(x, base, bias, len(cores), args, *cores, *frozen)


def _eager_function(op, backward_op, keeps: int):
    body, backward_body = BODY_OF[op], BODY_OF[backward_op]

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, base, bias, n_cores, args, *tensors):
            cores, frozen = list(tensors[:n_cores]), list(tensors[n_cores:])
            out = body(x, base, cores, frozen, bias, *args)
            y, kept = (out[0], list(out[1:])) if keeps else (out, [])
            ctx.save_for_backward(x, base, bias, *cores, *frozen, *kept)
            ctx.n_cores, ctx.n_frozen, ctx.args = n_cores, len(frozen), args
            if keeps:
                ctx.mark_non_differentiable(*kept)
                ctx.set_materialize_grads(False)
                return (y, *kept)
            return y

        @staticmethod
        def backward(ctx, grad_out, *_):
            n, f = ctx.n_cores, ctx.n_frozen
            if grad_out is None:        # the output was not used
                return (None,) * (5 + n + f)
            x, base, bias, *rest = ctx.saved_tensors
            cores, frozen, kept = rest[:n], rest[n:n + f], rest[n + f:]
            need_x = ctx.needs_input_grad[0]
            need_b = bias is not None and ctx.needs_input_grad[2]
            gx, gb, *grad_cores = backward_body(grad_out, x, base, list(cores), list(frozen),
                                                bias, *kept, need_x, need_b, *ctx.args)
            return (gx if need_x else None, None, gb if need_b else None, None, None,
                    *grad_cores, *[None] * f)

    Eager.__name__ = f"Eager_{body.__name__}"
    return Eager


def register_recompute_autograd(op, backward_op, grad_x_like: Callable,
                                keeps: int = 0) -> None:
    """Autograd for ``op`` through ``backward_op``, and ``backward_op``'s fake kernel, whose
    input gradient is ``grad_x_like(x)`` (the real kernel's layout)."""
    def setup_context(ctx, inputs, output):
        x, base, cores, frozen, bias, *args = inputs
        kept = list(output[1:1 + keeps]) if keeps else []
        if keeps:
            ctx.mark_non_differentiable(*kept)
            ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, base, bias, *cores, *frozen, *kept)
        ctx.n_cores, ctx.n_frozen, ctx.args = len(cores), len(frozen), args

    def backward(ctx, grad_out, *_):
        x, base, bias, *rest = ctx.saved_tensors
        cores, frozen = rest[:ctx.n_cores], rest[ctx.n_cores:ctx.n_cores + ctx.n_frozen]
        kept = rest[ctx.n_cores + ctx.n_frozen:]
        need_x = ctx.needs_input_grad[0]
        need_b = bias is not None and ctx.needs_input_grad[4]
        if grad_out is None:        # the output was not used (grads not materialised)
            return (None, None, [None] * ctx.n_cores, [None] * ctx.n_frozen, None,
                    *[None] * len(ctx.args))
        gx, gb, *grad_cores = backward_op(grad_out, x, base, cores, frozen, bias, *kept, need_x,
                                          need_b, *ctx.args)
        return (gx if need_x else None, None, grad_cores, [None] * ctx.n_frozen,
                gb if need_b else None, *[None] * len(ctx.args))

    @backward_op.register_fake
    def _(grad_out, x, base, cores, frozen, bias, *args):
        need_x, need_bias = args[keeps:keeps + 2]
        torch._check(grad_out.dim() == x.dim(),
                     lambda: f"grad_out is {grad_out.dim()}-D, the input {x.dim()}-D")
        return ([grad_x_like(x) if need_x else x.new_empty(0),
                 torch.empty_like(bias) if need_bias else x.new_empty(0)]
                + [torch.empty_like(c) for c in cores])

    op.register_autograd(backward, setup_context=setup_context)
    EAGER[op] = _eager_function(op, backward_op, keeps)
