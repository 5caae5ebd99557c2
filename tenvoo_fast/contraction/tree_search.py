"""A search for contraction trees that cost fewer operator calls than opt_einsum's.

opt_einsum's path finders minimise flops; a :class:`~.program.Program` is judged first by its
operator calls (relayouts, rebuilt intermediates), which depend on the tree's shape in ways a
flop count does not see. :func:`search` samples random pairwise trees (each step joins two
tensors that share a letter), keeps those within the planner's flop slack, compiles each and
ranks them by calls. It is too slow to run per layer (a compile takes 0.1-0.4 s), so it runs
offline (``benchmarks/search_trees.py``) over a method's real layer shapes, and the methods
declare the few trees it finds (:func:`~.program.declare_trees`); the planner
then compares those with opt_einsum's for every layer it meets.
"""
from __future__ import annotations

import random
from collections import defaultdict

from . import program

Pairs = tuple[tuple[int, int], ...]


def random_tree(terms: list[str], rng: random.Random) -> Pairs:
    """A random pairwise tree as node-id pairs (0..n-1 the inputs, n.. the results in order),
    each step joining two tensors that share a letter (any two when none do)."""
    live = [(i, set(t)) for i, t in enumerate(terms)]
    pairs, next_id = [], len(terms)
    while len(live) > 1:
        joined = [(a, b) for a in range(len(live)) for b in range(a + 1, len(live))
                  if live[a][1] & live[b][1]]
        a, b = rng.choice(joined or [(a, b) for a in range(len(live))
                                     for b in range(a + 1, len(live))])
        pairs.append((live[a][0], live[b][0]))
        merged = live[a][1] | live[b][1]
        live = [x for k, x in enumerate(live) if k not in (a, b)] + [(next_id, merged)]
        next_id += 1
    return tuple(pairs)


def calls_of(equation: str, shapes, pairs: Pairs, slack: float | None = None) -> int | None:
    """The fewest operator calls of a program on the tree ``pairs`` (either way of reading
    dL/dT), or None when the tree exceeds the flop slack of opt_einsum's cheapest."""
    slack = program.FLOP_SLACK if slack is None else slack
    cheapest = min(c for c, _ in program.opt_einsum_trees(equation, tuple(shapes)))
    cost, steps = program.tree_cost(equation, shapes, pairs)
    if cost > slack * cheapest:
        return None
    return min(program.calls(program.compile_program(equation, shapes, steps, as_weight))
               for as_weight in (False, True))


def search(equation: str, shapes_list, trials: int = 2000, keep: int = 3,
           seed: int = 0, samples: int = 4) -> list[tuple[int, Pairs]]:
    """The ``keep`` trees that, added to opt_einsum's, save the most operator calls summed over
    ``shapes_list`` (each a tuple of core shapes for ``equation``), chosen greedily:
    ``[(calls saved, tree)]``. Random trees are sampled on ``samples`` of the shapes (spread
    over the list), ``trials`` in all; the best eight of each are scored on every shape."""
    rng = random.Random(seed)
    terms = equation.split("->")[0].split(",")
    step = max(1, len(shapes_list) // samples)
    finalists: list[Pairs] = []
    for shapes in shapes_list[::step][:samples]:
        sampled: dict[Pairs, int] = {}
        seen_steps = set()
        for _ in range(trials // samples):
            pairs = random_tree(terms, rng)
            steps = program.tree_cost(equation, shapes, pairs)[1]
            if steps in seen_steps:
                continue
            seen_steps.add(steps)
            n = calls_of(equation, shapes, pairs)
            if n is not None:
                sampled[pairs] = n
        finalists += [p for p in sorted(sampled, key=sampled.get)[:8] if p not in finalists]
    base = [min(program.calls(p) for _, p in program.opt_einsum_candidates(equation, s))
            for s in shapes_list]
    score: dict[Pairs, list[int]] = defaultdict(list)
    for pairs in finalists:
        for s, b in zip(shapes_list, base):
            n = calls_of(equation, s, pairs)
            score[pairs].append(b if n is None else n)
    chosen: list[tuple[int, Pairs]] = []
    best = list(base)
    for _ in range(keep):
        gains = {p: sum(max(0, b - n) for b, n in zip(best, score[p])) for p in finalists}
        if not gains:
            break
        pick = max(gains, key=gains.get)
        if gains[pick] <= 0:
            break
        chosen.append((gains[pick], pick))
        best = [min(b, n) for b, n in zip(best, score[pick])]
        finalists.remove(pick)
    return chosen
