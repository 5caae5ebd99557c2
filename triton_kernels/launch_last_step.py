"""Launchers for :mod:`.last_step`'s kernels: ``build`` and ``grads`` of
:mod:`tenvoo_fast.kernels.torch_last_step` on the GPU (the batched-GEMM view of the last
contraction step is :mod:`tenvoo_fast.contraction.last_step`). The operands are permuted to (B, M, K) and (B, K, N) (small tensors) and the kernels
index the weight through per-letter-group offset vectors, so the weight is read or written
once, in its own layout.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import triton

from ..contraction.last_step import Layout, letter_offsets, operands, unmatrix
from . import last_step as k
from .launching import launch


@lru_cache(maxsize=256)
def _offsets(lay: Layout, device: torch.device):
    """int64 offset vectors of the batch, row and column letter groups in the output."""
    sizes, strides = dict(lay.sizes), lay.strides
    return tuple(torch.tensor(letter_offsets(g, sizes, strides), dtype=torch.int64,
                              device=device).reshape(-1)
                 for g in (lay.batch, lay.rows, lay.cols))


def _launch(kernel, grid, *args, **consts):
    return launch(kernel, grid, *args, num_warps=k.NUM_WARPS, **consts)


def build(lay: Layout, left: torch.Tensor, right: torch.Tensor, weight_shape, scale: float,
          base: torch.Tensor | None = None, frozen: torch.Tensor | None = None,
          out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``scale * T`` in fp32 (``base`` None), else ``base + (scale*T - frozen)`` in ``out_dtype``,
    written straight into a new tensor of ``weight_shape``."""
    B, M, N, K = lay.gemm
    a, b = operands(lay, left, right, torch.float32)
    off_b, off_m, off_n = _offsets(lay, a.device)
    effective = base is not None
    out = torch.empty(weight_shape, dtype=out_dtype if effective else torch.float32,
                      device=a.device)
    base_ = base.contiguous() if effective else out
    frozen_ = frozen.float().contiguous() if frozen is not None else out
    grid = (triton.cdiv(M, k.BLOCK_M), triton.cdiv(N, k.BLOCK_N), B)
    _launch(k.build_kernel, grid, a, b, off_b, off_m, off_n, base_, frozen_, out, M, N, K,
            float(scale), *a.stride(), *b.stride(), EFFECTIVE=effective,
            HAS_FROZEN=frozen is not None, HAS_SCALE=scale != 1.0, BLOCK_M=k.BLOCK_M,
            BLOCK_N=k.BLOCK_N, BLOCK_K=k.BLOCK_K)
    return out


def grid_of_grads(B: int, M: int, N: int, K: int) -> tuple[int, int, int]:
    """:func:`~.last_step.grads_kernel`'s grid: dL/dL's tiles, then dL/dR's, per batch."""
    tiles_k = triton.cdiv(K, k.BLOCK_K)
    return (triton.cdiv(M, k.BLOCK_M) * tiles_k + tiles_k * triton.cdiv(N, k.BLOCK_N), 1, B)


def grads(lay: Layout, grad_weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor,
          scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``<grad_weight, scale*T>`` w.r.t. the two operands (fp32, their layouts)."""
    B, M, N, K = lay.gemm
    a, b = operands(lay, left, right, torch.float32)
    off_b, off_m, off_n = _offsets(lay, a.device)
    g = grad_weight.contiguous()
    ga = torch.empty_like(a)
    gb = torch.empty_like(b)
    _launch(k.grads_kernel, grid_of_grads(B, M, N, K), g, a, b, off_b, off_m, off_n, ga, gb,
            M, N, K, float(scale), *a.stride(), *b.stride(), *ga.stride(), *gb.stride(),
            HAS_SCALE=scale != 1.0, BLOCK_M=k.BLOCK_M, BLOCK_N=k.BLOCK_N, BLOCK_K=k.BLOCK_K)
    return (unmatrix(ga, lay, lay.batch + lay.rows + lay.bond, lay.left_idx),
            unmatrix(gb, lay, lay.batch + lay.bond + lay.cols, lay.right_idx))
