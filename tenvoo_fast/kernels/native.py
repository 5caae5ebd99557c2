"""The native (csrc) kernels of the weight-sized step (``impl="native"``): :func:`build` and
:func:`grads` with the signatures of :mod:`.torch_last_step`, on ``torch.ops.tenvoo_fast_C``
(C++ on the CPU, CUDA on GPUs; see ``csrc/``).

The operands are permuted to (B, M, K) and (B, K, N) (small tensors, in the contraction dtype);
the kernels place each output element in the weight by decoding the batch, row and column
letter groups (``layout``: the sizes and weight strides of each group's letters, packed as
``[n, sizes.., strides..]`` three times, decoded by ``csrc/include/tenvoo_fast/layout.h``).
"""
from __future__ import annotations

from functools import lru_cache

import torch

from ..contraction.last_step import Layout, operands, unmatrix
from . import workspace


def _load(module: str):
    try:
        __import__(module)
        return None
    except ImportError as e:
        return str(e)


#: Why each extension could not be loaded (None: loaded).
CPU_ERROR = _load("tenvoo_fast._C")
CUDA_ERROR = _load("tenvoo_fast._C_cuda") if CPU_ERROR is None else CPU_ERROR


def unavailable_reason(device_type: str) -> str | None:
    """None if the native kernels for ``device_type`` are loaded, else why not."""
    if device_type == "cpu":
        err = CPU_ERROR
        what = "the C++ extension tenvoo_fast._C"
    else:
        if not torch.version.cuda:
            return "this torch build has no CUDA"
        if not torch.cuda.is_available():
            return "no GPU is visible"
        err = CUDA_ERROR
        what = "the CUDA extension tenvoo_fast._C_cuda"
    if err is None:
        return None
    return (f"{what} is not built ({err}); reinstall with `pip install --no-build-isolation "
            "-e .` (see setup.py for TENVOO_FAST_BUILD_CPU / TENVOO_FAST_BUILD_CUDA)")


@lru_cache(maxsize=256)
def packed_layout(lay: Layout) -> tuple[int, ...]:
    """The batch, row and column groups as ``[n, sizes.., weight strides..]`` x 3."""
    sizes, strides = dict(lay.sizes), lay.strides
    packed = []
    for group in (lay.batch, lay.rows, lay.cols):
        packed += [len(group), *(sizes[l] for l in group), *(strides[l] for l in group)]
    return tuple(packed)


def build(lay: Layout, left, right, weight_shape, scale: float, base=None, frozen=None,
          out_dtype=None) -> torch.Tensor:
    """``scale*T`` (``base`` None, a new tensor), else ``W + (scale*T - T0)`` cast to
    ``out_dtype`` in :mod:`workspace` scratch (valid until the next build in this thread);
    written once, in ``weight_shape`` (contraction dtype: left's)."""
    dtype = left.dtype
    a, b = operands(lay, left, right, dtype)
    effective = base is not None
    if effective:   # a transient effective weight: reuse the scratch buffer (torch_last_step.build)
        out = workspace.scratch("weight", weight_shape, out_dtype or dtype, a.device)
    else:
        out = torch.empty(weight_shape, dtype=dtype, device=a.device)
    torch.ops.tenvoo_fast_C.last_step_build(
        a, b, list(packed_layout(lay)), base.contiguous() if effective else None,
        frozen.to(dtype).contiguous() if frozen is not None else None, float(scale), out)
    return out


def grads(lay: Layout, grad_weight, left, right, scale: float):
    """Gradients of ``<grad_weight, scale*T>`` w.r.t. the two operands (contraction dtype)."""
    a, b = operands(lay, left, right, left.dtype)
    ga, gb = torch.ops.tenvoo_fast_C.last_step_grads(
        grad_weight.contiguous(), a, b, list(packed_layout(lay)), float(scale))
    return (unmatrix(ga, lay, lay.batch + lay.rows + lay.bond, lay.left_idx),
            unmatrix(gb, lay, lay.batch + lay.bond + lay.cols, lay.right_idx))
