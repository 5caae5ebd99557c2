"""Pre-reduction: cheaper, equivalent contraction plans (adapters.md §3, TenVOO-Q note).

Some letters are summed inside a single core: a letter that appears once and not in the output
(core 3's ``k`` in TenVOO-Q), or whose other occurrences all have size 1 and so only broadcast
(``i``: size r in core 2, size 1 in core 3). Summing such axes first, and dropping size-1 axes,
gives the same ΔW with far fewer flops (TenVOO-Q at r=12: 1.85e10 -> 6.1e9 for 512->512). The
reductions are ordinary differentiable torch ops, so the stored cores keep their shapes and
get exactly the gradients the spec's network defines.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import torch

from .reference import contraction_dtype


@dataclass(frozen=True)
class Plan:
    """Per core: axes to sum, then axes (of size 1) to squeeze; the reduced equation and
    shapes; the stored cores' shapes."""
    sum_axes: tuple[tuple[int, ...], ...]
    squeeze_axes: tuple[tuple[int, ...], ...]
    equation: str
    shapes: tuple[tuple[int, ...], ...]
    stored_shapes: tuple[tuple[int, ...], ...]


@lru_cache(maxsize=None)
def plan(equation: str, shapes: tuple[tuple[int, ...], ...]) -> Plan:
    lhs, out = equation.split("->")
    terms = [list(t) for t in lhs.split(",")]
    dims = [list(s) for s in shapes]
    sums = [[] for _ in terms]
    squeezes = [[] for _ in terms]
    # Original axis positions, tracked as axes are removed.
    pos = [list(range(len(t))) for t in terms]
    changed = True
    while changed:
        changed = False
        for ci, (term, dim) in enumerate(zip(terms, dims)):
            for ai in range(len(term) - 1, -1, -1):
                letter, size = term[ai], dim[ai]
                if letter in out:
                    continue
                elsewhere = [d for cj, (t2, d2) in enumerate(zip(terms, dims)) if cj != ci
                             for l2, d in zip(t2, d2) if l2 == letter]
                if size == 1:
                    squeezes[ci].append(pos[ci][ai])
                elif size > 1 and all(d == 1 for d in elsewhere):
                    sums[ci].append(pos[ci][ai])
                else:
                    continue
                del term[ai], dim[ai], pos[ci][ai]
                changed = True
    equation2 = ",".join("".join(t) for t in terms) + "->" + out
    return Plan(tuple(tuple(sorted(s)) for s in sums), tuple(tuple(sorted(s)) for s in squeezes),
                equation2, tuple(tuple(d) for d in dims), shapes)


def reduce_cores(p: Plan, cores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Apply a plan's sums and squeezes (in original axis numbering) to each core."""
    out = []
    for c, s, q in zip(cores, p.sum_axes, p.squeeze_axes):
        if s or q:
            keep = c.sum(dim=s, keepdim=True) if s else c
            c = keep.squeeze(tuple(sorted(set(s) | set(q))))
        out.append(c)
    return out


def expand_grad(p: Plan, i: int, grad: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The gradient of original core ``i`` from that of its reduced form: sums broadcast back."""
    axes = sorted(set(p.sum_axes[i]) | set(p.squeeze_axes[i]))
    for a in axes:
        grad = grad.unsqueeze(a)
    return grad.expand(shape)


def reduced_cores(cores: Sequence[torch.Tensor], equation: str):
    """(plan, contraction dtype, cores with redundant axes pre-reduced) for the fast ops."""
    p = plan(equation, tuple(tuple(c.shape) for c in cores))
    dtype = contraction_dtype(cores)
    return p, dtype, reduce_cores(p, [c if c.dtype == dtype else c.to(dtype) for c in cores])


def stored_grads(p: Plan, grads, cores) -> list[torch.Tensor]:
    """Gradients of the reduced cores -> gradients of the stored cores (contiguous, core dtype)."""
    out = []
    for i, (g, c) in enumerate(zip(grads, cores)):
        if p.sum_axes[i] or p.squeeze_axes[i]:
            g = expand_grad(p, i, g, tuple(c.shape))
        if g.dtype != c.dtype:
            g = g.to(c.dtype)
        out.append(g if g.is_contiguous() else g.contiguous())
    return out
