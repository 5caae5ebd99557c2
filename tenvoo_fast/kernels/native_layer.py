"""A merged adapted layer as one C++ autograd function (``csrc/merged_layer.cpp``).

The ``torch`` kernels' merged conv3d / linear (:mod:`tenvoo_fast.ops.merged`) run as a handful
of Python-level steps per call (pre-reduce, place, run the program, build the weight, conv,
and the same again in backward): on a small layer that Python costs several times the layer's
arithmetic. Here the steps run in C++, in the same order and with the same ATen calls and
loops (the same bits), from a :class:`MergedPlan` made once per program and layer geometry: where
each tensor of the program lies (:func:`tenvoo_fast.contraction.program.torch_layout`), its
instructions flattened for the C++ runner, the last step's shapes and the index that unpacks
the cores' gradients.

:func:`tenvoo_fast.dispatch.runs_native_layer` decides when this runs (the CPU, no dispatch
mode watching, nothing tracing); the Python ops stay what ``torch.compile`` and the launch
counter see.
"""
from __future__ import annotations

import importlib
from functools import lru_cache

import numpy as np
import torch

from ..contraction import native_runner, program
from ..contraction.prereduce import plan as prereduce_plan
from . import torch_last_step

try:    # by name: the extension is a leaf module, not part of the package's import graph
    _C = importlib.import_module("tenvoo_fast._C")
except ImportError:             # the extension was not built (setup.py flags)
    _C = None
_RUN = getattr(_C, "merged_layer", None)


def available() -> bool:
    return _RUN is not None


def _read(r) -> list[int]:
    return [r.tensor, *r.size, *r.stride]


def _table(prog, code, with_sources: bool):
    if not code:
        return torch.empty(0, dtype=torch.int64)
    return native_runner._encode(code, with_sources, program._relayout_views_of,
                                 width=len(prog.layouts))[0]


@lru_cache(maxsize=None)
def plan_for(equation: str, shapes: tuple, scale: float, conv: tuple):
    """The :class:`MergedPlan` of a merged layer whose cores contract by ``equation`` (as
    shapes ``shapes``) times ``scale``; ``conv``: stride + padding + dilation (9 ints), empty
    for a linear layer. Cached: one per program and geometry."""
    p = prereduce_plan(equation, shapes)
    prog = program.program_for(p.equation, p.shapes)
    lay = program.torch_layout(prog)
    n, width = prog.n_cores, len(prog.layouts)
    KEPT, SCRATCH, FLAT, GRAD_T = n, n + 1, n + 2, n + 3
    plan = _C.MergedPlan()
    plan.n_cores, plan.width = n, width
    plan.core_shapes = [list(s) for s in shapes]
    plan.sum_axes = [list(a) for a in p.sum_axes]

    # Forward: the cores where they lie (or packed into the kept buffer), the kept results,
    # and the others in one scratch buffer (program._places, forward).
    kind, offset = [-1] * width, [0] * width
    for i in range(n):
        kind[i] = i
    for t, o in lay.offsets.items():
        kind[t], offset[t] = KEPT, o
    layout, total = program._scratch_layout(prog, lay.forward, dict.fromkeys(
        [t for t in range(width) if kind[t] >= 0]))
    for t, o in layout:
        kind[t], offset[t] = SCRATCH, o
    plan.fwd_kind, plan.fwd_offset, plan.fwd_scratch_numel = kind, offset, total
    plan.kept_numel = lay.numel
    plan.pack_table = _table(prog, lay.pack, True)
    plan.forward_table = _table(prog, lay.forward, True)

    # Backward (program.operands): dL/dT given later, the cores' gradients in one flat
    # output where each is made in place, else in the scratch buffer and gathered from it.
    direct = not lay.unpacks and not any(p.sum_axes)
    keeps = program.keeps_cores(prog)
    kind, offset = [-1] * width, [0] * width
    if not keeps:
        for i in range(n):
            kind[i] = i
    for t, o in lay.offsets.items():
        kind[t], offset[t] = KEPT, o
    kind[prog.grad_t] = GRAD_T
    if direct:
        at = 0
        for t in prog.core_grads:
            kind[t], offset[t] = FLAT, at
            at += prog.numel(t)
    layout, total = program._scratch_layout(prog, lay.backward, dict.fromkeys(
        [t for t in range(width) if kind[t] >= 0]), direct)
    for t, o in layout:
        kind[t], offset[t] = SCRATCH, o
    plan.bwd_kind, plan.bwd_offset, plan.bwd_scratch_numel = kind, offset, total
    plan.flat_numel = sum(prog.numel(t) for t in prog.core_grads)
    plan.keeps_cores, plan.direct = keeps, direct
    plan.recompute_table = _table(prog, prog.recompute, False)
    plan.backward_table = _table(prog, lay.run_backward, False)
    if not direct:
        parts = []
        for i, t in enumerate(prog.core_grads):
            src, r = lay.unpack[t]
            if kind[src] != SCRATCH:
                raise AssertionError("core gradients outside the backward's scratch buffer")
            local = (program._relayout_index(r) if r is not None
                     else np.arange(prog.numel(t), dtype=np.int64))
            parts.append(program._broadcast_back(p, i, local.reshape(prog.shape(t)))
                         + offset[src])
        plan.unpack_index = torch.from_numpy(np.concatenate(parts))

    # The last step and the weight.
    plan.left, plan.right = _read(prog.left), _read(prog.right)
    plan.gemm = list(prog.gemm[:3])
    gemm_shape, letters = torch_last_step._weight_letters(prog)
    plan.gemm_shape, plan.letters = list(gemm_shape), list(letters)
    plan.to_weight = list(prog.to_weight)
    plan.scale = float(scale)
    plan.grad_t, plan.grad_as_weight = prog.grad_t, prog.grad_as_weight
    plan.stride, plan.padding, plan.dilation = (list(conv[0:3]), list(conv[3:6]),
                                                list(conv[6:9])) if conv else ([], [], [])
    plan.check()
    return plan


def merged(network, x, base, cores, frozen, bias, conv: tuple, keep_weight: bool):
    """``merged_conv3d`` (``conv``: 9 ints) or ``merged_linear`` (``conv`` empty) of the stored
    ``cores``, as one C++ autograd function; its output only."""
    plan = plan_for(network.equation, network.contraction_shapes, network.scale, conv)
    return _RUN(plan, x, base, frozen, bias, keep_weight, cores)
