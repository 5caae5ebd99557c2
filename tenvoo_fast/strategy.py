"""How an adapted layer is executed: the one place that chooses, per layer and shape.

- ``"merged"`` (fast-path design 1): build ``W - T(θ0) + T(θ)`` and run the framework's
  conv/linear on it; backward turns dL/dW into the cores' gradients.
- ``"factorized"``: apply the adapter to the activations beside the frozen base layer
  (QuanTA Linear: :func:`tenvoo_fast.factorized.factored_linear`; TenVOO Conv3d:
  :mod:`tenvoo_fast.factorized`, its activation-sized maps in fused Triton kernels on the
  ``triton`` backend); no weight-sized tensor and no dL/dW at all.
- ``"implicit-gemm"`` (TenVOO Conv3d, ``triton`` backend): a Triton implicit-GEMM conv that
  generates the weight tiles from the cores on chip (:mod:`tenvoo_fast.implicit_gemm`).
- ``"auto"`` (default): per layer and input shape, the cheaper of merged and factorized by a
  flop model (:func:`tenvoo_fast.factorized.linear_costs`,
  :func:`~tenvoo_fast.factorized.conv_costs`). It does not pick implicit-gemm: no flop model
  says how a Triton conv compares with cuDNN's, and none has been measured yet, so only a
  measurement (:mod:`tenvoo_fast.autotune`) or ``use_strategy`` selects it.

:func:`tenvoo_fast.autotune.tune` replaces the flop model by measurements where it has run.
``use_strategy(name)`` overrides the choice for a block; a layer that cannot run the named
strategy raises and says which it can run. Strategies are how the fast backends execute; the
``reference`` backend always runs the published einsum.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from typing import Iterator

import torch

from .errors import AdapterError
from .factorized import conv_costs, linear_costs

STRATEGIES = ("auto", "merged", "factorized", "implicit-gemm")
_state = threading.local()


def current_strategy() -> str:
    return getattr(_state, "name", "auto")


@contextlib.contextmanager
def use_strategy(name: str, strict: bool = True) -> Iterator[None]:
    """``with use_strategy("factorized"): ...`` forces a strategy for the block. A layer that
    cannot run it raises, or, with ``strict=False``, runs merged (whole-model comparisons)."""
    if name not in STRATEGIES:
        raise AdapterError(f"unknown strategy {name!r}; use one of {list(STRATEGIES)}")
    previous = current_strategy(), getattr(_state, "strict", True)
    _state.name, _state.strict = name, strict
    try:
        yield
    finally:
        _state.name, _state.strict = previous


def supported_strategies(layer, kernel: str | None = None) -> tuple[str, ...]:
    """The strategies the fast backends can run ``layer`` with; ``implicit-gemm`` only for the
    Triton kernels (``kernel="triton"``) and networks whose last step splits the channels."""
    return tuple([s for s in ("merged", "factorized", "implicit-gemm")
                  if _unsupported(layer, s, kernel) is None])


def _unsupported(layer, name: str, kernel: str | None) -> str | None:
    """None if ``layer`` can run strategy ``name`` with ``kernel``, else why not."""
    method, conv = layer.network.method, isinstance(layer, torch.nn.Conv3d)
    if name == "merged":
        return None
    if name == "factorized":
        if (method.startswith("tenvoo") and conv) or (method == "quanta" and not conv):
            return None
        return ("'factorized' is implemented for TenVOO Conv3d and QuanTA Linear layers, not "
                f"{method} on a {type(layer).__name__}")
    if not (method.startswith("tenvoo") and conv):
        return f"'implicit-gemm' is implemented for TenVOO Conv3d layers, not {method}"
    if kernel != "triton":
        return ("'implicit-gemm' runs Triton kernels: use backend 'triton' (a CUDA GPU, or "
                "TRITON_INTERPRET=1 on the CPU)")
    if torch.are_deterministic_algorithms_enabled():
        return ("'implicit-gemm' adds its weight-gradient partials atomically, in no fixed "
                "order, and deterministic algorithms are on (torch.use_deterministic_algorithms)")
    return _implicit_gemm_reason(layer.network)


@torch.compiler.assume_constant_result
def _implicit_gemm_reason(network) -> str | None:
    return _implicit_gemm_reason_cached(network)


@functools.lru_cache(maxsize=None)
def _implicit_gemm_reason_cached(network) -> str | None:
    from .implicit_gemm import unsupported_reason
    reason = unsupported_reason(network)
    return None if reason is None else f"'implicit-gemm' cannot run this network: {reason}"


@contextlib.contextmanager
def tuned(choice: str | None) -> Iterator[None]:
    """While set, ``auto`` uses ``choice`` (a measured decision, :mod:`tenvoo_fast.autotune`)
    for layers that can run it."""
    previous = getattr(_state, "tuned", None)
    _state.tuned = choice
    try:
        yield
    finally:
        _state.tuned = previous


def _tuned_for(layer, kernel) -> str | None:
    choice = getattr(_state, "tuned", None)
    return choice if choice in supported_strategies(layer, kernel) else None


def _record(layer, choice: str) -> str:
    if not torch.compiler.is_compiling():
        layer.execution_strategy = choice
    return choice


def linear_strategy(layer, tokens: int, kernel: str | None = None) -> str:
    """The strategy ``layer`` (an adapted Linear) runs with for ``tokens`` rows of input."""
    return _record(layer, _choose(
        layer, kernel, lambda: _cheapest_linear(layer.network, max(int(tokens), 1))))


# The choices depend only on the network and static shapes: under torch.compile they are made
# once at trace time and baked into the graph as constants.
@torch.compiler.assume_constant_result
def _cheapest_linear(network, tokens: int) -> str:
    costs = linear_costs(network, tokens)
    return min(costs, key=costs.get)


@torch.compiler.assume_constant_result
def _cheapest_conv(network, x_shape: tuple, out_spatial: tuple) -> str:
    costs = conv_costs(network, x_shape, out_spatial)
    return min(costs, key=costs.get)


def conv_strategy(layer, x_shape, out_spatial, kernel: str | None = None) -> str:
    """The strategy ``layer`` (an adapted Conv3d) runs with for an input of ``x_shape``, when
    ``kernel`` runs the fast paths' weight-sized steps."""
    return _record(layer, _choose(
        layer, kernel, lambda: _cheapest_conv(layer.network, tuple(int(n) for n in x_shape),
                                              tuple(int(n) for n in out_spatial))))


def _choose(layer, kernel, cheapest) -> str:
    """The current strategy if forced (checked against what the layer can run), else a
    measured decision (autotune), else ``cheapest()`` (the flop model)."""
    name = current_strategy()
    if name != "auto":
        reason = _unsupported(layer, name, kernel)
        if reason is None:
            return name
        if not getattr(_state, "strict", True):
            return "merged"
        raise AdapterError(f"{layer.adapter_name}: strategy {reason}; use one of "
                           f"{list(supported_strategies(layer, kernel))} or 'auto'")
    if "factorized" not in supported_strategies(layer, kernel):
        return "merged"
    if (choice := _tuned_for(layer, kernel)) is not None:
        return choice
    return cheapest()


__all__ = ["STRATEGIES", "current_strategy", "use_strategy", "linear_strategy",
           "conv_strategy", "supported_strategies", "tuned"]
