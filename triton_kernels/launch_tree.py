"""An adapter's whole contraction in a few launches: the merged strategy's Triton path.

A compiled :class:`~tenvoo_fast.contraction.program.Program` is encoded once, per equation and
core shapes, into :mod:`.tree`'s instruction table (a device tensor, cached), and runs as

- forward: :func:`forward` (one launch: the redundant axes pre-reduced, every small step, all
  results kept in one buffer for the backward, a few KB at r=4) and :func:`build` (one launch:
  ``W + (scale*T - T0)`` written in the weight's layout and compute dtype);
- backward: :func:`build` again when the input gradient needs the weight, then
  :func:`core_grads`: one launch contracts dL/dW with both last-step operands
  (:func:`~.last_step.grads_kernel`), one runs the reverse sweep down to every core's gradient
  in the core's own shape (broadcast back over pre-reduced axes).

So an adapted layer costs five launches per training step beside its conv, plus one per
instruction too large for one program instance (:data:`SPLIT_ELEMENTS`: TenVOO-Q's wide operand
on large layers). :func:`fused_for` says None for a network the table cannot express (more than
:data:`~.tree.MAX_CORES` cores, more than two summed axes in one core) or whose every tree ends
in a pure Hadamard product (each GEMM tile would hold one element); those run the per-step path
of :mod:`.launch_last_step`. (LoHa contracts as ``(w1a ⊙ w2a) @ (w1b ⊙ w2b)`` over the rank
pair instead.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch
import triton

from ..contraction.last_step import letter_offsets
from ..contraction.prereduce import plan as reduction_plan
from ..contraction.program import MatMul, Relayout, _contiguous, candidates, read
from . import last_step as ls
from . import tree as k
from .launch_last_step import grid_of_grads
from .launching import launch

SAVED, SCRATCH, CORE, GRAD = 0, 1, 2, 2 + k.MAX_CORES
#: An instruction writing more elements than this gets its own launch over many program
#: instances; smaller ones run together on one (one SM streams ~1e5 elements in the time the
#: host takes to issue a launch).
SPLIT_ELEMENTS = 1 << 17
#: A tree may cost this many times the fewest flops if it saves launches (at the ranks used,
#: the flops of a whole tree take microseconds on a GPU; LoHa's rank-pair GEMM costs r/2 times
#: its Hadamard form's).
FLOP_SLACK = 4.0
#: The most program instances a split instruction is launched over.
MAX_PROGRAMS = 1024


@dataclass(frozen=True)
class Operand:
    """A strided ``(batch, rows, cols)`` view of a region at an element offset."""
    region: int
    offset: int
    stride: tuple[int, int, int]


@dataclass(frozen=True, eq=False)      # hashed by identity: a cache key on every launch
class Fused:
    """A program as :mod:`.tree` runs it: rows ``[0, n_forward)`` are the forward, the rest
    the reverse sweep after the last step's gradients."""
    code: tuple[tuple[int, ...], ...]
    n_forward: int
    forward_launches: tuple[tuple[int, int, int], ...]
    backward_launches: tuple[tuple[int, int, int], ...]
    n_cores: int
    saved_numel: int
    scratch_numel: int
    gemm: tuple[int, int, int, int]
    left: Operand
    right: Operand
    grad_left: Operand
    grad_right: Operand
    offsets: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


def _merged(sizes, src, dst):
    """Drop size-1 dims and merge neighbours contiguous in both source and destination."""
    dims = [(n, s, d) for n, s, d in zip(sizes, src, dst) if n != 1] or [(1, 0, 0)]
    out = [dims[0]]
    for n, s, d in dims[1:]:
        pn, ps, pd = out[-1]
        if ps == s * n and pd == d * n:
            out[-1] = (pn * n, s, d)
        else:
            out.append((n, s, d))
    return out


def _copy_row(src, dst, sizes, src_strides, dst_strides, sums=()) -> tuple[int, ...]:
    """A COPY row: ``dst[i] = sum of src[i]`` over ``sums`` (at most two (size, src stride))."""
    dims = _merged(sizes, src_strides, dst_strides)
    if len(dims) > k.MAX_DIMS or len(sums) > 2:
        raise _Unsupported(f"{len(dims)} dims, {len(sums)} summed")
    row = [0] * k.ROW
    row[0], row[1], row[2] = k.COPY, len(dims), math.prod(n for n, _, _ in dims)
    row[3] = math.prod(n for n, _ in sums) if sums else 1
    row[4:8] = [src[0], src[1], dst[0], dst[1]]
    for j, (n, s, d) in enumerate(dims):
        row[k.SIZES + j], row[k.SRC_STRIDES + j], row[k.DST_STRIDES + j] = n, s, d
    sums = list(sums) + [(1, 0)] * (2 - len(sums))
    row[k.SUMS], row[k.SUMS + 1] = sums[0][0], sums[1][0]
    row[k.SUMS + 2], row[k.SUMS + 3] = sums[0][1], sums[1][1]
    return tuple(row)


def _work(row) -> tuple[int, int]:
    """(elements written, program instances that can share them) of an instruction."""
    if row[0] == k.MATMUL:
        B, M, N = row[1:4]
        return B * M * N, B * triton.cdiv(M, k.BLOCK_M) * triton.cdiv(N, k.BLOCK_N)
    return row[2], triton.cdiv(row[2], k.BLOCK_COPY)


def launches(rows, start: int, stop: int) -> tuple[tuple[int, int, int], ...]:
    """``(start, stop, programs)`` per launch: runs of small instructions on one program
    instance, each large one (:data:`SPLIT_ELEMENTS`) over up to :data:`MAX_PROGRAMS`."""
    out, run = [], start
    for i in range(start, stop):
        elements, programs = _work(rows[i])
        if elements > SPLIT_ELEMENTS:
            if run < i:
                out.append((run, i, 1))
            out.append((i, i + 1, min(programs, MAX_PROGRAMS)))
            run = i + 1
    if run < stop:
        out.append((run, stop, 1))
    return tuple(out)


def _matmul_row(op: MatMul, a, b, out) -> tuple[int, ...]:
    row = [0] * k.ROW
    row[0] = k.MATMUL
    row[1:5] = [op.a.size[0], op.a.size[1], op.b.size[2], op.a.size[2]]
    for at, (region, offset), read_ in ((k.A, a, op.a), (k.B_, b, op.b), (k.OUT, out, op.out)):
        row[at:at + 5] = [region, offset, *read_.stride]
    return tuple(row)


class _Unsupported(Exception):
    pass


class _Encoder:
    def __init__(self, prog):
        self.prog = prog
        self.place: dict[int, tuple[int, int]] = {}
        self.totals = {SAVED: 0, SCRATCH: 0}
        self.rows: list[tuple[int, ...]] = []

    def alloc(self, region: int, numel: int) -> tuple[int, int]:
        at = self.totals[region]
        self.totals[region] += numel
        return region, at

    def out(self, t: int, region: int) -> tuple[int, int]:
        if t not in self.place:
            self.place[t] = self.alloc(region, self.prog.numel(t))
        return self.place[t]

    def relayout(self, r: Relayout, src, dst) -> None:
        shape = r.shape
        strides = _contiguous(shape)
        dshape = [shape[p] for p in r.perm]
        self.rows.append(_copy_row(src, dst, dshape, [strides[p] for p in r.perm],
                                   _contiguous(dshape)))

    def run(self, code, region: int, skip=()) -> None:
        for op in code:
            for r in (op if isinstance(op, tuple) else (op,)):
                if isinstance(r, Relayout):
                    if r.src == r.dst:                    # a core into its packed layout
                        src = self.place[r.src]
                        del self.place[r.src]
                        self.relayout(r, src, self.out(r.dst, region))
                    else:
                        self.relayout(r, self.place[r.src], self.out(r.dst, region))
                elif r not in skip:
                    self.rows.append(_matmul_row(r, self.place[r.a.tensor],
                                                 self.place[r.b.tensor], self.out(r.out.tensor,
                                                                                  region)))


def _groups(prog):
    """(batch, rows, cols, bond) letters of the last step, as its operands' reads order them."""
    lft, rgt = prog.layouts[prog.left.tensor], prog.layouts[prog.right.tensor]
    g = prog.gemm_order
    b = "".join(l for l in g if l in lft and l in rgt)
    rows = "".join(l for l in g if l in lft and l not in rgt)
    cols = "".join(l for l in g if l in rgt and l not in lft)
    bond = "".join(l for l in lft if l in rgt and l not in g)
    if "".join(l for l in rgt if l in bond) != bond:
        raise _Unsupported("the operands order the bond differently")
    return b, rows, cols, bond


@lru_cache(maxsize=None)
def fused_for(equation: str, shapes: tuple[tuple[int, ...], ...]) -> Optional[Fused]:
    """The :class:`Fused` program of ``equation`` over stored cores of ``shapes``, or None if
    the tree kernel cannot run it."""
    if len(shapes) > k.MAX_CORES:
        return None
    try:
        fused = _encode(equation, shapes)
    except _Unsupported:
        return None
    return fused


def _encode(equation, shapes) -> Fused:
    """The candidate program (:func:`~tenvoo_fast.contraction.program.candidates` within
    :data:`FLOP_SLACK`) with the fewest launches, then the fewest flops."""
    p = reduction_plan(equation, shapes)
    best = None
    for cost, prog in candidates(p.equation, p.shapes, FLOP_SLACK):
        if prog.gemm[1] * prog.gemm[2] == 1:     # a pure Hadamard product: see above
            continue
        if prog.layouts[prog.grad_t] != prog.gemm_order:   # its grads kernel reads dL/dW itself
            continue
        fused = _encode_program(equation, shapes, p, prog)
        key = (len(fused.forward_launches) + len(fused.backward_launches), cost)
        if best is None or key < best[0]:
            best = key, fused
    if best is None:
        raise _Unsupported("every tree ends in a Hadamard product")
    return best[1]


def _encode_program(equation, shapes, p, prog) -> Fused:
    n = prog.n_cores
    enc = _Encoder(prog)
    # Forward: pre-reduce (a squeeze alone changes no memory), then every step.
    for i, shape in enumerate(shapes):
        if not p.sum_axes[i]:
            enc.place[i] = (CORE + i, 0)
            continue
        strides = _contiguous(shape)
        gone = set(p.sum_axes[i]) | set(p.squeeze_axes[i])
        kept = [a for a in range(len(shape)) if a not in gone]
        dst = enc.out(i, SAVED)
        reduced = [shape[a] for a in kept]
        enc.rows.append(_copy_row((CORE + i, 0), dst, reduced, [strides[a] for a in kept],
                                  _contiguous(reduced),
                                  [(shape[a], strides[a]) for a in p.sum_axes[i]]))
    enc.run(prog.forward, SAVED)
    n_forward = len(enc.rows)
    left, right = prog.left, prog.right
    operands = [Operand(*enc.place[r.tensor], r.stride) for r in (left, right)]

    # Backward: dL/dW -> both operands' gradients (grads_kernel), then the reverse sweep.
    for i in range(n):
        if not p.sum_axes[i]:
            enc.place[prog.core_grads[i]] = (GRAD + i, 0)
    b, rows, cols, bond = _groups(prog)
    sizes = dict(prog.sizes)
    first = [op for op in prog.backward if isinstance(op, MatMul)
             and prog.grad_t in (op.a.tensor, op.b.tensor)]
    if len(first) != 2:
        raise _Unsupported("the last step's gradient is not two GEMMs")
    grads = {}
    for op in first:
        t = op.out.tensor
        other = op.b.tensor if op.a.tensor == prog.grad_t else op.a.tensor
        side = "left" if other == right.tensor else "right"
        groups = (b, rows, bond) if side == "left" else (b, bond, cols)
        direct = read(prog.layouts[t], sizes, groups)
        if direct is not None:
            grads[side] = Operand(*enc.out(t, SCRATCH), direct[1])
            continue
        canonical = groups[0] + groups[1] + groups[2]
        shape = [sizes[l] for l in canonical]
        at = enc.alloc(SCRATCH, math.prod(shape))
        grads[side] = Operand(*at, tuple(_contiguous([math.prod(sizes[l] for l in g)
                                                      for g in groups])))
        lay = prog.layouts[t]
        enc.relayout(Relayout(-1, t, tuple(shape), tuple(canonical.index(l) for l in lay)), at,
                     enc.out(t, SCRATCH))
    enc.run(prog.backward, SCRATCH, skip=first)
    # Gradients of pre-reduced cores: broadcast back over the summed and squeezed axes.
    for i, shape in enumerate(shapes):
        if p.sum_axes[i]:
            gone = set(p.sum_axes[i]) | set(p.squeeze_axes[i])
            kept = [a for a in range(len(shape)) if a not in gone]
            rs = _contiguous([shape[a] for a in kept])
            src = [0] * len(shape)
            for a, s in zip(kept, rs):
                src[a] = s
            enc.rows.append(_copy_row(enc.place[prog.core_grads[i]], (GRAD + i, 0), shape, src,
                                      _contiguous(shape)))
    # Where each element of the last step's (B, M, N) product lies in the weight.
    out = equation.split("->")[1]
    wsizes = dict(sizes)
    strides = dict(zip(out, _contiguous([wsizes[l] for l in out])))
    offsets = tuple(letter_offsets(g, wsizes, strides) for g in (b, rows, cols))
    rows = tuple(enc.rows)
    return Fused(rows, n_forward, launches(rows, 0, n_forward),
                 launches(rows, n_forward, len(rows)), n, max(enc.totals[SAVED], 1),
                 max(enc.totals[SCRATCH], 1), prog.gemm, operands[0], operands[1],
                 grads["left"], grads["right"], offsets)


@lru_cache(maxsize=64)
def _device_tables(f: Fused, device: torch.device):
    """The instruction table and the weight offset vectors on ``device`` (made once)."""
    code = torch.tensor(f.code, dtype=torch.int64, device=device).reshape(-1)
    offsets = tuple(torch.tensor(o, dtype=torch.int64, device=device) for o in f.offsets)
    return code, offsets


def _run_tree(f: Fused, plan, saved, scratch, cores, grads) -> None:
    code, _ = _device_tables(f, saved.device)
    c = list(cores) + [saved] * (k.MAX_CORES - len(cores))
    g = list(grads) + [saved] * (k.MAX_CORES - len(grads))
    for start, stop, programs in plan:
        launch(k.tree_kernel, (programs,), code, start, stop, saved, scratch, *c, *g,
               num_warps=k.NUM_WARPS, ROW=k.ROW, BLOCK_M=k.BLOCK_M, BLOCK_N=k.BLOCK_N,
               BLOCK_K=k.BLOCK_K, BLOCK_COPY=k.BLOCK_COPY)


def _contiguous_cores(cores):
    return [c if c.is_contiguous() else c.contiguous() for c in cores]


def forward(f: Fused, cores) -> torch.Tensor:
    """Every forward result of the tree, in one new fp32 buffer (what backward keeps)."""
    saved = torch.empty(f.saved_numel, dtype=torch.float32, device=cores[0].device)
    _run_tree(f, f.forward_launches, saved, saved, _contiguous_cores(cores), ())
    return saved


def _view(buffers, o: Operand):
    return buffers[o.region][o.offset:]


def build(f: Fused, saved, cores, weight_shape, scale: float, base=None, frozen=None,
          out_dtype=torch.float32) -> torch.Tensor:
    """``scale * T`` in fp32 (``base`` None), else ``base + (scale*T - frozen)`` in
    ``out_dtype``, written from the kept operands straight into the weight's layout."""
    B, M, N, K = f.gemm
    _, (off_b, off_m, off_n) = _device_tables(f, saved.device)
    cores = _contiguous_cores(cores)
    buffers = {SAVED: saved, **{CORE + i: c.reshape(-1) for i, c in enumerate(cores)}}
    effective = base is not None
    out = torch.empty(weight_shape, dtype=out_dtype if effective else torch.float32,
                      device=saved.device)
    base_ = base.contiguous() if effective else out
    frozen_ = frozen.contiguous() if frozen is not None else out
    grid = (triton.cdiv(M, ls.BLOCK_M), triton.cdiv(N, ls.BLOCK_N), B)
    launch(ls.build_kernel, grid, _view(buffers, f.left), _view(buffers, f.right), off_b, off_m,
           off_n, base_, frozen_, out, M, N, K, float(scale), *f.left.stride, *f.right.stride,
           num_warps=ls.NUM_WARPS, EFFECTIVE=effective, HAS_FROZEN=frozen is not None,
           HAS_SCALE=scale != 1.0, BLOCK_M=ls.BLOCK_M, BLOCK_N=ls.BLOCK_N, BLOCK_K=ls.BLOCK_K)
    return out


def core_grads(f: Fused, saved, cores, grad_weight, scale: float) -> list[torch.Tensor]:
    """Every stored core's gradient (fp32, the core's shape) from dL/dW (the weight's shape,
    any float dtype) and a forward's ``saved`` buffer."""
    B, M, N, K = f.gemm
    _, (off_b, off_m, off_n) = _device_tables(f, saved.device)
    cores = _contiguous_cores(cores)
    scratch = torch.empty(f.scratch_numel, dtype=torch.float32, device=saved.device)
    grads = [torch.empty(c.shape, dtype=torch.float32, device=c.device) for c in cores]
    buffers = {SAVED: saved, SCRATCH: scratch,
               **{CORE + i: c.reshape(-1) for i, c in enumerate(cores)},
               **{GRAD + i: g.reshape(-1) for i, g in enumerate(grads)}}
    g = grad_weight if grad_weight.is_contiguous() else grad_weight.contiguous()
    launch(ls.grads_kernel, grid_of_grads(B, M, N, K), g, _view(buffers, f.left),
           _view(buffers, f.right), off_b, off_m, off_n, _view(buffers, f.grad_left),
           _view(buffers, f.grad_right), M, N, K, float(scale), *f.left.stride, *f.right.stride,
           *f.grad_left.stride, *f.grad_right.stride, num_warps=ls.NUM_WARPS,
           HAS_SCALE=scale != 1.0, BLOCK_M=ls.BLOCK_M, BLOCK_N=ls.BLOCK_N, BLOCK_K=ls.BLOCK_K)
    _run_tree(f, f.backward_launches, saved, scratch, cores, grads)
    return grads
