"""``auto`` on CUDA: each adapted layer's backend and strategy from a predicted time.

    predicted = launches x seconds per launch + the device's time for the adapter's own work

- launches: what one training step of the layer issues beyond its frozen base, counted on the
  CPU per method, backend and strategy (:data:`LAUNCHES`; tests/dispatch/test_gpu_costs.py
  recounts them);
- seconds per launch: the host's time per launching call when the step runs eagerly (the one
  constant fitted to the committed H100 steps by ``benchmarks/step_model.py``), or a captured
  graph node's replay when the step is replayed (``use_launch_cost("replay")``: ``--graph``),
  where the host issues nothing and each kernel costs the roofline's floor;
- device: the roofline (peaks in :mod:`.devices`) of the adapter's extra flops and
  bytes on the GPU, each op class times the inefficiency fitted in the same calibration.

A model, not a measurement: ``--autotune`` (:mod:`.autotune`) measures and overrides it.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

from ..contraction.partition import channel_letters, partition
from ..contraction.prereduce import plan
from ..contraction.sweep import path_flops
from .devices import GPU, H100
from ..ops.geometry import conv_output_spatial
from .context import current_launch_cost, current_weight_policy
from .costs import merged_builds

#: The backends ``auto`` weighs on CUDA. The native ``cuda`` backend is not among them: its
#: kernels have never been timed on a GPU, so it runs only when named.
CANDIDATES = ("triton", "torch", "reference")

#: Launching calls per training step (forward and backward) of one adapted layer beyond its
#: trainable plain layer: (kind, method) -> {(backend, strategy): launches}, the larger count
#: of two DDPM layer shapes at rank 4 (Triton's launches included; the recompute weight
#: policy). The reference backend has no strategy ("merged": it builds the weight).
LAUNCHES: dict[tuple[str, str], dict[tuple[str, str], int]] = {
    ("conv3d", "tenvoo-l"): {("reference", "merged"): 61, ("torch", "merged"): 40,
                             ("torch", "factorized"): 164, ("triton", "merged"): 5,
                             ("triton", "factorized"): 162},
    ("conv3d", "tenvoo-q"): {("reference", "merged"): 61, ("torch", "merged"): 46,
                             ("torch", "factorized"): 167, ("triton", "merged"): 5,
                             ("triton", "factorized"): 165},
    ("conv3d", "lora"): {("reference", "merged"): 4, ("torch", "merged"): 6,
                         ("triton", "merged"): 3},
    ("conv3d", "loha"): {("reference", "merged"): 10, ("torch", "merged"): 14,
                         ("triton", "merged"): 5},
    ("conv3d", "lokr"): {("reference", "merged"): 10, ("torch", "merged"): 10,
                         ("triton", "merged"): 5},
    ("linear", "quanta"): {("reference", "merged"): 13, ("torch", "merged"): 18,
                           ("torch", "factorized"): 56, ("triton", "merged"): 11,
                           ("triton", "factorized"): 56},
    ("linear", "lora"): {("reference", "merged"): 4, ("torch", "merged"): 6,
                         ("triton", "merged"): 3},
    ("linear", "loha"): {("reference", "merged"): 10, ("torch", "merged"): 14,
                         ("triton", "merged"): 5},
    ("linear", "lokr"): {("reference", "merged"): 10, ("torch", "merged"): 10,
                         ("triton", "merged"): 5},
}
#: Host seconds per launching call of an eager step (``benchmarks/step_model.py``'s fit to the
#: committed H100 runs; results/step-model-2026-12-07).
HOST_S_PER_LAUNCH = 74.3e-6
#: Traced CUDA time over roofline per op class, from the same calibration: cuDNN's 3-D convs
#: and everything else (matmuls, elementwise).
CONV_INEFFICIENCY = 5.97
OTHER_INEFFICIENCY = 1.37
#: Passes over the activations of the factorized strategy in one fwd+bwd (see
#: :func:`tenvoo_fast.dispatch.costs._conv_costs`).
FACTORIZED_PASSES = 7


def seconds_per_launch(mode: str, gpu: GPU = H100) -> float:
    return HOST_S_PER_LAUNCH if mode == "host" else gpu.kernel_floor_s


def _op(flops: float, moved: float, fp32: bool, inefficiency: float, gpu: GPU) -> float:
    peak = gpu.fp32_flops if fp32 else gpu.bf16_flops
    return inefficiency * max(flops / peak, moved / gpu.bytes_per_s)


@lru_cache(maxsize=4096)
def conv_device_seconds(network, x_shape: tuple, out_spatial: tuple, itemsize: int,
                        policy: str, factorized: bool = True,
                        gpu: GPU = H100) -> dict[str, float]:
    """Roofline seconds of an adapted Conv3d's extra work per strategy (fp32 contraction;
    convs and activations in ``itemsize``-byte elements; ``factorized``: that one too)."""
    cout, cin, *k = network.weight_shape
    n = x_shape[0]
    vin, vout, kvol = n * math.prod(x_shape[2:]), n * math.prod(out_spatial), math.prod(k)
    low = itemsize < 4
    weight = cout * cin * kvol
    builds = merged_builds(policy)
    # The weight built (and swept back) in fp32, cast for the conv, and dL/dW: a conv as big
    # as the layer's own, reading the input and the output's gradient.
    build = _op(builds * path_flops(network.equation, network.contraction_shapes),
                builds * 2 * 4 * weight, True, OTHER_INEFFICIENCY, gpu)
    grad_w = _op(2 * vout * cin * cout * kvol, (vin * cin + vout * cout) * itemsize + 4 * weight,
                 not low, CONV_INEFFICIENCY, gpu)
    if not factorized:
        return {"merged": build + grad_w}
    p = plan(network.equation, network.shapes)
    part = partition(p.equation, p.shapes, *channel_letters(network))
    ru, rv = part.rank_u, part.rank_v
    one_pass = (_op(2 * vin * cin * ru, (vin * cin + vin * ru) * itemsize, not low,
                    OTHER_INEFFICIENCY, gpu)
                + _op(2 * vout * ru * rv * kvol, (vin * ru + vout * rv) * itemsize, not low,
                      CONV_INEFFICIENCY, gpu)
                + _op(2 * vout * rv * cout, (vout * rv + 2 * vout * cout) * itemsize, not low,
                      OTHER_INEFFICIENCY, gpu))
    return {"merged": build + grad_w, "factorized": FACTORIZED_PASSES * one_pass}


@lru_cache(maxsize=4096)
def linear_device_seconds(network, tokens: int, activation_equation: str | None,
                          itemsize: int, policy: str, factorized: bool = True,
                          gpu: GPU = H100) -> dict[str, float]:
    """Roofline seconds of an adapted Linear's extra work per strategy."""
    out_f, in_f = network.weight_shape
    low = itemsize < 4
    shapes = tuple(tuple(c.shape) for c in network.cores)
    builds = merged_builds(policy)
    build = _op(builds * path_flops(network.equation, network.contraction_shapes),
                builds * 2 * 4 * out_f * in_f, True, OTHER_INEFFICIENCY, gpu)
    grad_w = _op(2 * tokens * in_f * out_f, tokens * (in_f + out_f) * itemsize + 4 * out_f * in_f,
                 not low, OTHER_INEFFICIENCY, gpu)
    if not factorized:
        return {"merged": build + grad_w}
    act = path_flops(activation_equation.replace("...", "t"),
                     ((tokens, *network.meta["in_factors"]), *shapes))
    one_pass = _op(act, 2 * tokens * (in_f + out_f) * itemsize, not low, OTHER_INEFFICIENCY, gpu)
    return {"merged": build + grad_w, "factorized": FACTORIZED_PASSES * one_pass}


def predicted(kind: str, method: str, device: dict[str, float], mode: str,
              gpu: GPU = H100) -> dict[tuple[str, str], float]:
    """Predicted seconds per step of every counted (backend, strategy) of a layer whose extra
    device work per strategy is ``device``; the reference runs the merged work."""
    per_launch = seconds_per_launch(mode, gpu)
    out = {}
    for (backend, strategy), n in LAUNCHES.get((kind, method), {}).items():
        out[(backend, strategy)] = n * per_launch + device[strategy]
    return out


def layer_args(layer, x_shape: tuple, dtype: torch.dtype) -> tuple:
    """What the prediction for ``layer`` on an input of ``x_shape`` computed in ``dtype``
    depends on, hashable (the choice is cached, and constant under ``torch.compile``)."""
    itemsize = dtype.itemsize
    net = layer.network
    if isinstance(layer, torch.nn.Linear):
        shape = (max(math.prod(x_shape[:-1]), 1), layer.activation_equation)
        return ("linear", net, shape, itemsize, current_launch_cost(), current_weight_policy())
    shape = (tuple(int(n) for n in x_shape), tuple(_out_spatial(layer, x_shape)))
    return ("conv3d", net, shape, itemsize, current_launch_cost(), current_weight_policy())


def seconds(kind: str, network, shape: tuple, itemsize: int, mode: str,
            policy: str) -> dict[tuple[str, str], float]:
    """:func:`predicted` from :func:`layer_args`."""
    counted = LAUNCHES.get((kind, network.method), {})
    device = (linear_device_seconds if kind == "linear" else conv_device_seconds)(
        network, *shape, itemsize, policy, any(s == "factorized" for _, s in counted))
    return predicted(kind, network.method, device, mode)


def _out_spatial(layer, x_shape) -> list[int]:
    if isinstance(layer.padding, str):
        return list(x_shape[2:])
    return conv_output_spatial(x_shape[2:], layer.kernel_size, layer.stride, layer.padding,
                               layer.dilation)


def ranking(layer, x_shape: tuple, dtype: torch.dtype) -> tuple[str, ...]:
    """:data:`CANDIDATES`, cheapest predicted first (each at its best strategy); backends
    without a count for the layer's method keep their order after the counted ones."""
    return _ranking(*layer_args(layer, x_shape, dtype))


@torch.compiler.assume_constant_result
def _ranking(*args) -> tuple[str, ...]:
    return _ranking_cached(*args)


@lru_cache(maxsize=4096)
def _ranking_cached(*args) -> tuple[str, ...]:
    predicted_s = seconds(*args)
    best = {b: min((t for (bb, _), t in predicted_s.items() if bb == b), default=math.inf)
            for b in CANDIDATES}
    return tuple(sorted(CANDIDATES, key=lambda b: (best[b], CANDIDATES.index(b))))


def cheapest_strategy(layer, x_shape: tuple, dtype: torch.dtype, backend: str,
                      allowed: tuple[str, ...]) -> str | None:
    """The cheapest predicted of ``allowed`` strategies for ``layer`` on ``backend``, None if
    none of them is counted for its method."""
    return _cheapest(*layer_args(layer, x_shape, dtype), backend, allowed)


@torch.compiler.assume_constant_result
def _cheapest(*args) -> str | None:
    return _cheapest_cached(*args)


@lru_cache(maxsize=4096)
def _cheapest_cached(kind, network, shape, itemsize, mode, policy, backend, allowed):
    predicted_s = seconds(kind, network, shape, itemsize, mode, policy)
    options = {s: t for (b, s), t in predicted_s.items() if b == backend and s in allowed}
    return min(options, key=options.get) if options else None
