"""The reference contraction: opt_einsum over a :class:`.network.TensorNetwork`.

This is the published algorithm (pairwise contractions, autograd keeps the intermediates) with
the numerics the spec requires: contraction in fp32 (fp64 when any input is fp64), autocast
off, and the effective weight formed in that precision before the caller casts it. It runs on
any device; the ``reference`` backend runs it, and it defines correctness for the others.
"""
from __future__ import annotations

import contextlib

from functools import lru_cache
from typing import Sequence

import opt_einsum
import torch

from .network import TensorNetwork


@lru_cache(maxsize=None)
def contraction_expression(equation: str, shapes: tuple[tuple[int, ...], ...]):
    """Plan once per (equation, shapes): 'dp' finds the optimal pairwise order in milliseconds."""
    return opt_einsum.contract_expression(equation, *shapes, optimize="dp")


def contraction_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """fp64 if any input is fp64, else fp32: never lower, whatever the model or autocast dtype."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def ieee_fp32():
    """A context in which fp32 convolutions run at full precision (no TF32, adapters.md §3),
    for the adapter's own convolutions (PyTorch lets cuDNN use TF32 by default); the caller's
    other cuDNN settings are kept."""
    c = torch.backends.cudnn
    return c.flags(enabled=c.enabled, benchmark=c.benchmark, benchmark_limit=c.benchmark_limit,
                   deterministic=c.deterministic, allow_tf32=False)


def autocast_off(device_type: str):
    """Autocast off for the contraction; nothing to turn off on the meta device (where torch
    refuses autocast), so shape-only forwards of models built on meta run the same code."""
    if device_type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)


def delta_weight(network: TensorNetwork, tensors: Sequence[torch.Tensor],
                 dtype: torch.dtype | None = None) -> torch.Tensor:
    """ΔW in the layer weight's layout, in fp32 (or fp64), differentiable w.r.t. ``tensors``."""
    dtype = dtype or contraction_dtype(tensors)
    views = tuple(c.contraction_shape for c in network.cores)
    expr = contraction_expression(network.equation, views)
    with autocast_off(tensors[0].device.type):
        ops = [t.to(dtype).reshape(v) for t, v in zip(tensors, views)]
        out = expr(*ops, backend="torch").reshape(network.weight_shape)
        if network.scale != 1.0:
            out = out * network.scale
    return out


def effective_weight(base: torch.Tensor, network: TensorNetwork, cores: Sequence[torch.Tensor],
                     frozen_delta: torch.Tensor | None = None) -> torch.Tensor:
    """``W - T(θ0) + T(θ)`` in fp32 (fp64 for fp64 inputs); the caller casts it last.

    Formed as ``W + (T(θ) - T(θ0))``: the two large networks cancel first (exactly, at
    initialisation, where both are the same contraction of the same values), so the small base
    weight keeps all its bits and the adapted layer reproduces its base layer exactly at step 0.
    ``frozen_delta`` is ``T(θ0)`` (None when the layer keeps no frozen copy).
    """
    dtype = contraction_dtype([base, *cores])
    with autocast_off(base.device.type):
        delta = delta_weight(network, cores, dtype)
        if frozen_delta is not None:
            delta = delta - frozen_delta.to(dtype)
        return base.to(dtype) + delta
