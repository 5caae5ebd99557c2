"""Launchers for :mod:`last_step`: the last contraction step seen as a batched GEMM.

The last step of the planned tree contracts two operands into the weight's letters. Letters in
both operands and the output are the batch (b), letters of the output from one operand only are
rows (m, left) or columns (n, right), and letters in both operands but not the output are the
bond (k). The operands are permuted to (B, M, K) and (B, K, N) (small tensors) and the kernels
index the weight through per-letter-group offset vectors, so the weight is read or written once,
in place, in its own layout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from . import last_step as k


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


@lru_cache(maxsize=256)
def _offsets(lay: Layout, device: torch.device):
    """int64 offset vectors of the batch, row and column letter groups in the output."""
    sizes = dict(lay.sizes)
    stride, strides = 1, {}
    for l in reversed(lay.out_idx):
        strides[l] = stride
        stride *= sizes[l]

    def group(letters):
        off = torch.zeros((), dtype=torch.int64)
        for l in letters:
            off = off[..., None] + torch.arange(sizes[l], dtype=torch.int64) * strides[l]
        return off.reshape(-1).to(device)
    return group(lay.batch), group(lay.rows), group(lay.cols)


def _as_matrix(t: torch.Tensor, idx: str, order: str, shape) -> torch.Tensor:
    return t.permute([idx.index(l) for l in order]).reshape(shape).contiguous()


def _operands(lay: Layout, left: torch.Tensor, right: torch.Tensor):
    B, M, N, K = (lay.size(g) for g in (lay.batch, lay.rows, lay.cols, lay.bond))
    a = _as_matrix(left.float(), lay.left_idx, lay.batch + lay.rows + lay.bond, (B, M, K))
    b = _as_matrix(right.float(), lay.right_idx, lay.batch + lay.bond + lay.cols, (B, K, N))
    return a, b, (B, M, N, K)


def _launch(kernel, grid, *args, **consts):
    # No FMA contraction: ``scale*T - T0`` must be exactly 0 when θ = θ0, as in torch.
    return kernel[grid](*args, **consts, num_warps=k.NUM_WARPS, enable_fp_fusion=False)


def build(lay: Layout, left: torch.Tensor, right: torch.Tensor, weight_shape, scale: float,
          base: torch.Tensor | None = None, frozen: torch.Tensor | None = None,
          out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``scale * T`` in fp32 (``base`` None), else ``base + (scale*T - frozen)`` in ``out_dtype``,
    written straight into a new tensor of ``weight_shape``."""
    a, b, (B, M, N, K) = _operands(lay, left, right)
    off_b, off_m, off_n = _offsets(lay, a.device)
    effective = base is not None
    out = torch.empty(weight_shape, dtype=out_dtype if effective else torch.float32,
                      device=a.device)
    base_ = base.contiguous() if effective else out
    frozen_ = frozen.float().contiguous() if frozen is not None else out
    grid = (triton_cdiv(M, k.BLOCK_M), triton_cdiv(N, k.BLOCK_N), B)
    _launch(k.build_kernel, grid, a, b, off_b, off_m, off_n, base_, frozen_, out, M, N, K,
            float(scale), EFFECTIVE=effective, HAS_FROZEN=frozen is not None,
            HAS_SCALE=scale != 1.0, BLOCK_M=k.BLOCK_M, BLOCK_N=k.BLOCK_N, BLOCK_K=k.BLOCK_K)
    return out


def grads(lay: Layout, grad_weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor,
          scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``<grad_weight, scale*T>`` w.r.t. the two operands (fp32, their layouts)."""
    a, b, (B, M, N, K) = _operands(lay, left, right)
    off_b, off_m, off_n = _offsets(lay, a.device)
    g = grad_weight.contiguous()
    ga = torch.empty_like(a)
    gb = torch.empty_like(b)
    consts = dict(HAS_SCALE=scale != 1.0, BLOCK_M=k.BLOCK_M, BLOCK_N=k.BLOCK_N,
                  BLOCK_K=k.BLOCK_K)
    _launch(k.grad_left_kernel, (triton_cdiv(M, k.BLOCK_M), triton_cdiv(K, k.BLOCK_K), B), g, b,
            off_b, off_m, off_n, ga, M, N, K, float(scale), **consts)
    _launch(k.grad_right_kernel, (triton_cdiv(K, k.BLOCK_K), triton_cdiv(N, k.BLOCK_N), B), g, a,
            off_b, off_m, off_n, gb, M, N, K, float(scale), **consts)
    return (_unmatrix(ga, lay, lay.batch + lay.rows + lay.bond, lay.left_idx),
            _unmatrix(gb, lay, lay.batch + lay.bond + lay.cols, lay.right_idx))


def _unmatrix(t: torch.Tensor, lay: Layout, order: str, idx: str) -> torch.Tensor:
    sizes = dict(lay.sizes)
    t = t.reshape([sizes[l] for l in order])
    return t.permute([order.index(l) for l in idx])


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
