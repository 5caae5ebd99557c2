"""Weight tiles generated from the cores: the algebra of the ``implicit-gemm`` strategy.

The contraction runs along a tree whose last step ``T = P·Q`` multiplies a node holding the
input-channel letters (P) by one holding the output-channel letters (Q)
(:func:`split_tree`, the other cores placed to make the bond smallest). That step is never
formed: a conv kernel generates each weight tile ``P[rows]·Q[cols]`` on chip, indexing P and Q
with the offset vectors of :class:`Generation`. TenVOO-L: P rows = (Cin, kD), Q columns =
(Cout, kH, kW), bond r². TenVOO-Q: the same rows and columns with a bond of r³.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch
from torch import Tensor

from .last_step import Layout, layout, letter_offsets
from .partition import channel_letters
from .prereduce import plan
from .sweep import split_plan


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
def generation(lay: Layout, out_letters: str, in_letters: str,
               tap_letters: str) -> Generation:
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

    return Generation(p_side, letter_offsets(in_letters, sizes, p_strides),
                      letter_offsets(tap_letters, sizes, p_strides),
                      letter_offsets(out_letters, sizes, q_strides),
                      letter_offsets(tap_letters, sizes, q_strides),
                      1 if p_side == "left" else N, N if p_side == "left" else 1, K)


def split_tree(equation: str, shapes: tuple, letters: str):
    """The contraction tree whose last step multiplies an input-channel node by an
    output-channel node (:func:`~tenvoo_fast.contraction.sweep.split_plan`), that step's layout
    and its :class:`Generation`; ``letters`` = "out,in,tap"."""
    out_letters, in_letters, tap_letters = letters.split(",")
    steps = split_plan(equation, shapes, in_letters, out_letters)
    if steps is None:
        raise ValueError(f"{equation}: a core holds both input and output channel letters")
    s = steps[-1]
    sizes = {l: n for t, sh in zip(equation.split("->")[0].split(","), shapes)
             for l, n in zip(t, sh)}
    lay = layout(s.left_idx, tuple(sizes[l] for l in s.left_idx), s.right_idx,
                 tuple(sizes[l] for l in s.right_idx), s.out_idx)
    return steps, lay, generation(lay, out_letters, in_letters, tap_letters)


def unsupported_reason(network) -> Optional[str]:
    """None if ``network`` (a TenVOO Conv3d adapter) can run implicit-gemm, else why not."""
    p = plan(network.equation, network.shapes)
    try:
        split_tree(p.equation, p.shapes, ",".join(channel_letters(network)))
    except ValueError as e:
        return str(e)
    return None
