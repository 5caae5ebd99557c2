"""The weight-sized step in torch (``impl="torch"``): :func:`build` and :func:`grads`.

They touch the weight as few times as the math allows: :func:`build` writes
``W + (scale*T - T0)`` in one pass from the GEMM's output (the permutation fused into the
subtraction), and :func:`grads` reads dL/dW once (permuted and cast together) for both operands'
gradients. The Triton (:mod:`tenvoo_fast.triton_kernels.launch_last_step`) and native
(:mod:`.native`) kernels implement the same two functions.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from ..contraction import native_runner
from ..contraction.last_step import Layout, operands, permutation, unmatrix
from . import workspace


@lru_cache(maxsize=None)
def sandwich(lay: Layout):
    """(mid, outer, P, Y, S letters) when the weight is ``[P][Y][S]`` with Y the output letters
    of one operand ("mid") and P, S the other's ("outer"), no batch: then the weight *is* the
    contiguous product ``matmul(Mid(Y, K), Outer(P, K, S))`` and its gradient needs no
    permutation either (TenVOO-Q's AB|Cabcxyz is one plain GEMM). None otherwise, or when the
    P-batched GEMMs would be too thin (TenVOO-L's ABC|abcx|yz)."""
    if lay.batch:
        return None
    groups = "".join("l" if l in lay.rows else "r" for l in lay.out_idx)
    runs = [g for i, g in enumerate(groups) if i == 0 or groups[i - 1] != g]
    if len(runs) == 2:        # [Y][S]: the first run is the middle, P empty
        mid = runs[0]
        n_p = 0
    elif len(runs) == 3:      # [P][Y][S]
        mid = runs[1]
        n_p = groups.index(mid)
    else:
        return None
    n_y = groups.count(mid)
    out = lay.out_idx
    if n_p and lay.size(out[n_p + n_y:]) < 64:
        # P small GEMMs with a tiny S run slower on the CPU than one GEMM and a permuting pass
        # (TenVOO-L: S = kH*kW = 9; README, "Speed and memory"): use the general path.
        return None
    return ("left" if mid == "l" else "right", "right" if mid == "l" else "left",
            out[:n_p], out[n_p:n_p + n_y], out[n_p + n_y:])


def _sandwich_operands(lay, form, left, right):
    mid_side, _, p, y, s_ = form
    mid, outer = (left, right) if mid_side == "left" else (right, left)
    mid_idx, outer_idx = ((lay.left_idx, lay.right_idx) if mid_side == "left"
                          else (lay.right_idx, lay.left_idx))
    K = lay.size(lay.bond)
    m = mid.permute(permutation(mid_idx, y + lay.bond)).reshape(lay.size(y), K)
    o = outer.permute(permutation(outer_idx, p + lay.bond + s_)).reshape(lay.size(p), K, lay.size(s_))
    return m.contiguous(), o.contiguous(), mid_idx, outer_idx


def build(lay: Layout, left, right, weight_shape, scale: float, base=None, frozen=None,
          out_dtype=None) -> torch.Tensor:
    """``scale*T`` (``base`` None), else ``W + (scale*T - T0)`` cast to ``out_dtype``; in the
    contraction dtype, the weight written once.

    With ``base`` the result is an effective weight for the caller's own conv/linear, so it
    lives in :mod:`workspace` scratch (valid until the next build in this thread); without,
    it is a fresh tensor the caller may keep.
    """
    shape = lay.shape(lay.out_idx)
    transient = base is not None

    def buffer(slot, size, dtype):
        if transient:
            return workspace.scratch(slot, size, dtype, left.device)
        return torch.empty(size, dtype=dtype, device=left.device)

    form = sandwich(lay)
    if form is not None:
        m, o, _, _ = _sandwich_operands(lay, form, left, right)
        out = buffer("weight", shape, m.dtype)   # (P, Y, S) is the weight's own layout
        torch.matmul(m, o, out=out.view(o.shape[0], m.shape[0], o.shape[2]))
        if scale != 1.0:
            out.mul_(scale)
        if base is not None and frozen is not None:
            out.sub_(frozen.reshape(shape))
    else:
        a, b = operands(lay, left, right)
        t = torch.bmm(a, b, out=buffer("gemm", lay.gemm[:3], a.dtype))
        if scale != 1.0:
            t.mul_(scale)
        view = t.reshape(lay.shape(lay.batch + lay.rows + lay.cols)).permute(
            permutation(lay.batch + lay.rows + lay.cols, lay.out_idx))
        out = buffer("weight", shape, t.dtype)
        if base is not None and frozen is not None:
            torch.sub(view, frozen.reshape(shape), out=out)   # the permutation, fused
        else:
            out.copy_(view)
    if base is not None:
        out.add_(base.reshape(shape))
    out = out.reshape(weight_shape)
    if out_dtype is None or out_dtype == out.dtype:
        return out
    return buffer("cast", weight_shape, out_dtype).copy_(out)


def grads(lay: Layout, grad_weight, left, right, scale: float):
    """Gradients of ``<grad_weight, scale*T>`` w.r.t. the two operands (contraction dtype)."""
    B, M, N, K = lay.gemm
    dtype = left.dtype
    form = sandwich(lay)
    if form is not None:
        mid_side, _, p, y, s_ = form
        m, o, mid_idx, outer_idx = _sandwich_operands(lay, form, left, right)
        g = grad_weight.to(dtype).reshape(lay.size(p), lay.size(y), lay.size(s_))
        g_mid = torch.matmul(g, o.transpose(1, 2)).sum(0)          # (Y, K)
        g_outer = torch.matmul(m.t(), g)                           # (P, K, S)
        if scale != 1.0:
            g_mid.mul_(scale)
            g_outer.mul_(scale)
        g_mid = unmatrix(g_mid, lay, y + lay.bond, mid_idx)
        g_outer = unmatrix(g_outer, lay, p + lay.bond + s_, outer_idx)
        return (g_mid, g_outer) if mid_side == "left" else (g_outer, g_mid)
    a, b = operands(lay, left, right)
    g = workspace.scratch("grad", lay.shape(lay.batch + lay.rows + lay.cols), dtype,
                          grad_weight.device)
    g.copy_(grad_weight.reshape(lay.shape(lay.out_idx)).permute(
        permutation(lay.out_idx, lay.batch + lay.rows + lay.cols)))
    g = g.reshape(B, M, N)
    ga = torch.bmm(g, b.transpose(1, 2))
    gb = torch.bmm(a.transpose(1, 2), g)
    if scale != 1.0:
        ga.mul_(scale)
        gb.mul_(scale)
    return (unmatrix(ga, lay, lay.batch + lay.rows + lay.bond, lay.left_idx),
            unmatrix(gb, lay, lay.batch + lay.bond + lay.cols, lay.right_idx))


# -- the same step for a compiled contraction program (contraction.program) ---------------------
def _weight_letters(prog):
    sizes = dict(prog.sizes)
    gemm = [sizes[l] for l in prog.gemm_order]
    return gemm, [gemm[i] for i in prog.to_weight]


def build_weight(prog, left, right, weight_shape, scale: float, base=None, frozen=None,
                 out_dtype=None) -> torch.Tensor:
    """As :func:`build`, from the program's strided ``(B, M, K)`` and ``(B, K, N)`` operands:
    one GEMM, then ``W + (scale*T - T0)`` in one pass that also permutes and casts."""
    gemm, letters = _weight_letters(prog)
    B, M, N, _ = prog.gemm
    transient = base is not None
    t = (workspace.scratch("gemm", (B, M, N), left.dtype, left.device) if transient
         else left.new_empty((B, M, N)))
    native_runner.bmm(left, right, t)    # a loop for a small layer on the CPU
    if scale != 1.0:
        t.mul_(scale)
    view = t.view(gemm).permute(prog.to_weight)
    if base is None:
        return left.new_empty(weight_shape).copy_(view.reshape(weight_shape))
    dtype = out_dtype or t.dtype
    out = workspace.scratch("weight", weight_shape, dtype, left.device)
    frozen_l = None if frozen is None else frozen.reshape(letters)
    # One loop for a small layer on the CPU (a contiguous base: viewing it costs no copy).
    if (t.is_cpu and base.is_contiguous()
            and native_runner.fold(view, frozen_l, base.view(letters), out.view(letters))):
        return out
    if frozen is None:
        torch.add(base.reshape(letters), view, out=out.view(letters))
        return out
    # The one permuting pass writes scale*T - T0 in the weight's order (in the contraction
    # dtype: a scratch of its own when the result is cast); W is then added contiguously.
    # Reading the GEMM's result permuted is what costs: in place on the permuted view, or
    # with W in the same pass, it ran 2-3x slower on the CPU.
    diff = out if dtype == t.dtype else workspace.scratch("fold", weight_shape, t.dtype,
                                                          left.device)
    torch.sub(view, frozen_l, out=diff.view(letters))
    return torch.add(base, diff, out=out)


def grad_gemm(prog, grad_weight, scale: float, dtype) -> torch.Tensor:
    """``scale * dL/dW`` as the program reads it (its ``grad_t``), in the contraction dtype:
    as the weight lies, or permuted into the last step's ``(B, M, N)`` order in one pass that
    also casts (the program chose whichever costs fewer calls)."""
    if prog.grad_as_weight:
        g = grad_weight if grad_weight.dtype == dtype else grad_weight.to(dtype)
        if scale != 1.0:
            return g * scale
        return g if g.is_contiguous() else g.contiguous()
    gemm, letters = _weight_letters(prog)
    g = grad_weight.new_empty(prog.gemm[:3], dtype=dtype)
    g.view(gemm).permute(prog.to_weight).copy_(grad_weight.reshape(letters))
    if scale != 1.0:
        g.mul_(scale)
    return g
