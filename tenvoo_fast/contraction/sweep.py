"""Contraction trees and their reverse sweep: every core's gradient from dL/dΔW, without autograd.

A pairwise contraction tree (opt_einsum's optimal path) is run forward, keeping its partial
products for the duration of the call only, then swept in reverse: at each node ``C = A·B``
the gradients ``dA = dC·B`` and ``dB = A·dC`` reuse the partial products, so every core's
environment costs one reverse pass instead of one full contraction per core. Letters that a
step sums away inside one operand come back as broadcasts in its gradient.
"""
from __future__ import annotations

from dataclasses import dataclass
import math
from functools import lru_cache
from typing import Sequence

import opt_einsum
import torch


@dataclass(frozen=True)
class Step:
    left: int      # node ids: 0..n-1 are the cores, n.. the intermediate results
    right: int
    left_idx: str
    right_idx: str
    out_idx: str


@lru_cache(maxsize=None)
def sweep_plan(equation: str, shapes: tuple[tuple[int, ...], ...]) -> tuple[Step, ...]:
    """The pairwise steps of opt_einsum's optimal ('dp') path."""
    path, _ = opt_einsum.contract_path(equation, *shapes, shapes=True, optimize="dp")
    return tree_steps(equation, path)


def linear_path(pairs, n: int) -> list[tuple[int, int]]:
    """A tree given as node-id pairs (0..n-1 the inputs, n.. the results in order) as
    opt_einsum's linear path (positions in the shrinking operand list)."""
    live, path, next_id = list(range(n)), [], n
    for a, b in pairs:
        i, j = live.index(a), live.index(b)
        path.append((i, j))
        for p in sorted((i, j), reverse=True):
            live.pop(p)
        live.append(next_id)
        next_id += 1
    return path


def tree_steps(equation: str, path) -> tuple[Step, ...]:
    """The pairwise steps of an opt_einsum (linear-format) contraction path."""
    lhs, out = equation.split("->")
    terms = lhs.split(",")
    live = list(range(len(terms)))          # node ids of the current operand list
    idx = {i: t for i, t in enumerate(terms)}
    steps, next_id = [], len(terms)
    for k, pair in enumerate(path):
        if len(pair) != 2:
            raise NotImplementedError(f"environment sweep needs a pairwise path, got {pair}")
        a, b = (live[p] for p in pair)
        for p in sorted(pair, reverse=True):
            live.pop(p)
        rest = set(out).union(*(idx[n] for n in live))
        if k == len(path) - 1:
            res = out
        else:
            res = "".join(sorted(set(idx[a] + idx[b]) & rest))
        steps.append(Step(a, b, idx[a], idx[b], res))
        idx[next_id] = res
        live.append(next_id)
        next_id += 1
    return tuple(steps)


@lru_cache(maxsize=None)
def split_plan(equation: str, shapes: tuple[tuple[int, ...], ...], left_letters: str,
               right_letters: str) -> tuple[Step, ...] | None:
    """Pairwise steps whose last one multiplies a node holding every ``left_letters`` by one
    holding every ``right_letters`` (e.g. input and output channels), the other cores split
    between the two sides to make that step's bond smallest (then the sides' contraction
    cheapest); None if some core holds letters of both sets."""
    lhs, out = equation.split("->")
    terms = lhs.split(",")
    sizes = {l: n for t, s in zip(terms, shapes) for l, n in zip(t, s)}
    left = {i for i, t in enumerate(terms) if set(t) & set(left_letters)}
    right = {i for i, t in enumerate(terms) if set(t) & set(right_letters)}
    if not left or not right or left & right:
        return None
    free = [i for i in range(len(terms)) if i not in left | right]
    best = None
    for mask in range(1 << len(free)):
        side = left | {f for j, f in enumerate(free) if mask >> j & 1}
        other = set(range(len(terms))) - side
        la = set("".join(terms[i] for i in side))
        lb = set("".join(terms[i] for i in other))
        bond = math.prod(sizes[l] for l in (la & lb) - set(out))
        outs = ["".join(sorted(l for l in letters if l in out or l in other_letters))
                for letters, other_letters in ((la, lb), (lb, la))]
        flops = sum(_side_flops(terms, shapes, sorted(s), o)
                    for s, o in ((side, outs[0]), (other, outs[1])))
        key = (bond, flops)
        if best is None or key < best[0]:
            best = key, sorted(side), sorted(other), outs
    _, side, other, outs = best
    ssa, next_id = [], len(terms)
    roots = []
    for members, res in ((side, outs[0]), (other, outs[1])):
        if len(members) == 1:
            roots.append(members[0])
            continue
        sub = ",".join(terms[i] for i in members) + "->" + res
        path, _ = opt_einsum.contract_path(sub, *[shapes[i] for i in members], shapes=True,
                                           optimize="dp")
        ids = list(members)
        for a, b in opt_einsum.paths.linear_to_ssa(path):
            ssa.append((ids[a], ids[b]))
            ids.append(next_id)
            next_id += 1
        roots.append(ids[-1])
    ssa.append(tuple(roots))
    return tree_steps(equation, opt_einsum.paths.ssa_to_linear(ssa))


def _side_flops(terms, shapes, members, out) -> int:
    if len(members) == 1:
        return 0
    sub = ",".join(terms[i] for i in members) + "->" + out
    return path_flops(sub, tuple(shapes[i] for i in members))


@lru_cache(maxsize=None)
def path_flops(equation: str, shapes: tuple) -> int:
    """opt_einsum's cost of the optimal ('dp') path, for the strategies' cost models."""
    return int(opt_einsum.contract_path(equation, *shapes, shapes=True, optimize="dp")[1].opt_cost)


def grad_operand(g_out: torch.Tensor, out_idx: str, other: torch.Tensor, other_idx: str,
                  target_idx: str, target_shape) -> torch.Tensor:
    """d(out)/d(target) contracted with g_out; letters summed inside target are broadcast back."""
    kept = "".join(l for l in target_idx if l in out_idx or l in other_idx)
    g = torch.einsum(f"{out_idx},{other_idx}->{kept}", g_out, other)
    if kept != target_idx:
        shape = [target_shape[target_idx.index(l)] if l in kept else 1 for l in target_idx]
        order = [kept.index(l) for l in target_idx if l in kept]
        g = g.permute(order).reshape(shape).expand(target_shape)
    return g


def forward_tree(equation: str, cores: Sequence[torch.Tensor], steps=None):
    """Contract along the planned tree (``steps``, default :func:`sweep_plan`'s) up to, not
    including, its last (weight-sized) step, which a fused kernel runs; returns (steps, nodes
    of the partial products)."""
    if steps is None:
        steps = sweep_plan(equation, tuple(tuple(c.shape) for c in cores))
    nodes = {i: c for i, c in enumerate(cores)}
    n = len(cores)
    for k, s in enumerate(steps[:-1]):
        nodes[n + k] = torch.einsum(f"{s.left_idx},{s.right_idx}->{s.out_idx}",
                                    nodes[s.left], nodes[s.right])
    return steps, nodes


def reverse_tree(steps, nodes: dict, n_cores: int, last_operand_grads) -> list[torch.Tensor]:
    """Reverse sweep of :func:`forward_tree`: every core's gradient,
    given the gradients of the last (weight-sized) step's two operands, which a fused kernel
    (:mod:`tenvoo_fast.kernels`) computes from dL/dW.

    Consumes ``nodes``: each partial product is freed as soon as its sweep is done.
    """
    n = n_cores
    s = steps[-1]
    grads = {}
    for target, g in zip((s.left, s.right), last_operand_grads):
        grads[target] = grads[target] + g if target in grads else g
    for k in range(len(steps) - 2, -1, -1):
        s = steps[k]
        g = grads.pop(n + k)
        for target, tidx, other, oidx in ((s.left, s.left_idx, s.right, s.right_idx),
                                          (s.right, s.right_idx, s.left, s.left_idx)):
            gt = grad_operand(g, s.out_idx, nodes[other], oidx, tidx, nodes[target].shape)
            grads[target] = grads[target] + gt if target in grads else gt
        nodes.pop(n + k, None)
    return [grads[i] for i in range(n)]


def contract(equation: str, operands: Sequence[torch.Tensor]):
    """The whole tree, last step included (for contractions with no weight-sized step, such
    as an adapter applied to activations); returns (steps, nodes, result)."""
    steps, nodes = forward_tree(equation, operands)
    s = steps[-1]
    out = torch.einsum(f"{s.left_idx},{s.right_idx}->{s.out_idx}", nodes[s.left], nodes[s.right])
    return steps, nodes, out


def operand_grads(steps, nodes: dict, n_operands: int, grad_out: torch.Tensor):
    """Every operand's gradient from the result's, after :func:`contract` (consumes ``nodes``)."""
    s = steps[-1]
    last = [grad_operand(grad_out, s.out_idx, nodes[other], oidx, tidx, nodes[target].shape)
            for target, tidx, other, oidx in ((s.left, s.left_idx, s.right, s.right_idx),
                                              (s.right, s.right_idx, s.left, s.left_idx))]
    return reverse_tree(steps, nodes, n_operands, last)
