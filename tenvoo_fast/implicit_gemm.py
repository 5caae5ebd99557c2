"""Strategy ``"implicit-gemm"`` (fast-path design 2): the Conv3d runs as a Triton implicit GEMM
whose weight tiles are generated from the cores on chip, so no weight-sized tensor exists in
forward or backward, and the weight gradient goes straight into the cores' gradients.

The small steps of the contraction run in torch as for ``merged``, along a tree whose last step
``T = P·Q`` multiplies a node holding the input-channel letters (P) by one holding the
output-channel letters (Q) (:func:`environment.split_plan`, the other cores placed to make the
bond smallest); that step is never formed but fused into the convolution, and
:func:`generation` derives the offset vectors the kernels index P and Q with
(:mod:`triton_kernels.implicit_conv`). TenVOO-L: P rows = (Cin, kD), Q columns =
(Cout, kH, kW), bond r². TenVOO-Q: the same rows and columns with a bond of r³, so each weight
tile costs r times more to generate.

Backward recomputes P and Q (and keeps the small partial products for this call only): the
input gradient is a second implicit GEMM, and the weight gradient is reduced tile by tile into
dL/dP and dL/dQ, from which the reverse sweep gives every core's gradient. Only the input and
the layer's own tensors are saved.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch
from torch import Tensor

from . import environment, last_step
from .factorized import _recompute_autograd
from .ops import (conv_output_like, conv_output_spatial, memory_format, reduced_cores,
                  stored_grads)


@dataclass(frozen=True)
class Generation:
    """Where each weight element's P row and Q column live in the last step's operand
    matrices: ``p_ci[ci] + p_tap[tap] + k*p_k`` and ``q_co[co] + q_tap[tap] + k*q_k``."""
    p_side: str                      # "left" or "right": the operand holding Cin's letters
    p_ci: tuple[int, ...]
    p_tap: tuple[int, ...]
    q_co: tuple[int, ...]
    q_tap: tuple[int, ...]
    p_k: int
    q_k: int
    bond: int

    def offsets(self, device) -> list[Tensor]:
        return _offset_tensors(self, torch.device(device))


@lru_cache(maxsize=256)
def _offset_tensors(gen: Generation, device: torch.device) -> list[Tensor]:
    return [torch.tensor(v, dtype=torch.int64, device=device)
            for v in (gen.p_ci, gen.p_tap, gen.q_co, gen.q_tap)]


@lru_cache(maxsize=None)
def generation(lay: last_step.Layout, out_letters: str, in_letters: str,
               kernel_letters: str) -> Generation:
    """The offsets of :class:`Generation` for a last step, or ValueError saying why the step
    cannot be generated tile by tile (channel letters of one side in both operands)."""
    B, M, N, K = lay.gemm
    sizes = dict(lay.sizes)

    def strides(group: str, unit: int) -> dict[str, int]:
        out, s = {}, unit
        for letter in reversed(group):
            out[letter] = s
            s *= sizes[letter]
        return out

    left = {**strides(lay.batch, M * K), **strides(lay.rows, K)}
    right = {**strides(lay.batch, K * N), **strides(lay.cols, 1)}
    own = {"left": set(lay.rows), "right": set(lay.cols)}
    p_side = "left" if set(in_letters) <= own["left"] else "right"
    q_side = "right" if p_side == "left" else "left"
    if not set(in_letters) <= own[p_side] or not set(out_letters) <= own[q_side]:
        raise ValueError(
            f"last step {lay.left_idx},{lay.right_idx}->{lay.out_idx} mixes input and output "
            f"channel letters in one operand (rows {lay.rows!r}, columns {lay.cols!r}, batch "
            f"{lay.batch!r}), so its weight tiles are not a product of a Cin-side and a "
            "Cout-side matrix")
    p_strides, q_strides = (left, right) if p_side == "left" else (right, left)

    def vector(letters: str, table: dict[str, int]) -> tuple[int, ...]:
        off = torch.zeros((), dtype=torch.int64)
        for letter in letters:
            off = off[..., None] + torch.arange(sizes[letter]) * table.get(letter, 0)
        return tuple(off.reshape(-1).tolist())

    return Generation(p_side, vector(in_letters, p_strides), vector(kernel_letters, p_strides),
                      vector(out_letters, q_strides), vector(kernel_letters, q_strides),
                      1 if p_side == "left" else N, N if p_side == "left" else 1, K)


def _launchers():
    from .triton_kernels import launch_conv
    return launch_conv


def _tree(equation: str, shapes: tuple, letters: str):
    """The contraction tree whose last step multiplies an input-channel node by an
    output-channel node (:func:`environment.split_plan`), and that step's generation."""
    out_letters, in_letters, kernel_letters = letters.split(",")
    steps = environment.split_plan(equation, shapes, in_letters, out_letters)
    if steps is None:
        raise ValueError(f"{equation}: a core holds both input and output channel letters")
    s = steps[-1]
    sizes = {l: n for t, sh in zip(equation.split("->")[0].split(","), shapes)
             for l, n in zip(t, sh)}
    lay = last_step.layout(s.left_idx, tuple(sizes[l] for l in s.left_idx), s.right_idx,
                           tuple(sizes[l] for l in s.right_idx), s.out_idx)
    return steps, lay, generation(lay, out_letters, in_letters, kernel_letters)


def _operands(cores, equation, letters):
    """(plan, reduced cores, steps, nodes, layout, generation, P, Q), P and Q in fp32."""
    p, _, reduced = reduced_cores(cores, equation)
    steps, lay, gen = _tree(p.equation, tuple(tuple(c.shape) for c in reduced), letters)
    steps, nodes = environment.forward_tree(p.equation, reduced, steps)
    left, right = nodes[steps[-1].left], nodes[steps[-1].right]
    a, b = last_step.operands(lay, left, right, torch.float32)
    P, Q = (a, b) if gen.p_side == "left" else (b, a)
    return p, reduced, steps, nodes, lay, gen, P, Q


def _frozen_operands(frozen, equation, letters):
    if not frozen:
        return None, None
    return _operands(frozen, equation, letters)[-2:]


def unsupported_reason(network) -> Optional[str]:
    """None if ``network`` (a TenVOO Conv3d adapter) can run implicit-gemm, else why not."""
    from .factorized import network_letters
    from .simplify import plan
    p = plan(network.equation, network.shapes)
    try:
        _tree(p.equation, p.shapes, ",".join(network_letters(network)))
    except ValueError as e:
        return str(e)
    return None


@torch.library.custom_op("tenvoo_fast::implicit_conv3d", mutates_args=())
def implicit_conv3d(x: Tensor, base: Tensor, cores: list[Tensor], frozen: list[Tensor],
                    bias: Optional[Tensor], equation: str, letters: str, scale: float,
                    conv: list[int]) -> Tensor:
    """``conv3d(x, W + scale*(T(θ) - T(θ0)), bias)`` with the weight generated tile by tile
    inside a Triton implicit GEMM (``letters`` = "out,in,kernel", ``conv`` = stride + padding +
    dilation; ``frozen`` empty: no frozen copy)."""
    with torch.autocast(x.device.type, enabled=False), torch.no_grad():
        *_, gen, P, Q = _operands(cores, equation, letters)
        P0, Q0 = _frozen_operands(frozen, equation, letters)
        spatial = conv_output_spatial(x.shape[2:], base.shape[2:], conv[0:3], conv[3:6],
                                      conv[6:9])
        return _launchers().forward(x, gen, P, Q, P0, Q0, base, bias, scale, conv, spatial,
                                    memory_format(x))


@implicit_conv3d.register_fake
def _(x, base, cores, frozen, bias, equation, letters, scale, conv):
    return conv_output_like(x, base, conv)


@torch.library.custom_op("tenvoo_fast::implicit_conv3d_backward", mutates_args=())
def implicit_conv3d_backward(grad_out: Tensor, x: Tensor, base: Tensor, cores: list[Tensor],
                             frozen: list[Tensor], bias: Optional[Tensor], need_x: bool,
                             need_bias: bool, equation: str, letters: str, scale: float,
                             conv: list[int]) -> list[Tensor]:
    """[grad_x, grad_bias, *grad_cores] of :func:`implicit_conv3d`: P and Q recomputed, the input
    gradient by a second implicit GEMM, dL/dW reduced tile by tile into dL/dP and dL/dQ."""
    with torch.autocast(x.device.type, enabled=False), torch.no_grad():
        p, reduced, steps, nodes, lay, gen, P, Q = _operands(cores, equation, letters)
        launch = _launchers()
        g = grad_out.to(x.dtype)
        dP, dQ = launch.operand_grads(x, g, gen, P, Q, scale, conv, list(base.shape[2:]))
        da, db = (dP, dQ) if gen.p_side == "left" else (dQ, dP)
        grads = environment.reverse_tree(steps, nodes, len(reduced), (
            last_step.unmatrix(da, lay, lay.batch + lay.rows + lay.bond, lay.left_idx),
            last_step.unmatrix(db, lay, lay.batch + lay.bond + lay.cols, lay.right_idx)))
        core_grads = stored_grads(p, grads, cores)
        gx = x.new_empty(0)  # (separate empties: a custom op's outputs may not alias)
        if need_x:
            P0, Q0 = _frozen_operands(frozen, equation, letters)
            gx = launch.input_grad(g, list(x.shape), gen, P, Q, P0, Q0, base, scale, conv,
                                   memory_format(x))
        gb = g.sum((0, 2, 3, 4)).to(bias.dtype) if need_bias else x.new_empty(0)
        return [gx, gb] + core_grads


_recompute_autograd(implicit_conv3d, implicit_conv3d_backward)

