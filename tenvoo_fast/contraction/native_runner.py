"""A contraction program's instructions run by the C++ runner (``csrc/run_program.cpp``).

The Python runner (:func:`tenvoo_fast.contraction.program._run`) makes three strided views per
matmul in Python: about 14 µs of host time per instruction against about 2 µs for the matmul
itself on small operands. Here a program's instruction list is flattened once into an int64
table, and each call hands the C++ runner only where every tensor lies; it issues the same ATen
calls (``bmm`` with ``out=``, ``copy_``) in the same order, so results and launch counts are
the same. Used when the ``tenvoo_fast._C`` extension is built; else the Python runner runs.
Groups of relayouts reach it only on the CPU loops (a loop each); elsewhere the program runs
them as gathers (:func:`tenvoo_fast.contraction.program._gather`).

On the CPU the runner does the small instructions as plain loops instead of ATen calls (see
``csrc/run_program.cpp``): the same sums in the contraction dtype, without ATen's per-call cost
on tiny operands. While a dispatch mode watches (a launch counter, a tracer) it also issues each
one's ATen call, so counts are those of the portable path (the calls the same program makes on
a GPU), and keeps the loop's result, so counting never changes the numbers.
"""
from __future__ import annotations

import importlib

import torch

try:    # by name: the extension is a leaf module, not part of the package's import graph
    _EXTENSION = importlib.import_module("tenvoo_fast._C")
except ImportError:             # the extension was not built (setup.py flags)
    _EXTENSION = None
RUNNER = getattr(_EXTENSION, "run_program", None)
_MATMUL = getattr(_EXTENSION, "matmul_out", None)
_FOLD = getattr(_EXTENSION, "fold_out", None)

MATMUL, COPY, GROUP = 0, 1, 2
#: Small CPU instructions as loops (False: every instruction an ATen call, as on a GPU).
LOOPS = True
_TABLES: dict = {}
_NO_PLACE = torch.empty(0, device="cpu")   # ids this code does not name


def available() -> bool:
    return RUNNER is not None


def _ids(code) -> int:
    """1 + the largest tensor id the instructions name."""
    out = 0
    for op in code:
        for r in (op if isinstance(op, tuple) else (op,)):
            ids = (r.src, r.dst) if hasattr(r, "perm") else (r.a.tensor, r.b.tensor, r.out.tensor)
            out = max(out, *ids)
    return out + 1


def _copy(r, width: int, packing: bool, views_of) -> list[int]:
    dsize, dstride, _, sstride = views_of(r)
    src = width + r.src if packing and r.src == r.dst else r.src
    return [COPY, len(dsize), r.dst, *dsize, *dstride, src, *sstride]


def _encode(code, with_sources: bool, views_of,
            width: int | None = None) -> tuple[torch.Tensor, int]:
    """``code`` as the C++ runner's int64 table; a packing copy reads its core at id ``width +
    core`` (``width``: default, 1 + the largest id the code names)."""
    width = _ids(code) if width is None else width
    table: list[int] = []
    for op in code:
        if isinstance(op, tuple):
            table += [GROUP, len(op)]
            for r in op:
                table += _copy(r, width, with_sources, views_of)
        elif hasattr(op, "perm"):
            table += _copy(op, width, with_sources, views_of)
        else:
            table.append(MATMUL)
            for m in (op.a, op.b, op.out):
                table += [m.tensor, *m.size, *m.stride]
    return torch.tensor(table, dtype=torch.int64, device="cpu"), width


def run(code, places: dict, sources: dict | None, views_of) -> None:
    """Run ``code`` (a program's instruction tuple) with tensors at ``places`` (id -> (buffer,
    element offset)); ``sources``: the caller's cores, read by the packing copies (id ->
    (core, 0)); ``views_of``: a relayout's (dst size, dst stride, src size, src stride)."""
    key = (id(code), sources is not None)
    entry = _TABLES.get(key)
    if entry is None or entry[0] is not code:
        entry = _TABLES[key] = (code, *_encode(code, sources is not None, views_of))
    _, table, width = entry
    n = width + (len(sources) if sources else 0)
    bases, offsets = [_NO_PLACE] * n, [0] * n
    for t, (buf, off) in places.items():
        if t < width:
            bases[t], offsets[t] = buf, off
    if sources:
        for i, (buf, off) in sources.items():
            bases[width + i], offsets[width + i] = buf, off
    RUNNER(bases, offsets, table, LOOPS, watched())


def watched() -> bool:
    """Whether a dispatch mode is active (then every instruction is also an ATen call)."""
    return torch._C._len_torch_dispatch_stack() > 0


def bmm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``torch.bmm(a, b, out=out)``; a loop in C++ when small and on the CPU."""
    if _MATMUL is None:
        return torch.bmm(a, b, out=out)
    _MATMUL(a, b, out, LOOPS, watched())
    return out


def fold(t: torch.Tensor, frozen, base: torch.Tensor, out: torch.Tensor) -> bool:
    """``out = base + (t - frozen)`` (``frozen`` None: ``base + t``) as one C++ loop, all of
    ``t``'s shape with any strides; False when not done here (not on the CPU, another dtype,
    large, or watched): the caller runs the torch ops, which round the same way."""
    return _FOLD is not None and _FOLD(t, frozen, base, out, LOOPS, watched())
