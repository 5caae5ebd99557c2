"""Dispatch: the one place that decides how an adapted layer runs.

:func:`backend_for` picks the backend (a measured choice, else the one named in the context,
else ``auto``'s ranking); :func:`conv_strategy` / :func:`linear_strategy` pick how a fast
backend executes the layer, and :func:`runs_native_layer` whether a merged layer runs as one
C++ autograd function (the CPU). Their inputs are the execution context (:mod:`.context`: what the
user asked for with :func:`use_backend` / :func:`use_strategy`), the backends as data
(:mod:`.backends`), the strategies a layer's family implements, the cost models (:mod:`.costs`)
and measured decisions (:mod:`.autotune`). :mod:`tenvoo_fast.functional` runs what they decide.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

from ..errors import AdapterError
from . import autotune, context
from .backends import Backend, auto_ranking, available_backends, get_backend, validate
from .strategy import (STRATEGIES, conv_strategy, linear_strategy, runs_native_layer,
                       supported_strategies)
from .strategy import validate as validate_strategy

__all__ = ["Backend", "STRATEGIES", "available_backends", "current_backend", "set_backend",
           "use_backend", "current_strategy", "use_strategy", "backend_for", "conv_strategy",
           "linear_strategy", "runs_native_layer", "supported_strategies", "resolve", "autotune",
           "WEIGHT_POLICIES", "current_weight_policy", "set_weight_policy", "use_weight_policy",
           "LAUNCH_COSTS", "use_launch_cost"]


def set_backend(name: str) -> None:
    """Select the backend for this thread (``"auto"`` by default)."""
    context.set_backend_name(validate(name))


def current_backend() -> str:
    return context.current_backend()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """``with use_backend("reference"): ...`` selects a backend for the block, then restores."""
    with context.backend_scope(validate(name)):
        yield


def current_strategy() -> str:
    return context.current_strategy()


@contextlib.contextmanager
def use_strategy(name: str, strict: bool = True) -> Iterator[None]:
    """``with use_strategy("factorized"): ...`` forces a strategy for the block. A layer that
    cannot run it raises, or, with ``strict=False``, runs merged (whole-model comparisons)."""
    with context.strategy_scope(validate_strategy(name), strict):
        yield


#: What the merged strategy does with the effective weight between forward and backward.
WEIGHT_POLICIES = ("recompute", "keep")


def _validate_weight_policy(name: str) -> str:
    if name not in WEIGHT_POLICIES:
        raise ValueError(f"weight policy {name!r}: choose one of {', '.join(WEIGHT_POLICIES)}")
    return name


def current_weight_policy() -> str:
    return context.current_weight_policy()


def set_weight_policy(name: str) -> None:
    """Set the effective-weight policy for this thread (see :func:`use_weight_policy`)."""
    context.set_weight_policy_name(_validate_weight_policy(name))


@contextlib.contextmanager
def use_weight_policy(name: str) -> Iterator[None]:
    """``with use_weight_policy("keep"): ...``: the merged strategy keeps each layer's
    effective weight (in the compute dtype) from forward for backward, instead of rebuilding
    it there ("recompute", the default). Keeping costs one weight per adapted layer in memory
    until its backward (what a plain conv under autocast keeps of its weight), and saves the
    rebuild's launches (three per layer on the torch path, one on triton) and flops."""
    with context.weight_policy_scope(_validate_weight_policy(name)):
        yield


#: What ``auto``'s GPU cost model charges per launch (:mod:`.gpu_costs`).
LAUNCH_COSTS = ("host", "replay")


@contextlib.contextmanager
def use_launch_cost(name: str) -> Iterator[None]:
    """``with use_launch_cost("replay"): ...``: ``auto`` on CUDA predicts each layer's time as
    a replayed CUDA graph runs it (each launch a kernel's floor, no host time), for steps that
    will be captured (``--graph``); "host" (the default) charges each launch the host's time."""
    if name not in LAUNCH_COSTS:
        raise ValueError(f"launch cost {name!r}: choose one of {', '.join(LAUNCH_COSTS)}")
    with context.launch_cost_scope(name):
        yield


def backend_for(layer, x: torch.Tensor) -> tuple[Backend, Optional[str]]:
    """(the backend that runs ``layer`` on ``x`` now, the measured strategy to apply or None).

    A measured choice (:func:`autotune.tune`) wins under ``auto`` when its backend can run the
    layer; a named backend must run it (or raise, saying why); else ``auto``'s ranking for the
    device and layer kind gives the first backend that can. Records what ran on the layer for
    :func:`tenvoo_fast.execution_plan`.
    """
    compiling = torch.compiler.is_compiling()
    # A measured decision, if any; not consulted while compiling.
    choice = None if compiling else autotune.lookup(layer, x)
    backend = resolve(layer, x, choice[0] if choice else None)
    if not compiling and layer.__dict__.get("execution_backend") != backend.name:
        # The strategy is recorded by the strategy choice itself; the reference has none.
        layer.execution_backend, layer.execution_strategy = backend.name, None
    tuned = choice[1] if choice is not None and choice[0] == backend.name else None
    return backend, tuned


def resolve(layer, x: torch.Tensor, tuned: Optional[str] = None) -> Backend:
    """The backend that runs ``layer`` on ``x`` (``tuned``: a measured backend, which ``auto``
    takes when it can run the layer)."""
    name = context.current_backend()
    if name == "auto" and tuned is not None:
        backend = get_backend(tuned)
        if backend.unavailable_reason() is None and backend.unsupported_reason(layer, x) is None:
            return backend
    if name != "auto":
        backend = get_backend(name)
        reason = backend.unsupported_reason(layer, x)
        if reason is not None:
            raise AdapterError(f"{layer.adapter_name}: backend {name!r} cannot run this layer: "
                               f"{reason}; use_backend('auto') falls back automatically")
        return backend
    for candidate in auto_ranking(layer, x):
        backend = get_backend(candidate)
        if backend.unavailable_reason() is None and backend.unsupported_reason(layer, x) is None:
            return backend
    raise AdapterError(f"{layer.adapter_name}: no backend can run this layer")  # pragma: no cover
