"""The weight-sized step of an adapter's contraction, as a batched GEMM.

Every pairwise step of the contraction tree is small except the last, whose output is the
weight, and the first step of the reverse sweep, whose input is dL/dW. Both are batched GEMMs
``T[b, m, n] = sum_k L[b, m, k] R[b, k, n]``: letters in both operands and the output are the
batch (b), output letters of one operand only are rows (m, left) or columns (n, right), letters
in both operands but not the output are the bond (k). The weight interleaves row and column
letters, so it is a permuted view of ``T``.

This module is that analysis (:func:`layout`) and the one builder of the offset vectors the
kernels index letter groups with (:func:`letter_offsets`); the kernels that run the step (torch,
Triton, native) are in :mod:`tenvoo_fast.kernels`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch


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


def permutation(src: str, dst: str) -> list[int]:
    """The permutation that takes letters ``src`` to ``dst``."""
    return [src.index(l) for l in dst]


def operands(lay: Layout, left: torch.Tensor, right: torch.Tensor, dtype=None):
    """The operands as contiguous (B, M, K) and (B, K, N) matrices."""
    B, M, N, K = lay.gemm
    a = left.permute(permutation(lay.left_idx, lay.batch + lay.rows + lay.bond))
    b = right.permute(permutation(lay.right_idx, lay.batch + lay.bond + lay.cols))
    a, b = a.reshape(B, M, K), b.reshape(B, K, N)
    if dtype is not None:
        a, b = a.to(dtype), b.to(dtype)
    return a.contiguous(), b.contiguous()


def unmatrix(t: torch.Tensor, lay: Layout, order: str, idx: str) -> torch.Tensor:
    """A (B, ., .) matrix back to an operand's letters ``idx``."""
    return t.reshape(lay.shape(order)).permute(permutation(order, idx))


def letter_offsets(letters: str, sizes: dict[str, int], strides: dict[str, int]) -> tuple[int, ...]:
    """The offset of every element of a letter group (row-major over ``letters``) in a tensor
    with the given per-letter ``strides`` (a letter without a stride adds 0): how the kernels
    index the weight, and the generation operands, by letter group."""
    off = torch.zeros((), dtype=torch.int64)
    for letter in letters:
        step = strides.get(letter, 0)
        off = off[..., None] + torch.arange(sizes[letter], dtype=torch.int64) * step
    return tuple(off.reshape(-1).tolist())
