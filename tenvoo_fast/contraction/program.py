"""A contraction tree compiled to strided batched matmuls: no operand copies, one buffer.

``torch.einsum`` runs each pairwise step as permute, reshape (a copy whenever the permuted
operand is not contiguous) and bmm, and autograd repeats that in backward: most of an adapted
layer's operator calls are those copies (README, "Launches"). A :class:`Program` decides once,
per equation and core shapes, the memory layout (letter order) of every intermediate so that
each step reads its operands as strided ``(batch, rows, bond)`` matrices straight from where
they lie and writes its result where its consumer will read it. Where no layout serves both
its producer and its consumer, an explicit :class:`Relayout` copies it (the plan minimises
these, and tests budget them).

The program covers the whole tree: the small forward steps (their results kept in one flat
buffer that the backward reuses, a few KB at r=4), the weight-sized last step's two operands
as strided matrices, and the reverse sweep from dL/dT (as the weight lies, or in the last
step's GEMM order, whichever costs fewer calls) to every core's gradient in the core's own
layout.

Run in torch (:func:`run_forward`, :func:`run_backward`), a group of relayouts is one gather
(``index_select`` with an index made once per program): packing the cores (after one ``cat``),
the backward's relayouts of tensors that exist before it starts, and the final unpacking of
every core's gradient into one flat output (the pre-reduction's broadcasts included). One
copy per relayout, as ``_foreach_copy_`` runs them on CUDA, would cost a launch each.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Optional

import numpy as np
import opt_einsum
import torch

from . import native_runner
from .sweep import Step, linear_path, tree_steps


@dataclass(frozen=True)
class Read:
    """A tensor read as a 3-D strided matrix ``(batch, rows, cols)``."""
    tensor: int
    size: tuple[int, int, int]
    stride: tuple[int, int, int]

    def t(self) -> "Read":
        return Read(self.tensor, (self.size[0], self.size[2], self.size[1]),
                    (self.stride[0], self.stride[2], self.stride[1]))


@dataclass(frozen=True)
class MatMul:
    """``out = a @ b`` batched, each a strided ``(batch, rows, cols)`` view."""
    a: Read
    b: Read
    out: Read


@dataclass(frozen=True)
class Relayout:
    """Copy tensor ``src`` (shape ``shape`` in its layout) into ``dst``, permuted by ``perm``."""
    src: int
    dst: int
    shape: tuple[int, ...]
    perm: tuple[int, ...]


@dataclass(frozen=True)
class Program:
    """Tensor ids: 0..n-1 the (pre-reduced) cores, then the program's own tensors.

    ``layouts[id]``: the letters of a tensor in memory order (row-major, contiguous);
    ``saved``: ids kept in one flat buffer between forward and backward, with ``offsets``
    (at most :data:`KEEP_FRACTION` of the weight where the plan allows);
    ``forward``: instructions up to the last step; ``left``/``right``: the last step's
    operands as ``(B, M, K)`` / ``(B, K, N)`` reads; ``gemm_order``: the letters of the last
    step's ``(B, M, N)`` result, whose permutation ``to_weight`` gives the weight's letters;
    ``grad_t``: the id dL/dT is given as (laid out as the weight); ``recompute``: forward
    instructions the backward re-runs (what was too large to keep); ``backward``: instructions
    from dL/dT to ``core_grads`` (one id per core, in the core's layout).
    """
    n_cores: int
    layouts: tuple[str, ...]
    sizes: tuple[tuple[str, int], ...]
    saved: tuple[int, ...]
    offsets: tuple[int, ...]
    saved_numel: int
    forward: tuple
    left: Read
    right: Read
    gemm: tuple[int, int, int, int]
    gemm_order: str
    to_weight: tuple[int, ...]
    grad_t: int
    recompute: tuple
    backward: tuple
    core_grads: tuple[int, ...]

    # Derived once per program (cached_property writes the instance dict, which a frozen
    # dataclass allows): the run helpers ask for these on every call.
    @cached_property
    def _size_of(self) -> dict[str, int]:
        return dict(self.sizes)

    def numel(self, tensor: int) -> int:
        return math.prod(self._shapes[tensor])

    def shape(self, tensor: int) -> tuple[int, ...]:
        return self._shapes[tensor]

    @cached_property
    def _shapes(self) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(self._size_of[l] for l in layout) for layout in self.layouts)

    @property
    def grad_as_weight(self) -> bool:
        """dL/dT is read as the weight lies (else permuted into the GEMM's order first)."""
        return self.layouts[self.grad_t] != self.gemm_order or self.to_weight == tuple(
            range(len(self.to_weight)))

    @property
    def copies(self) -> int:
        """Copy operations per forward + backward (a group of relayouts is one)."""
        return sum(isinstance(i, (Relayout, tuple)) for i in self.forward + self.backward)


def read(layout: str, sizes: dict, groups: tuple[str, str, str]) -> Optional[tuple]:
    """(size, stride) of ``layout`` read as three merged letter groups (each group's letters
    adjacent, in order, in memory), BLAS-compatible (unit stride in one of the last two
    dims); None if no such view exists."""
    strides, s = {}, 1
    for letter in reversed(layout):
        strides[letter] = s
        s *= sizes[letter]
    size, stride = [], []
    for g in groups:
        if not g:
            size.append(1)
            stride.append(1)
            continue
        start = layout.find(g)
        if start < 0:
            return None
        size.append(math.prod(sizes[l] for l in g))
        stride.append(strides[g[-1]])
    if size[1] > 1 and size[2] > 1 and 1 not in stride[1:]:
        return None
    if size[1] == 1:
        stride[1] = max(size[2], 1)
    if size[2] == 1:
        stride[2] = 1
    return tuple(size), tuple(stride)


@lru_cache(maxsize=1 << 16)
def _cached_read(sizes_key: tuple, layout: str, groups: tuple) -> Optional[tuple]:
    return read(layout, dict(sizes_key), groups)


def _orders(letters: set, fixed: list[str], limit: int = 24) -> list[str]:
    """Candidate orders of a letter group: as it lies in each fixed layout, or (no fixed
    layout holds it) every permutation, up to ``limit``."""
    if not letters:
        return [""]
    if fixed:
        out = []
        for lay in fixed:
            o = "".join(l for l in lay if l in letters)
            if o not in out:
                out.append(o)
        return out
    return ["".join(p) for p in itertools.islice(itertools.permutations(sorted(letters)), limit)]


def _out_layouts(b: str, rows: str, cols: str, target: Optional[str]) -> list[str]:
    """Where a step may write its ``(batch, rows, cols)`` result: the groups in any order
    with rows or columns innermost (a strided GEMM output), ``target`` first if given."""
    out = [target] if target is not None else []
    for order in ((b, rows, cols), (b, cols, rows), (rows, b, cols), (cols, b, rows)):
        layout = "".join(order)
        if layout not in out:
            out.append(layout)
    return out


def _groups(mine: str, other: str, out: str) -> tuple[set, set, set]:
    """How a step reads tensor ``mine`` beside ``other`` to make ``out``: (batch, free, bond)."""
    a, b, o = set(mine), set(other), set(out)
    return a & b & o, (a & o) - b, (a & b) - o


class _Builder:
    """Emits a program's instructions, choosing letter orders as it goes. A tensor is *fixed*
    once it has a layout; a *free* tensor (a core, packed once per call) takes whatever layout
    its step reads best."""

    def __init__(self, layouts: list[str], sizes: dict, free: set[int]):
        self.layouts = list(layouts)
        self.sizes = sizes
        self.free = set(free)
        self.code: list = []
        #: tensor -> the copy of it a step made to read it (later readers reuse the copy)
        self.copied: dict[int, int] = {}
        self._sizes_key = tuple(sorted(sizes.items()))

    def _read(self, layout: str, groups: tuple) -> Optional[tuple]:
        """:func:`read` with this program's sizes, remembered across builders (the search
        asks often, and a layer's candidate programs ask alike)."""
        return _cached_read(self._sizes_key, layout, groups)

    def new(self, layout: str) -> int:
        self.layouts.append(layout)
        return len(self.layouts) - 1

    def relayout(self, src: int, layout: str, dst: int | None = None) -> int:
        old = self.layouts[src]
        if dst is None:
            dst = self.new(layout)
        shape = tuple(self.sizes[l] for l in old)
        self.code.append(Relayout(src, dst, shape, tuple(old.index(l) for l in layout)))
        return dst

    def _consumer_misses(self, layout: str, consumers) -> int:
        """How many of the steps that read a result (each (other operand id or letters,
        output letters)) cannot read it laid out as ``layout`` in place."""
        if consumers is None:
            return 0
        if isinstance(consumers, list):
            return sum(self._consumer_misses(layout, c) for c in consumers)
        other, out = consumers
        groups = _groups(layout, other if isinstance(other, str) else self.layouts[other], out)
        fixed_other = isinstance(other, int) and other not in self.free
        orders = []
        for g in groups:
            o = "".join(l for l in layout if l in g)
            if o and o not in layout:
                return 1
            orders.append(o)
        if fixed_other:
            lo = self.layouts[other]
            for g, o in ((groups[0], orders[0]), (groups[2], orders[2])):
                if "".join(l for l in lo if l in g) != o:
                    return 1
        return 0 if self._read(layout, tuple(orders)) is not None else 1

    def contract(self, p: int, q: int, out: str, consumer=None, target: Optional[str] = None,
                 dst: Optional[int] = None, hint: Optional[str] = None) -> int:
        p, q = self.copied.get(p, p), self.copied.get(q, q)
        return self._contract(p, q, out, consumer, target, dst, hint)

    def _contract(self, p, q, out, consumer, target, dst, hint) -> int:
        """Emit ``out`` = p·q; chooses letter orders and operand roles for the fewest copies,
        now and where ``consumer`` = (other operand id or letters, its output letters) reads
        the result. With ``target``/``dst``: the result is wanted as tensor ``dst`` laid out as
        ``target`` (written in place when the chosen layout is ``target``, else copied);
        ``hint``: a layout worth trying first (no cost if not taken)."""
        lp, lq = self.layouts[p], self.layouts[q]
        sp, sq, so = set(lp), set(lq), set(out)
        batch, pfree, qfree, bond = sp & sq & so, (sp & so) - sq, (sq & so) - sp, (sp & sq) - so
        if (sp | sq) - (batch | pfree | qfree | bond):
            raise ValueError(f"{lp},{lq}->{out}: a letter is summed inside one operand")
        fixed = [lay for t, lay in ((p, lp), (q, lq)) if t not in self.free]
        best = None
        misses: dict[str, int] = {}     # layout -> consumer misses (fixed during this call)
        # The batch: the letters both operands share with the output, or (none shared) some
        # free letters of one operand, the other read with batch stride 0 (broadcast).
        splits = [(batch, None)]
        if not batch:
            for side, free_letters in ((p, pfree), (q, qfree)):
                letters = sorted(free_letters)
                for size in range(1, len(letters)):
                    splits += [(set(c), side) for c in itertools.combinations(letters, size)]
        for bset, owner in splits:
            pf = pfree - bset if owner == p else pfree
            qf = qfree - bset if owner == q else qfree
            bfixed = fixed if owner is None else [self.layouts[owner]] \
                if owner not in self.free else []
            for b, k, rows, cols in itertools.islice(itertools.product(
                    _orders(bset, bfixed), _orders(bond, fixed),
                    _orders(pf, [lp] if p not in self.free else []),
                    _orders(qf, [lq] if q not in self.free else [])), 2048):
                nb = math.prod(self.sizes[l] for l in b)
                bp = b if owner in (None, p) else ""
                bq = b if owner in (None, q) else ""
                rp = (self._read(bp + rows + k, (bp, rows, k)) if p in self.free
                      else self._read(lp, (bp, rows, k)))
                rq = (self._read(bq + k + cols, (bq, k, cols)) if q in self.free
                      else self._read(lq, (bq, k, cols)))
                copies = (rp is None) + (rq is None)
                for layout in _out_layouts(b, rows, cols, target or hint):
                    if self._read(layout, (b, rows, cols)) is None:
                        continue
                    miss = misses.get(layout)
                    if miss is None:
                        miss = misses[layout] = self._consumer_misses(layout, consumer)
                    wrong = 0 if target is None else int(layout != target)
                    key = (copies + miss + wrong, wrong, owner is not None)
                    if best is None or key < best[0]:
                        best = key, (b, k, rows, cols, rp, rq, layout, bp, bq, nb)
        b, k, rows, cols, rp, rq, layout, bp, bq, nb = best[1]
        p, rp = self._operand(p, bp + rows + k, (bp, rows, k), rp, nb)
        q, rq = self._operand(q, bq + k + cols, (bq, k, cols), rq, nb)
        res = dst if dst is not None and layout == target else self.new(layout)
        self.code.append(MatMul(Read(p, *rp), Read(q, *rq),
                                Read(res, *self._read(layout, (b, rows, cols)))))
        if dst is not None and res != dst:
            self.relayout(res, target, dst)
            return dst
        return res

    def _operand(self, t: int, layout: str, groups, r, batch: int):
        """The tensor a step reads: a free core takes ``layout``; a fixed tensor that cannot be
        read in place is copied into it."""
        if t in self.free:
            self.layouts[t] = layout
            self.free.discard(t)
        elif r is None:
            t = self.copied[t] = self.relayout(t, layout)
        size, stride = self._read(self.layouts[t], groups)
        if not groups[0] and batch > 1:         # broadcast along the other operand's batch
            size, stride = (batch,) + size[1:], (0,) + stride[1:]
        return t, (size, stride)


@lru_cache(maxsize=None)
def compile_program(equation: str, shapes: tuple[tuple[int, ...], ...],
                    steps: tuple[Step, ...], grad_as_weight: bool = False) -> Program:
    """The :class:`Program` of ``steps`` (a pairwise tree of ``equation`` over cores of
    ``shapes``, whose last step makes the weight)."""
    terms = equation.split("->")[0].split(",")
    n = len(terms)
    sizes = {l: s for t, sh in zip(terms, shapes) for l, s in zip(t, sh)}
    consumer = {}
    for k, s in enumerate(steps):
        consumer[s.left] = (k, s.right)
        consumer[s.right] = (k, s.left)
    fw = _Builder(list(terms), sizes, free=set(range(n)))
    node = {i: i for i in range(n)}        # tree node id -> program tensor id

    def reader(tree_node):
        """(the other operand as a tensor id or its letters, output letters) of the step
        that reads ``tree_node``."""
        k, other = consumer[tree_node]
        return (node[other] if other in node else _letters(steps, n, terms, other),
                steps[k].out_idx)

    for k, s in enumerate(steps[:-1]):
        node[n + k] = fw.contract(node[s.left], node[s.right], s.out_idx,
                                  consumer=reader(n + k))
    last = steps[-1]
    lid, rid = node[last.left], node[last.right]
    gemm_order = None
    for t in (lid, rid):                    # a core read only by the last step
        if t in fw.free:
            fw.free.discard(t)
    # The last step reads its operands as (B, M, K) and (B, K, N) matrices.
    lb, lf, lk = _groups(fw.layouts[lid], fw.layouts[rid], last.out_idx)
    _, rf, _ = _groups(fw.layouts[rid], fw.layouts[lid], last.out_idx)
    lay_l, lay_r = fw.layouts[lid], fw.layouts[rid]
    b = "".join(l for l in lay_l if l in lb)
    k = "".join(l for l in lay_l if l in lk)
    rows = "".join(l for l in lay_l if l in lf)
    cols = "".join(l for l in lay_r if l in rf)
    rp = read(lay_l, sizes, (b, rows, k))
    if rp is None:
        lid = fw.relayout(lid, b + rows + k)
        rp = read(fw.layouts[lid], sizes, (b, rows, k))
    rq = read(lay_r, sizes, (b, k, cols))
    if rq is None:
        rid = fw.relayout(rid, b + k + cols)
        rq = read(fw.layouts[rid], sizes, (b, k, cols))
    gemm_order = b + rows + cols
    packed = tuple(Relayout(i, i, shapes[i], tuple(terms[i].index(l) for l in fw.layouts[i]))
                   for i in range(n) if fw.layouts[i] != terms[i])
    forward = ((packed,) if packed else ()) + tuple(fw.code)
    gemm = (math.prod(sizes[l] for l in b), math.prod(sizes[l] for l in rows),
            math.prod(sizes[l] for l in cols), math.prod(sizes[l] for l in k))

    # Backward: dT -> the last step's operands -> the reverse sweep -> every core.
    bw = _Builder(fw.layouts, sizes, free=set())
    bw.copied = dict(fw.copied)
    # dL/dT as the weight lies (read in place), or permuted into the GEMM's order first.
    grad_t = bw.new(last.out_idx if grad_as_weight else gemm_order)
    core_grads = [bw.new(terms[i]) for i in range(n)]
    grads: dict[int, int] = {}           # tree node id -> program tensor of its gradient
    unpack = []

    def emit_grad(tree_node: int, p: int, q: int, letters: str) -> None:
        if tree_node < n:
            g = bw.contract(p, q, letters, target=terms[tree_node])
            if bw.layouts[g] == terms[tree_node]:
                mm = bw.code[-1]
                bw.code[-1] = MatMul(mm.a, mm.b, Read(core_grads[tree_node], mm.out.size,
                                                      mm.out.stride))
            else:
                unpack.append(Relayout(g, core_grads[tree_node], tuple(
                    sizes[l] for l in bw.layouts[g]),
                    tuple(bw.layouts[g].index(l) for l in terms[tree_node])))
        else:
            s = steps[tree_node - n]
            readers = [(node[s.right], s.left_idx), (node[s.left], s.right_idx)]
            grads[tree_node] = bw.contract(p, q, letters, consumer=readers,
                                           hint=bw.layouts[node[tree_node]])

    emit_grad(last.left, grad_t, rid, last.left_idx)
    emit_grad(last.right, lid, grad_t, last.right_idx)
    for k in range(len(steps) - 2, -1, -1):
        s = steps[k]
        g = grads.pop(n + k)
        emit_grad(s.left, g, node[s.right], s.left_idx)
        emit_grad(s.right, node[s.left], g, s.right_idx)
    backward = _hoisted(tuple(bw.code), set(range(len(fw.layouts)))) \
        + ((tuple(unpack),) if unpack else ())
    to_weight = tuple(gemm_order.index(l) for l in last.out_idx)
    numel = {t: math.prod(sizes[l] for l in lay) for t, lay in enumerate(bw.layouts)}
    saved, recompute = _keep(forward, backward, (lid, rid), n, numel,
                             math.prod(sizes[l] for l in last.out_idx))
    offsets, total = [], 0
    for t in saved:
        offsets.append(total)
        total += numel[t]
    return Program(n, tuple(bw.layouts), tuple(sorted(sizes.items())), saved, tuple(offsets),
                   total, forward, Read(lid, *rp), Read(rid, *rq), gemm, gemm_order, to_weight,
                   grad_t, recompute, backward, tuple(core_grads))


def _hoisted(code: tuple, ready: set[int]) -> tuple:
    """``code`` with every relayout of a tensor that exists before it starts (``ready``: the
    cores and the forward's results) moved into one group at its start: one call instead of
    several."""
    early = tuple(op for op in code if isinstance(op, Relayout) and op.src in ready)
    rest = tuple(op for op in code if op not in early)
    if len(early) < 2:
        return code
    return (early,) + rest


#: What a forward may keep for its backward: this fraction of the weight's size, or (small
#: layers) :data:`KEEP_ELEMENTS` (512 KB in fp32); beyond it the largest intermediates are
#: rebuilt in backward, a call each. At r=4 every DDPM layer's intermediates fit for TenVOO-L
#: (none is rebuilt); operator calls, not these bytes, bind the step.
KEEP_FRACTION = 0.1
KEEP_ELEMENTS = 1 << 17


def _outputs(op) -> list[int]:
    if isinstance(op, tuple):
        return [r.dst for r in op]
    return [op.dst] if isinstance(op, Relayout) else [op.out.tensor]


def _inputs(op) -> list[int]:
    if isinstance(op, tuple):           # a pack (src == dst) reads the caller's cores
        return [r.src for r in op if r.src != r.dst]
    return [op.src] if isinstance(op, Relayout) else [op.a.tensor, op.b.tensor]


def _keep(forward, backward, last_operands, n, numel, weight_numel):
    """(tensors the forward keeps, forward instructions the backward re-runs): everything the
    backward reads, unless that exceeds the keep limit (:data:`KEEP_FRACTION`); then the last
    step's operands, and next the largest kept results, are rebuilt instead (each costs one
    call in backward), until what is kept fits."""
    limit = max(KEEP_FRACTION * weight_numel, KEEP_ELEMENTS)
    produced = {t for op in forward for t in _outputs(op)}
    wanted = {t for op in backward for t in _inputs(op)} | set(last_operands)
    producer = {t: op for op in forward if not isinstance(op, tuple) for t in _outputs(op)}
    rebuilt: set[int] = set()

    def plan():
        recompute = tuple(op for op in forward if not isinstance(op, tuple)
                          and set(_outputs(op)) & rebuilt)
        inputs = {t for op in recompute for t in _inputs(op)}
        return ((produced & (wanted | inputs)) - rebuilt), recompute

    def rebuild(t):
        while t in producer and t not in rebuilt:
            rebuilt.add(t)
            op = producer[t]
            if not isinstance(op, Relayout):
                break
            t = op.src

    keep, recompute = plan()
    if sum(numel[t] for t in keep) > limit:
        for t in last_operands:
            rebuild(t)
        keep, recompute = plan()
    while sum(numel[t] for t in keep) > limit:
        candidates = [t for t in keep if t in producer]
        if not candidates:
            break
        rebuild(max(candidates, key=lambda t: numel[t]))
        keep, recompute = plan()
    return tuple(sorted(keep)), recompute


def _letters(steps, n, terms, tree_node) -> str:
    return terms[tree_node] if tree_node < n else steps[tree_node - n].out_idx


#: opt_einsum's path finders tried for a program's tree.
PATH_FINDERS = ("dp", "greedy", "branch-2", "branch-all")
#: A tree may cost this much more than the cheapest (in opt_einsum's flop count) if it saves
#: operator calls: the small steps are a few kflops at the ranks used, the calls are not free.
FLOP_SLACK = 1.5
#: Trees to try beside opt_einsum's, per equation (as the program sees it, pre-reduced): node-id
#: pairs (0..n-1 the cores, n.. the results in order), found by :mod:`.tree_search` and declared
#: by the methods whose networks they suit (:func:`declare_trees`).
DECLARED_TREES: dict[str, tuple[tuple[tuple[int, int], ...], ...]] = {}


def declare_trees(equation: str, trees) -> None:
    """Let the planner try ``trees`` (node-id pairs) for ``equation`` beside opt_einsum's."""
    n = equation.count(",") + 1
    for pairs in trees:
        ids = sorted(i for pair in pairs for i in pair)
        if len(pairs) != n - 1 or ids != list(range(2 * n - 2)):
            raise ValueError(f"{pairs} is not a pairwise tree over the {n} tensors of "
                             f"{equation}")
    DECLARED_TREES[equation] = tuple(tuple(tuple(p) for p in pairs) for pairs in trees)
    candidates.cache_clear()
    program_for.cache_clear()


@lru_cache(maxsize=None)
def opt_einsum_trees(equation: str, shapes: tuple[tuple[int, ...], ...]
                     ) -> tuple[tuple[int, tuple[Step, ...]], ...]:
    """``(flops, steps)`` of every pairwise tree opt_einsum's path finders propose (and its
    dynamic programming by fewest written elements)."""
    found = {}
    finders = PATH_FINDERS + (opt_einsum.DynamicProgramming(minimize="write"),)
    for finder in finders:
        if finder == "branch-all" and equation.count(",") > 8:
            continue
        path, info = opt_einsum.contract_path(equation, *shapes, shapes=True, optimize=finder)
        if any(len(p) != 2 for p in path):
            continue
        found[tree_steps(equation, path)] = int(info.opt_cost)
    return tuple((cost, steps) for steps, cost in found.items())


def tree_cost(equation: str, shapes, pairs) -> tuple[int, tuple[Step, ...]]:
    """(opt_einsum's flop count, the pairwise steps) of the tree ``pairs`` (node-id pairs)."""
    path = linear_path(pairs, equation.count(",") + 1)
    _, info = opt_einsum.contract_path(equation, *shapes, shapes=True, optimize=path)
    return int(info.opt_cost), tree_steps(equation, path)


def _declared(equation: str, shapes) -> tuple[tuple[int, tuple[Step, ...]], ...]:
    return tuple(tree_cost(equation, shapes, pairs)
                 for pairs in DECLARED_TREES.get(equation, ()))


@lru_cache(maxsize=None)
def _compiled(equation: str, shapes, steps, as_weight: bool) -> "Program":
    return compile_program(equation, shapes, steps, as_weight)


def _programs(trees, equation, shapes, slack) -> tuple[tuple[int, "Program"], ...]:
    """Both programs (dL/dT read either way) of each distinct tree within ``slack`` of the
    fewest flops among ``trees``."""
    cheapest = min(cost for cost, _ in trees)
    seen, out = set(), []
    for cost, steps in trees:
        if cost <= slack * cheapest and steps not in seen:
            seen.add(steps)
            out += [(cost, _compiled(equation, shapes, steps, as_weight))
                    for as_weight in (False, True)]
    return tuple(out)


def opt_einsum_candidates(equation: str, shapes: tuple[tuple[int, ...], ...],
                          slack: float = None) -> tuple[tuple[int, "Program"], ...]:
    """``(flops, program)`` of opt_einsum's trees within ``slack`` (:data:`FLOP_SLACK`) of
    the fewest flops (the declared trees left out)."""
    slack = FLOP_SLACK if slack is None else slack
    return _programs(opt_einsum_trees(equation, shapes), equation, shapes, slack)


@lru_cache(maxsize=None)
def candidates(equation: str, shapes: tuple[tuple[int, ...], ...],
               slack: float = None) -> tuple[tuple[int, "Program"], ...]:
    """``(flops, program)`` of opt_einsum's trees and the declared ones
    (:data:`DECLARED_TREES`) within ``slack`` (:data:`FLOP_SLACK`) of the fewest flops."""
    slack = FLOP_SLACK if slack is None else slack
    trees = opt_einsum_trees(equation, shapes) + _declared(equation, shapes)
    return _programs(trees, equation, shapes, slack)


@lru_cache(maxsize=None)
def program_for(equation: str, shapes: tuple[tuple[int, ...], ...]) -> Program:
    """The cheapest :class:`Program` for ``equation``: among the trees opt_einsum's path
    finders propose and the declared ones, the fewest operator calls (copies count), within
    :data:`FLOP_SLACK` of the fewest flops."""
    return min(candidates(equation, shapes), key=lambda t: (calls(t[1]), t[0]))[1]


def calls(p: Program) -> int:
    """Operator calls of a program's forward and backward: its instructions (a pack of two or
    more cores is a ``cat`` and a gather), the forward instructions the backward re-runs, and
    the permuting pass of dL/dW into the GEMM's order
    (:func:`~tenvoo_fast.kernels.torch_last_step.grad_gemm`) when it needs one."""
    pack = p.forward[0] if p.forward and isinstance(p.forward[0], tuple) else ()
    packs_cores = len(pack) > 1 and all(r.src == r.dst for r in pack)
    return (len(p.forward) + len(p.backward) + len(p.recompute) + int(packs_cores)
            + int(not p.grad_as_weight))


# -- running a program in torch ------------------------------------------------------------------
# A tensor of a running program is a place: (a flat buffer or a core, element offset). Every
# operand is one ``as_strided`` view of its place: views cost host time too.

def _contiguous(shape) -> tuple[int, ...]:
    out, s = [], 1
    for n in reversed(shape):
        out.append(s)
        s *= n
    return tuple(reversed(out))


def _view(place, size, stride) -> torch.Tensor:
    base, offset = place
    return base.as_strided(size, stride, base.storage_offset() + offset)


@lru_cache(maxsize=None)
def _relayout_views_of(r: Relayout):
    """(dst size, dst stride, src size, src stride) of a relayout, all as one view each."""
    src_stride = _contiguous(r.shape)
    size = tuple(r.shape[p] for p in r.perm)
    return size, _contiguous(size), size, tuple(src_stride[p] for p in r.perm)


def _pair(r: Relayout, places: dict, sources: dict | None):
    dsize, dstride, ssize, sstride = _relayout_views_of(r)
    packing = sources is not None and r.src == r.dst      # a core into its packed layout
    return (_view(places[r.dst], dsize, dstride),
            _view((sources if packing else places)[r.src], ssize, sstride))


def _loops(places: dict) -> bool:
    """Whether this call runs on the C++ runner's CPU loops (else as ATen calls, as on a GPU)."""
    if not (native_runner.available() and native_runner.LOOPS) or native_runner.watched():
        return False
    buf = next(iter(places.values()))[0]
    return buf.is_cpu


def _run(code, places: dict, sources: dict | None = None) -> None:
    """Run ``code``; a group of relayouts is one gather (``index_select``) per source buffer
    except on the CPU loops (where it is a loop per relayout)."""
    if _loops(places):
        native_runner.run(code, places, sources, _relayout_views_of)
        return
    for segment in _segments(code):
        if isinstance(segment, _Group):
            _gather(segment.ops, places, sources)
        elif native_runner.available():       # the same calls, issued from C++
            native_runner.run(segment, places, None, _relayout_views_of)
        else:
            for op in segment:
                if isinstance(op, Relayout):
                    dst, src = _pair(op, places, None)
                    dst.copy_(src)
                else:
                    torch.bmm(_view(places[op.a.tensor], op.a.size, op.a.stride),
                              _view(places[op.b.tensor], op.b.size, op.b.stride),
                              out=_view(places[op.out.tensor], op.out.size, op.out.stride))


@dataclass(frozen=True)
class _Group:
    ops: tuple


_SEGMENTS: dict = {}


def _segments(code) -> tuple:
    """``code`` split into runs of single instructions and :class:`_Group`s (cached; the
    runs are kept objects, so the C++ runner's table cache finds them again)."""
    entry = _SEGMENTS.get(id(code))
    if entry is None or entry[0] is not code:
        out, run = [], []
        for op in code:
            if isinstance(op, tuple):
                if run:
                    out.append(tuple(run))
                    run = []
                out.append(_Group(op))
            else:
                run.append(op)
        if run:
            out.append(tuple(run))
        entry = _SEGMENTS[id(code)] = (code, tuple(out))
    return entry[1]


# Gather indices are made with NumPy (once per program and device): no operator call that
# a launch counter would see.
@lru_cache(maxsize=None)
def _relayout_index(r: Relayout) -> np.ndarray:
    """Where each element of ``r``'s destination (contiguous, in order) lies in its source."""
    n = math.prod(r.shape)
    return np.arange(n, dtype=np.int64).reshape(r.shape).transpose(r.perm).reshape(-1)


_INDEX: dict = {}


def _index(key, parts, device) -> torch.Tensor:
    """One int64 index on ``device`` from ``parts`` ((index array, offset) pairs); cached."""
    idx = _INDEX.get(key)
    if idx is None:
        idx = _INDEX[key] = torch.from_numpy(np.concatenate([i + o for i, o in parts])).to(device)
    return idx


def _gather(group: tuple, places: dict, sources: dict | None) -> None:
    """A group of relayouts as one ``index_select`` per source buffer whose destinations lie
    back to back in one buffer (else a copy each: CUDA's ``_foreach_copy_`` would run one
    kernel per relayout of differing strides, too). Packing reads the caller's cores: they
    are concatenated first (one call)."""
    packing = sources is not None and all(r.src == r.dst for r in group)
    if packing:
        flat = torch.cat([sources[r.src][0].reshape(-1) for r in group])
        src_at, offset = {}, 0
        for r in group:
            src_at[r.src] = (flat, offset)
            offset += math.prod(r.shape)
    else:
        src_at = places
    by_source: dict = {}
    for r in group:
        by_source.setdefault(id(src_at[r.src][0]), []).append(r)
    for rs in by_source.values():
        buf, _ = src_at[rs[0].src]
        dst_buf, start = places[rs[0].dst]
        end, back_to_back = start, True
        for r in rs:
            b, o = places[r.dst]
            back_to_back &= b is dst_buf and o == end
            end = o + math.prod(r.shape)
        if not (back_to_back and buf.dim() == 1 and dst_buf.dim() == 1) or (
                buf is dst_buf and len(rs) < 3):
            for r in rs:
                dst, src = _pair(r, places, sources if packing else None)
                dst.copy_(src)
            continue
        # The group belongs to a cached program, so its id is stable; the sources' offsets
        # are fixed per program (a packing's by the group itself).
        key = (id(group), id(rs[0]), src_at[rs[0].src][1], buf.device)
        idx = _index(key, [(_relayout_index(r), src_at[r.src][1]) for r in rs], buf.device)
        if buf is not dst_buf:
            torch.index_select(buf, 0, idx, out=dst_buf[start:end])
        else:                       # within one buffer: gather, then one copy back
            dst_buf[start:end].copy_(torch.index_select(buf, 0, idx))


@dataclass(frozen=True)
class _TorchLayout:
    """Where the torch runner keeps a program's tensors between forward and backward.

    Where the program packs two or more cores into other layouts, every (pre-reduced) core is
    packed, back to back at the start of the kept buffer, by one gather (then the backward's
    relayouts of cores and kept results read one buffer: one gather too); else the cores are
    read where they lie. The cores' gradients are written straight into one flat output where
    each is made in its stored layout, else all are gathered into it at the end (relayouts
    and the pre-reduction's broadcasts in one call)."""
    pack: tuple                 # code packing the cores (run with the caller's cores)
    forward: tuple              # the forward's code after the packing
    offsets: dict               # kept tensor id -> offset in the kept buffer
    numel: int
    backward: tuple             # recompute + backward, less a final unpack (gathered)
    run_backward: tuple         # the same without the recompute
    unpack: dict                # core grad id -> (source id, Relayout or None: in place)
    unpacks: bool               # the program relayouts some core gradient at the end


def torch_layout(prog: Program) -> _TorchLayout:
    """The program's :class:`_TorchLayout` (made once, kept on the program)."""
    lay = prog.__dict__.get("_torch_layout")
    if lay is None:
        lay = prog.__dict__["_torch_layout"] = _torch_layout(prog)
    return lay


def _torch_layout(prog: Program) -> _TorchLayout:
    packs = {r.dst: r for op in prog.forward if isinstance(op, tuple) for r in op
             if r.src == r.dst}
    starts_with_pack = bool(prog.forward) and isinstance(prog.forward[0], tuple) and all(
        r.src == r.dst for r in prog.forward[0])
    offsets, total = {}, 0
    if len(packs) >= 2:
        pack = []
        for i in range(prog.n_cores):
            r = packs.get(i) or Relayout(i, i, prog.shape(i), tuple(range(len(prog.shape(i)))))
            pack.append(r)
            offsets[i] = total
            total += prog.numel(i)
        pack_code = (tuple(pack),)
        forward = prog.forward[1:] if starts_with_pack else prog.forward
    else:
        pack_code, forward = (), prog.forward
    for t in prog.saved:
        if t not in offsets:
            offsets[t] = total
            total += prog.numel(t)
    grads = set(prog.core_grads)
    unpack = {t: (t, None) for t in prog.core_grads}
    backward, unpacks = prog.backward, False
    if backward and isinstance(backward[-1], tuple) and all(r.dst in grads
                                                            for r in backward[-1]):
        for r in backward[-1]:
            unpack[r.dst] = (r.src, r)
        backward, unpacks = backward[:-1], True       # the final gather does it
    return _TorchLayout(pack_code, forward, offsets, total, prog.recompute + backward,
                        backward, unpack, unpacks)


def keeps_cores(prog: Program) -> bool:
    """Whether the forward keeps every (pre-reduced) core in its kept buffer (the backward
    then needs no core of the caller's)."""
    return bool(torch_layout(prog).pack)


def kept_numel(prog: Program) -> int:
    """Elements of the buffer the torch runner keeps from forward for backward."""
    return torch_layout(prog).numel


_SCRATCH: dict = {}


def _scratch_layout(prog: Program, code, places,
                    tag=None) -> tuple[tuple[tuple[int, int], ...], int]:
    """(tensor, offset) of every result of ``code`` not already placed (in ``places``), in one
    buffer; cached (the placed ids are the same on every call with this code and ``tag``)."""
    key = (id(prog), id(code), tag)
    entry = _SCRATCH.get(key)
    if entry is None or entry[0] is not code:
        taken = frozenset(places)
        out, total = [], 0
        for op in code:
            for t in _outputs(op):
                if t not in taken and all(t != o for o, _ in out):
                    out.append((t, total))
                    total += prog.numel(t)
        entry = _SCRATCH[key] = (code, tuple(out), total)
    return entry[1], entry[2]


def _originals(cores) -> dict:
    """The caller's cores as places (none: the forward kept them all)."""
    if cores is None:
        return {}
    return {i: (c if c.is_contiguous() else c.contiguous(), 0) for i, c in enumerate(cores)}


def _places(prog: Program, kept, originals: dict, code, fixed: dict | None = None,
            tag=None) -> dict:
    """Places of the cores (in ``kept`` where packed, else the caller's ``originals``), the
    kept results, ``fixed`` (id -> place; ``tag`` names which ids it holds) and, in one fresh
    buffer, ``code``'s others."""
    places = dict(originals)
    for t, o in torch_layout(prog).offsets.items():
        places[t] = (kept, o)
    if fixed:
        places.update(fixed)
    layout, total = _scratch_layout(prog, code, places, tag)
    if total:
        buffer = kept.new_empty(total)
        for t, o in layout:
            places[t] = (buffer, o)
    return places


def _operands(prog: Program, places: dict):
    return (_view(places[prog.left.tensor], prog.left.size, prog.left.stride),
            _view(places[prog.right.tensor], prog.right.size, prog.right.stride))


def run_forward(prog: Program, cores) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kept, left, right): what the backward needs (packed cores, kept results) in one flat
    buffer, and the last step's operands as ``(B, M, K)`` / ``(B, K, N)`` strided views."""
    lay = torch_layout(prog)
    kept = cores[0].new_empty(lay.numel)
    originals = _originals(cores)
    places = _places(prog, kept, originals, lay.forward)
    if lay.pack:
        _run(lay.pack, places, sources=originals)
    _run(lay.forward, places, sources=originals)
    return (kept, *_operands(prog, places))


@dataclass
class BackwardState:
    """Where a backward's tensors lie (:func:`operands`), for :func:`run_backward`."""
    places: dict
    code: tuple                 # the backward instructions to run
    flat: Optional[torch.Tensor]  # the cores' gradients, written in place (else gathered)


def operands(prog: Program, cores, kept: torch.Tensor, plan):
    """(left, right, state): the last step's operands from a forward's ``kept`` buffer
    (re-running the forward instructions it did not keep), and where every tensor of the
    backward lies (the cores' gradients in one flat output when each is made in its stored
    layout)."""
    lay = torch_layout(prog)
    direct = not lay.unpacks and not any(plan.sum_axes)     # (squeezed axes have size 1)
    fixed, flat = {prog.grad_t: (kept, 0)}, None     # dL/dT: the caller's, given later
    if direct:
        flat = kept.new_empty(sum(prog.numel(t) for t in prog.core_grads))
        at = 0
        for t in prog.core_grads:
            fixed[t] = (flat, at)
            at += prog.numel(t)
    places = _places(prog, kept, _originals(cores), lay.backward, fixed, direct)
    _run(prog.recompute, places)
    return (*_operands(prog, places), BackwardState(places, lay.run_backward, flat))


def run_backward(prog: Program, cores, kept: torch.Tensor, grad_t: torch.Tensor, plan,
                 state: BackwardState | None = None) -> torch.Tensor:
    """Every stored core's gradient, back to back in one flat tensor (each in the stored
    core's shape, contraction dtype), from dL/dT (laid out as the weight); ``plan``: the
    pre-reduction (its summed axes broadcast back by the final gather); ``state``: from
    :func:`operands`."""
    if state is None:
        state = operands(prog, cores, kept, plan)[2]
    places = state.places
    places[prog.grad_t] = (grad_t.contiguous(), 0)
    _run(state.code, places)
    if state.flat is not None:
        return state.flat
    lay = torch_layout(prog)
    buf = places[lay.unpack[prog.core_grads[0]][0]][0]
    key = ("grads", id(prog), id(plan), buf.device)   # both cached for good (lru_cache)
    idx = _INDEX.get(key)
    if idx is None:
        parts = []
        for i, t in enumerate(prog.core_grads):
            src, r = lay.unpack[t]
            b, o = places[src]
            if b is not buf:
                raise AssertionError("core gradients outside the backward's buffer")
            local = (_relayout_index(r) if r is not None
                     else np.arange(prog.numel(t), dtype=np.int64))
            parts.append((_broadcast_back(plan, i, local.reshape(prog.shape(t))), o))
        idx = _index(key, parts, buf.device)
    return torch.index_select(buf, 0, idx)


def _broadcast_back(plan, i: int, local: torch.Tensor) -> torch.Tensor:
    """A reduced core's element index, broadcast to the stored core's shape (the axes the
    pre-reduction summed or squeezed), flat."""
    axes = sorted(set(plan.sum_axes[i]) | set(plan.squeeze_axes[i]))
    for a in axes:
        local = np.expand_dims(local, a)
    return np.broadcast_to(local, plan.stored_shapes[i]).reshape(-1)
