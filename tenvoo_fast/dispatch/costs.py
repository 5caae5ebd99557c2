"""The strategies' flop models: estimated extra flops of one fwd+bwd over the frozen layer's.

:mod:`.strategy` picks the cheapest strategy per layer and shape by these under ``auto`` off
CUDA, each operator call the ``torch`` kernels issue from Python charged on the CPU (a measured
decision, :mod:`.autotune`, replaces them where it has run; on CUDA :mod:`.gpu_costs` predicts
times instead).
"""
from __future__ import annotations

import math
from functools import lru_cache

from ..contraction.partition import channel_letters, partition
from ..contraction.prereduce import plan
from ..contraction.sweep import path_flops
from .context import current_weight_policy


def linear_costs(network, tokens: int, activation_equation: str) -> dict[str, int]:
    """:func:`_linear_costs` under the current weight policy."""
    return _linear_costs(network, tokens, activation_equation, current_weight_policy())


def conv_costs(network, x_shape: tuple, out_spatial: tuple) -> dict[str, int]:
    """:func:`_conv_costs` under the current weight policy."""
    return _conv_costs(network, x_shape, out_spatial, current_weight_policy())


@lru_cache(maxsize=1024)
def _linear_costs(network, tokens: int, activation_equation: str, policy: str) -> dict[str, int]:
    """Estimated extra flops of one fwd+bwd over the frozen layer's, per strategy.

    merged: the build twice (forward, and again in backward unless the "keep" weight policy
    kept it: :func:`merged_builds`), the reverse sweep (about two builds) and the dL/dW GEMM
    (2·tokens·in·out). factorized: the adapter on the activations
    for θ and θ0 in forward, then in backward both again plus their reverse sweeps (about
    seven applications in all; the base GEMMs are the frozen layer's own).
    """
    shapes = tuple(tuple(c.shape) for c in network.cores)
    out_f, in_f = network.weight_shape
    build = path_flops(network.equation, shapes)
    act_eq = activation_equation.replace("...", "t")
    act = path_flops(act_eq, ((tokens, *network.meta["in_factors"]), *shapes))
    merged = merged_builds(policy) * build + 2 * tokens * in_f * out_f
    return {"merged": merged, "factorized": 7 * act}


def merged_builds(policy: str) -> int:
    """Builds' worth of contraction flops in a merged fwd+bwd: forward, the rebuild in
    backward (none when the forward keeps the weight), and the reverse sweep (about two)."""
    return 3 if policy == "keep" else 4


@lru_cache(maxsize=4096)
def _conv_costs(network, x_shape: tuple, out_spatial: tuple, policy: str) -> dict[str, int]:
    """Estimated extra flops of one fwd+bwd over the frozen conv's (forward + input gradient),
    per strategy, for an input of ``x_shape`` and an output of ``out_spatial`` voxels.

    merged: the weight built twice and swept back once (about four builds, opt_einsum's
    count; three when the forward keeps it: :func:`merged_builds`) plus the dL/dW pass, as
    costly as the conv itself. factorized: the three maps of
    A(x) = V·conv(U·x, K) (2 flops per multiply-add), run about seven times (θ and θ0 in
    forward; in backward θ's recompute, input and block gradients and θ0's recompute and
    input gradient). Cached per network and shapes (the path search costs milliseconds).
    """
    cout, cin, *k = network.weight_shape
    n = x_shape[0]
    vin, vout = n * math.prod(x_shape[2:]), n * math.prod(out_spatial)
    kvol = math.prod(k)
    p = plan(network.equation, network.shapes)
    part = partition(p.equation, p.shapes, *channel_letters(network))
    merged = (merged_builds(policy) * path_flops(p.equation, p.shapes)
              + 2 * vout * cin * cout * kvol)
    path = 2 * (vin * cin * part.rank_u + vout * part.rank_u * part.rank_v * kvol
                + vout * part.rank_v * cout)
    return {"merged": merged, "factorized": 7 * path}


#: Operator calls per training step of one adapted layer beyond its frozen base that the
#: ``torch`` kernels issue from Python on the CPU, per strategy (the factorized ones counted on
#: the CPU: tests/dispatch/test_cpu_costs.py checks them). A merged layer runs as one C++
#: function there (:mod:`tenvoo_fast.kernels.native_layer`), whose host time (about 0.2 ms for a
#: small TenVOO-L or QuanTA layer on the development CPU) is charged as that many calls; without
#: the extension it is the Python op's counted calls.
CPU_CALLS = {"native": {"conv3d": {"merged": 8, "factorized": 164},
                        "linear": {"merged": 8, "factorized": 56}},
             "python": {"conv3d": {"merged": 47, "factorized": 164},
                        "linear": {"merged": 15, "factorized": 56}}}
#: The flops one Python-issued operator call is worth on the CPU: ~25 µs of host time per call
#: (a small layer's factorized step: 1.3 ms for 56 calls) at ~10 Gflop/s (a QuanTA 512x512
#: merged step: 7 ms for 1e8 flops), both measured on the 2-core development CPU.
CPU_CALL_FLOPS = 25e-6 * 10e9


def with_cpu_calls(costs: dict[str, int], kind: str, native: bool) -> dict[str, float]:
    """``costs`` plus :data:`CPU_CALL_FLOPS` per Python-issued call of each strategy on the CPU
    (``native``: merged runs as the C++ function)."""
    calls = CPU_CALLS["native" if native else "python"][kind]
    return {s: c + CPU_CALL_FLOPS * calls.get(s, 0) for s, c in costs.items()}
