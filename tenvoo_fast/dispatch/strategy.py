"""How a fast backend executes an adapted layer: the strategies, and how one is chosen.

- ``"merged"``: build ``W - T(θ0) + T(θ)`` and run the framework's conv/linear on it; backward
  turns dL/dW into the cores' gradients (:mod:`tenvoo_fast.ops.merged`).
- ``"factorized"``: apply the adapter to the activations beside the frozen base layer; no
  weight-sized tensor and no dL/dW at all (:mod:`tenvoo_fast.ops.factorized`).
- ``"implicit-gemm"``: a Triton implicit-GEMM conv that generates the weight tiles from the cores
  on chip (:mod:`tenvoo_fast.ops.implicit_gemm`; ``triton`` backend only).
- ``"auto"`` (default): per layer and input shape, a measured choice (:mod:`.autotune`) where
  there is one, else the cheaper of merged and factorized: on CUDA by the GPU cost model's
  predicted time (:mod:`.gpu_costs`), elsewhere by the flop models of :mod:`.costs` (each
  operator call the ``torch`` kernels issue from Python charged on the CPU).
  It does not pick implicit-gemm: no model says how a Triton conv compares with cuDNN's, so
  only a measurement or ``use_strategy`` selects it.

A layer's class declares the strategies its family implements (``strategies``); a layer that
cannot run a forced strategy raises and says which it can run. The ``reference`` backend always
runs the published einsum and has no strategy.
"""
from __future__ import annotations

import functools

import torch

from ..contraction import native_runner
from ..contraction.generation import unsupported_reason as implicit_gemm_reason
from ..errors import AdapterError
from ..kernels import native_layer
from . import context
from . import gpu_costs
from .costs import conv_costs, linear_costs, with_cpu_calls

STRATEGIES = ("auto", "merged", "factorized", "implicit-gemm")


def validate(name: str) -> str:
    if name not in STRATEGIES:
        raise AdapterError(f"unknown strategy {name!r}; use one of {list(STRATEGIES)}")
    return name


def unsupported(layer, name: str, impl: str | None) -> str | None:
    """None if ``layer`` can run strategy ``name`` with kernels ``impl``, else why not."""
    if name not in layer.strategies:
        return (f"'{name}' is not implemented for {layer.network.method} on a "
                f"{type(layer).__name__} (it runs {list(layer.strategies)})")
    if name == "factorized" and getattr(layer, "frozen_folded", False):
        # conv(x, W - T(θ0)) + T(θ)·x adds two large terms after the base conv rounds
        # (in bf16 under autocast: ~60% off); merged forms W - T(θ0) + T(θ) in fp32 first.
        return "'factorized' does not run a layer whose T(θ0) is folded into its weight"
    if name != "implicit-gemm":
        return None
    if impl != "triton":
        return ("'implicit-gemm' runs Triton kernels: use backend 'triton' (a CUDA GPU, or "
                "TRITON_INTERPRET=1 on the CPU)")
    if torch.are_deterministic_algorithms_enabled():
        return ("'implicit-gemm' adds its weight-gradient partials atomically, in no fixed "
                "order, and deterministic algorithms are on (torch.use_deterministic_algorithms)")
    return _implicit_gemm_reason(layer.network)


def supported_strategies(layer, impl: str | None = None) -> tuple[str, ...]:
    """The strategies a fast backend whose kernels are ``impl`` can run ``layer`` with."""
    return tuple(s for s in STRATEGIES[1:] if unsupported(layer, s, impl) is None)


@torch.compiler.assume_constant_result
def _implicit_gemm_reason(network) -> str | None:
    return _implicit_gemm_reason_cached(network)


@functools.lru_cache(maxsize=None)
def _implicit_gemm_reason_cached(network) -> str | None:
    reason = implicit_gemm_reason(network)
    return None if reason is None else f"'implicit-gemm' cannot run this network: {reason}"


# The choices depend only on the network and static shapes: under torch.compile they are made
# once at trace time and baked into the graph as constants.
@torch.compiler.assume_constant_result
def _cheapest_linear(network, tokens: int, activation_equation: str, host: str | None) -> str:
    return _cheapest(linear_costs(network, tokens, activation_equation), "linear", host)


@torch.compiler.assume_constant_result
def _cheapest_conv(network, x_shape: tuple, out_spatial: tuple, host: str | None) -> str:
    return _cheapest(conv_costs(network, x_shape, out_spatial), "conv3d", host)


def _cheapest(costs: dict, kind: str, host: str | None) -> str:
    if host is not None:
        costs = with_cpu_calls(costs, kind, native=host == "cpu-native")
    return min(costs, key=costs.get)


def _on_gpu(layer, impl, x_shape, dtype, fallback):
    """On CUDA, the GPU cost model's cheapest strategy for backend ``impl`` (``fallback()``,
    the flop model, when it has no count for this method and backend)."""
    allowed = tuple(s for s in ("merged", "factorized")
                    if s in supported_strategies(layer, impl))
    return gpu_costs.cheapest_strategy(layer, x_shape, dtype, impl, allowed) or fallback()


def linear_strategy(layer, tokens: int, impl: str | None = None,
                    device_type: str = "cpu", dtype: torch.dtype | None = None) -> str:
    """The strategy ``layer`` (an adapted Linear) runs with for ``tokens`` rows of input
    computed in ``dtype`` (the base weight's if None)."""
    def flops():
        return _cheapest_linear(layer.network, max(int(tokens), 1), layer.activation_equation,
                                _host_charge(impl, device_type, layer))
    if device_type == "cuda":
        return _record(layer, _choose(layer, impl, lambda: _on_gpu(
            layer, impl, (max(int(tokens), 1), layer.in_features), dtype or layer.weight.dtype,
            flops)))
    return _record(layer, _choose(layer, impl, flops))


def conv_strategy(layer, x_shape, out_spatial, impl: str | None = None,
                  device_type: str = "cpu", dtype: torch.dtype | None = None) -> str:
    """The strategy ``layer`` (an adapted Conv3d) runs with for an input of ``x_shape`` on
    ``device_type`` computed in ``dtype`` (the base weight's if None), when ``impl`` runs the
    fast paths' heavy steps."""
    x_shape = tuple(int(n) for n in x_shape)

    def flops():
        return _cheapest_conv(layer.network, x_shape, tuple(int(n) for n in out_spatial),
                              _host_charge(impl, device_type, layer))
    if device_type == "cuda":
        return _record(layer, _choose(layer, impl, lambda: _on_gpu(
            layer, impl, x_shape, dtype or layer.weight.dtype, flops)))
    return _record(layer, _choose(layer, impl, flops))


_NATIVE_DTYPES = (torch.float32, torch.float64)


def runs_native_layer(impl, x: torch.Tensor, base: torch.Tensor, cores, frozen) -> bool:
    """Whether a merged layer runs as one C++ autograd function
    (:mod:`tenvoo_fast.kernels.native_layer`, the same bits as the ``torch`` op): ``torch``
    kernels on the CPU with the C++ loops on, the cores, base weight and frozen delta of one
    fp32 / fp64 dtype, eager (not compiling), no dispatch mode watching (a launch counter
    counts the portable op's calls)."""
    if torch.compiler.is_compiling() or impl != "torch" or not native_layer.available():
        return False
    if not x.is_cpu or not native_runner.LOOPS or native_runner.watched():
        return False
    return _native_dtypes(base, cores, frozen)


def _native_dtypes(base, cores, frozen) -> bool:
    dtype = base.dtype
    return dtype in _NATIVE_DTYPES and all(c.dtype == dtype for c in cores) and all(
        f.dtype == dtype for f in frozen)


def _host_charge(impl, device_type: str, layer=None) -> str | None:
    """Which host costs the flop model charges besides flops: ``"cpu-native"`` /
    ``"cpu-python"`` operator calls of the ``torch`` kernels on the CPU
    (:func:`.costs.with_cpu_calls`; merged as the C++ function or the Python op), else none
    (on CUDA the GPU cost model charges launches: :mod:`.gpu_costs`)."""
    if impl == "torch" and device_type == "cpu":
        native = (native_layer.available() and native_runner.LOOPS
                  and (layer is None or _native_dtypes(layer.weight, layer.core_list(), ())))
        return "cpu-native" if native else "cpu-python"
    return None


def _record(layer, choice: str) -> str:
    if not torch.compiler.is_compiling() and layer.__dict__.get("execution_strategy") != choice:
        layer.execution_strategy = choice
    return choice


def _choose(layer, impl, cheapest) -> str:
    """The current strategy if forced (checked against what the layer can run), else a
    measured decision (autotune), else ``cheapest()`` (the flop model)."""
    name = context.current_strategy()
    if name != "auto":
        reason = unsupported(layer, name, impl)
        if reason is None:
            return name
        if not context.CONTEXT.strict:
            return "merged"
        raise AdapterError(f"{layer.adapter_name}: strategy {reason}; use one of "
                           f"{list(supported_strategies(layer, impl))} or 'auto'")
    if "factorized" not in supported_strategies(layer, impl):
        return "merged"
    choice = context.CONTEXT.tuned
    if choice is not None and choice in supported_strategies(layer, impl):
        return choice
    return cheapest()
