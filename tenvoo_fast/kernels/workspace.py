"""Reused CPU scratch buffers for the weight-sized temporaries of an adapted layer's step.

Why: glibc serves allocations above its mmap threshold (weight-sized ones, tens of MB) with
fresh pages that are faulted in on every use and unmapped on free, and whether a given
allocation lands there depends on the heap's history, so the same layer's step time varied
from one layer object to the next (README, "Speed and memory"). Reusing one buffer per purpose
removes the page faults without touching the process's allocator settings. CUDA needs none of
this (its caching allocator reuses blocks), so off the CPU :func:`scratch` is a plain
``torch.empty``.

A scratch tensor is valid until the next :func:`scratch` call for the same slot in the same
thread; callers use it only inside one op and never return it to the user. The pool holds, per
slot and dtype, one buffer as large as the largest request so far; :func:`clear` frees it.
"""
from __future__ import annotations

import contextlib
import math
import threading

import torch

_local = threading.local()


def _pool() -> dict:
    pool = getattr(_local, "pool", None)
    if pool is None:
        pool = _local.pool = {}
    return pool


def scratch(slot: str, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor of ``shape`` for temporary use under the name ``slot``."""
    if torch.device(device).type != "cpu" or slot in getattr(_local, "kept", ()):
        return torch.empty(shape, dtype=dtype, device=device)
    n = math.prod(shape)
    pool = _pool()
    buf = pool.get((slot, dtype))
    if buf is None or buf.numel() < n:
        # Never an inference tensor (a first use under torch.inference_mode would make one):
        # training ops outside inference mode could not write into it.
        with torch.inference_mode(False):
            buf = pool[(slot, dtype)] = torch.empty(n, dtype=dtype)
    return buf[:n].view(shape)


@contextlib.contextmanager
def kept(slot: str):
    """While active, ``slot`` gets fresh tensors (what it holds outlives the op: the effective
    weight kept for backward)."""
    before = getattr(_local, "kept", ())
    _local.kept = before + (slot,)
    try:
        yield
    finally:
        _local.kept = before


def pooled_bytes() -> int:
    """Bytes this thread's pool holds now."""
    return sum(b.numel() * b.element_size() for b in _pool().values())


def clear() -> None:
    """Free this thread's scratch buffers (they are re-created on the next use)."""
    _pool().clear()
