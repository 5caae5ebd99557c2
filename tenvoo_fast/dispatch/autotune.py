"""Measured choice of backend and strategy per adapted layer (``tf.autotune``).

The default ``auto`` ranks backends by a table of earlier measurements on the CPU
(:data:`.backends.AUTO_RANKING`) and by a predicted time on CUDA (:mod:`.gpu_costs`), and
picks a strategy by a flop model (:mod:`.costs`) or that prediction.
:func:`tune` replaces both with a measurement on this machine: it runs the model once to see
each adapted layer's input, then times every candidate (backend, strategy) on that layer alone,
fwd+bwd, and keeps the fastest. Decisions are cached per layer signature,
input shape, device, dtype and autocast dtype (so layers of the same kind share them), and
``auto`` consults the cache first; :func:`decisions` says what was chosen, from which timings.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable

import torch

from . import backends, context
from .strategy import supported_strategies

#: key -> {"choice": (backend, strategy), "ms": {"backend/strategy": median ms}}
_DECISIONS: dict[tuple, dict] = {}


def layer_key(layer, x: torch.Tensor) -> tuple:
    """What a decision depends on: the layer's kind, network and conv geometry, the input's
    shape, device and dtype, and the autocast dtype."""
    conv = tuple(getattr(layer, a, None) for a in ("stride", "padding", "dilation",
                                                   "padding_mode"))
    amp = (torch.get_autocast_dtype(x.device.type)
           if torch.is_autocast_enabled(x.device.type) else None)
    return (type(layer).__name__, layer.network, conv, tuple(x.shape), x.device.type, x.dtype,
            amp)


def lookup(layer, x: torch.Tensor):
    """The tuned (backend, strategy) for this layer and input, or None."""
    if not _DECISIONS:
        return None
    hit = _DECISIONS.get(layer_key(layer, x))
    return None if hit is None else hit["choice"]


def decisions() -> list[dict]:
    """Every cached decision: the layer kind, input shape, device, the choice and the timings."""
    return [dict(layer=k[0], method=k[1].method, input_shape=list(k[3]), device=k[4],
                 dtype=str(k[5]), choice="/".join(v["choice"]), ms=v["ms"])
            for k, v in _DECISIONS.items()]


def clear() -> None:
    _DECISIONS.clear()


def _candidates(layer, x):
    """Every (backend, strategy) that can run this layer on this input (never the Triton
    interpreter: off CUDA, triton is not a candidate)."""
    out = []
    for name in backends.registered_backends():
        backend = backends.get_backend(name)
        if backend.unavailable_reason() or backend.unsupported_reason(layer, x):
            continue
        if backend.impl == "triton" and x.device.type != "cuda":
            continue
        strategies = (("merged",) if backend.impl is None
                      else supported_strategies(layer, backend.impl))
        out += [(name, s) for s in strategies]
    return out


def _time(layer, x, backend: str, strategy: str, repeats: int) -> float:
    params = [p for p in layer.parameters() if p.requires_grad]
    xg = x.detach().requires_grad_(x.is_floating_point())
    times = []
    with context.backend_scope(backend), context.strategy_scope(strategy, strict=True):
        for i in range(repeats + 1):
            if x.device.type == "cuda":
                torch.cuda.synchronize()
            began = time.perf_counter()
            y = layer(xg)
            grads = torch.autograd.grad(y.float().sum(), [xg, *params], allow_unused=True)
            if x.device.type == "cuda":
                torch.cuda.synchronize()
            if i:     # the first run warms up
                times.append(time.perf_counter() - began)
            del y, grads
    return sorted(times)[len(times) // 2] * 1e3


def _adapted_layers(model_or_layers) -> list:
    """The adapted layers of a model (modules with an adapter network and cores), or the
    layers given."""
    if isinstance(model_or_layers, torch.nn.Module):
        return [m for m in model_or_layers.modules()
                if hasattr(m, "network") and hasattr(m, "cores")]
    return list(model_or_layers)


def tune(model_or_layers, run: Callable[[], object], repeats: int = 3) -> list[dict]:
    """Run ``run()`` (one forward of the model, e.g. ``lambda: model(x, timesteps=t)``) to see
    the input of every adapted layer (of the model, or the layers given), time each candidate
    backend and strategy on it, and cache the fastest. Returns :func:`decisions`. Run it under
    the autocast you train with."""
    seen: dict[tuple, tuple] = {}
    hooks = []
    for layer in _adapted_layers(model_or_layers):
        def hook(module, args, _layer=layer):
            x = args[0]
            key = layer_key(_layer, x)
            if key not in seen and key not in _DECISIONS:
                seen[key] = (_layer, x.detach().clone())
        hooks.append(layer.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    for key, (layer, x) in seen.items():
        ms = {}
        for backend, strategy in _candidates(layer, x):
            with contextlib.suppress(torch.cuda.OutOfMemoryError):
                ms[f"{backend}/{strategy}"] = _time(layer, x, backend, strategy, repeats)
        if ms:
            best = min(ms, key=ms.get)
            _DECISIONS[key] = dict(choice=tuple(best.split("/")), ms=ms)
    return decisions()
