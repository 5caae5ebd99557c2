"""The weight-sized step of an adapter's contraction, as a batched GEMM (fast-path design 1).

Every pairwise step of the contraction tree is small except the last, whose output is the
weight, and the first step of the reverse sweep, whose input is dL/dW. Both are batched GEMMs
``T[b, m, n] = sum_k L[b, m, k] R[b, k, n]``: letters in both operands and the output are the
batch (b), output letters of one operand only are rows (m, left) or columns (n, right), letters
in both operands but not the output are the bond (k). The weight interleaves row and column
letters, so it is a permuted view of ``T``.

This module holds that analysis (:func:`layout`) and the pure-torch kernels, which touch the
weight as few times as the math allows: :func:`build` writes ``W + (scale*T - T0)`` in one
pass from the GEMM's output (the permutation fused into the subtraction), and :func:`grads`
reads dL/dW once (permuted and cast to fp32 together) for both operands' gradients. The Triton
kernels (:mod:`tenvoo_fast.triton_kernels.launch`) implement the same two functions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from . import workspace


@dataclass(frozen=True)
class Layout:
    batch: str
    rows: str
    cols: str
    bond: str
    sizes: tuple[tuple[str, int], ...]
    left_idx: str
    right_idx: str
    out_idx: str

    def size(self, letters: str) -> int:
        d = dict(self.sizes)
        return math.prod(d[l] for l in letters)

    def shape(self, letters: str) -> list[int]:
        d = dict(self.sizes)
        return [d[l] for l in letters]

    @property
    def strides(self) -> dict[str, int]:
        """Each letter's stride in the (contiguous) weight, whose letters are ``out_idx``."""
        d, out, stride = dict(self.sizes), {}, 1
        for letter in reversed(self.out_idx):
            out[letter] = stride
            stride *= d[letter]
        return out

    @property
    def gemm(self) -> tuple[int, int, int, int]:
        """(B, M, N, K)."""
        return tuple(self.size(g) for g in (self.batch, self.rows, self.cols, self.bond))


@lru_cache(maxsize=None)
def layout(left_idx: str, left_shape: tuple, right_idx: str, right_shape: tuple,
           out_idx: str) -> Layout:
    sizes = dict(zip(left_idx, left_shape))
    sizes.update(zip(right_idx, right_shape))
    batch = "".join(l for l in out_idx if l in left_idx and l in right_idx)
    rows = "".join(l for l in out_idx if l in left_idx and l not in right_idx)
    cols = "".join(l for l in out_idx if l in right_idx and l not in left_idx)
    bond = "".join(l for l in left_idx if l in right_idx and l not in out_idx)
    stray = set(left_idx + right_idx) - set(batch + rows + cols + bond)
    if stray:
        raise ValueError(f"last step {left_idx},{right_idx}->{out_idx}: letters {stray} are "
                         "summed inside one operand (pre-reduce them first)")
    return Layout(batch, rows, cols, bond, tuple(sorted(sizes.items())), left_idx, right_idx,
                  out_idx)


def step_layout(step, nodes):
    """(layout, left, right) of a contraction tree's last step."""
    left, right = nodes[step.left], nodes[step.right]
    return layout(step.left_idx, tuple(left.shape), step.right_idx, tuple(right.shape),
                  step.out_idx), left, right


def _order(src: str, dst: str) -> list[int]:
    return [src.index(l) for l in dst]


def operands(lay: Layout, left: torch.Tensor, right: torch.Tensor, dtype=None):
    """The operands as contiguous (B, M, K) and (B, K, N) matrices."""
    B, M, N, K = lay.gemm
    a = left.permute(_order(lay.left_idx, lay.batch + lay.rows + lay.bond)).reshape(B, M, K)
    b = right.permute(_order(lay.right_idx, lay.batch + lay.bond + lay.cols)).reshape(B, K, N)
    if dtype is not None:
        a, b = a.to(dtype), b.to(dtype)
    return a.contiguous(), b.contiguous()


def unmatrix(t: torch.Tensor, lay: Layout, order: str, idx: str) -> torch.Tensor:
    """A (B, ., .) matrix back to an operand's letters ``idx``."""
    return t.reshape(lay.shape(order)).permute(_order(order, idx))


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
        # P small GEMMs with a tiny S run slowly on the CPU (TenVOO-L: S = kH*kW = 9; measured
        # 33 ms vs 11 ms for one GEMM and a permuting pass at 512->512): use the general path.
        return None
    return ("left" if mid == "l" else "right", "right" if mid == "l" else "left",
            out[:n_p], out[n_p:n_p + n_y], out[n_p + n_y:])


def _sandwich_operands(lay, form, left, right):
    mid_side, _, p, y, s_ = form
    mid, outer = (left, right) if mid_side == "left" else (right, left)
    mid_idx, outer_idx = ((lay.left_idx, lay.right_idx) if mid_side == "left"
                          else (lay.right_idx, lay.left_idx))
    K = lay.size(lay.bond)
    m = mid.permute(_order(mid_idx, y + lay.bond)).reshape(lay.size(y), K)
    o = outer.permute(_order(outer_idx, p + lay.bond + s_)).reshape(lay.size(p), K, lay.size(s_))
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
            _order(lay.batch + lay.rows + lay.cols, lay.out_idx))
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
        _order(lay.out_idx, lay.batch + lay.rows + lay.cols)))
    g = g.reshape(B, M, N)
    ga = torch.bmm(g, b.transpose(1, 2))
    gb = torch.bmm(a.transpose(1, 2), g)
    if scale != 1.0:
        ga.mul_(scale)
        gb.mul_(scale)
    return (unmatrix(ga, lay, lay.batch + lay.rows + lay.bond, lay.left_idx),
            unmatrix(gb, lay, lay.batch + lay.bond + lay.cols, lay.right_idx))
