"""How a federated round combines the clients' adapters: the weights of each scheme, and the two
ways of applying them.

Weights (each sums to one over the clients that answered):

- ``fedavg``: equal;
- ``fedpetuning``: by each client's number of training volumes;
- ``rate-my-lora``: Rate-My-LoRA's Eq. 1 (``../shared/papers/rate-my-lora-federated.txt``): when
  some client's validation metric got worse than in the previous round, every client whose own
  metric got better is penalised, ``w(c) = 1 - λ``, otherwise ``w(c) = 1``; each weighted by its
  number of volumes as in Eq. 2. λ decays 5% a round; at 0 this is ``fedpetuning``. The metric
  here is the validation loss (lower is better), so "better" is a lower loss. Eq. 2 divides by
  the clients' total volumes, which shrinks the update while penalising; here the weights are
  normalised to sum to one instead.

Applied as:

- ``factors``: the weighted mean of every trained tensor (cores, biases, norms). For a
  multilinear adapter (LoRA's ``up @ down``, TenVOO's network) this is not the mean of the
  clients' updates ΔW, only close to it when the clients' factors stay close;
- ``exact``: the weighted mean of the updates ΔW_c = T(θ_c) - T(θ0) is added to the base
  weights, and the adapters restart at ΔW = 0 the next round (:func:`merge_exact`); biases and
  norms, which enter linearly, are averaged. Exact in ΔW space (fp64 sums, one rounding to the
  weight's dtype). Every client must apply the same merge to its own copy of the base, so the
  server sends all clients' adapters (and their weights), not one.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from ...contraction import reference
from ...contraction.network import ZEROS
from ...errors import RunError
from ...model.inject import adapter_layers, unwrap

SCHEMES = ("fedavg", "fedpetuning", "rate-my-lora")
MODES = ("exact", "factors")
#: Rate-My-LoRA's decay of λ per round.
LAMBDA_DECAY = 0.95


def scheme_weights(scheme: str, sizes: Sequence[int], *, previous: Sequence[float] | None = None,
                   current: Sequence[float] | None = None, lam: float = 0.0) -> list[float]:
    """The clients' aggregation weights (they sum to one). ``sizes``: training volumes per
    client; for ``rate-my-lora``, ``previous``/``current``: each client's validation loss in the
    previous round and this one (no penalty without a previous round) and the round's λ."""
    if not sizes:
        raise RunError("aggregation: no client answered this round")
    if scheme == "fedavg":
        raw = [1.0] * len(sizes)
    elif scheme == "fedpetuning":
        raw = [float(n) for n in sizes]
    elif scheme == "rate-my-lora":
        raw = [float(n) * w for n, w in zip(sizes, rate_my_lora_factors(previous, current, lam))]
    else:
        raise RunError(f"aggregation: unknown scheme {scheme!r}; choose one of {SCHEMES}")
    total = sum(raw)
    if total <= 0:
        raise RunError(f"aggregation: the {scheme} weights {raw} sum to {total}")
    return [w / total for w in raw]


def rate_my_lora_factors(previous, current, lam: float) -> list[float]:
    """Eq. 1's ``w(c)``: ``1 - λ`` for the clients whose loss went down while another's went
    up, 1 for the others (and for everyone without a previous round)."""
    if previous is None or current is None:
        return [1.0] * (len(current) if current is not None else 0)
    if len(previous) != len(current):
        raise RunError("rate-my-lora: the previous and current metrics name different clients")
    worse = [c > p for p, c in zip(previous, current)]
    better = [c < p for p, c in zip(previous, current)]
    if not any(worse):
        return [1.0] * len(current)
    return [1.0 - lam if b else 1.0 for b in better]


def weighted_mean(states: Sequence[Mapping[str, torch.Tensor]],
                  weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """``Σ w_c · state_c`` for every key (fp64 sums, cast back to each tensor's dtype)."""
    keys = set(states[0])
    for s in states[1:]:
        if set(s) != keys:
            missing = sorted(keys ^ set(s))
            raise RunError(f"aggregation: the clients sent different tensors (e.g. {missing[0]})")
    out = {}
    for key in states[0]:
        total = sum(w * s[key].to(torch.float64) for s, w in zip(states, weights))
        out[key] = total.to(states[0][key].dtype)
    return out


def layer_updates(model: nn.Module, state: Mapping[str, torch.Tensor]
                  ) -> dict[str, torch.Tensor]:
    """Layer name -> ΔW = T(θ) - T(θ0) in fp64, for the cores ``state`` holds (adapter-file
    names, ``<layer>.cores.<i>``) on ``model``'s adapted layers."""
    updates = {}
    for name, layer in adapter_layers(model).items():
        cores = [state[f"{name}.cores.{i}"] for i in range(len(layer.cores))]
        delta = reference.delta_weight(layer.network, [c.to(torch.float64) for c in cores])
        if layer.frozen_cores is not None:
            frozen = [t.to(torch.float64) for t in layer.frozen_cores]
            delta = delta - reference.delta_weight(layer.network, frozen)
        updates[name] = delta
    return updates


@torch.no_grad()
def merge_exact(model: nn.Module, states: Sequence[Mapping[str, torch.Tensor]],
                weights: Sequence[float]) -> None:
    """The ``exact`` mode on ``model`` (in place): each adapted layer's base weight gets
    ``Σ w_c ΔW_c`` (fp64, one rounding) and its adapter restarts at ΔW = 0: the cores back at
    the frozen copy, or (LoRA, LoHa, LoKr, zero-last) the factors their initialisation zeroes
    at zero again and the others at the weighted mean; every other trained tensor in
    ``states`` (biases, norms) becomes the weighted mean."""
    model = unwrap(model)
    layers = adapter_layers(model)
    restart = {}
    for name, layer in layers.items():
        zero = {i for i, c in enumerate(layer.network.cores) if c.init == ZEROS}
        if layer.frozen_cores is None and not zero:
            raise RunError(f"exact aggregation restarts {name}'s adapter where its update is "
                           "zero, but it keeps no frozen copy and no core starts at zero; use "
                           "--aggregation factors")
        restart[name] = zero
    sums = {}
    for state, w in zip(states, weights):
        for name, delta in layer_updates(model, state).items():
            sums[name] = sums.get(name, 0) + w * delta
    mean = weighted_mean(states, weights)
    params = dict(model.named_parameters())
    for key, value in mean.items():
        params[key].copy_(value.to(params[key].device))
    for name, layer in layers.items():
        layer.weight.copy_((layer.weight.to(torch.float64) + sums[name].to(layer.weight.device)
                            ).to(layer.weight.dtype))
        if layer.frozen_cores is not None:
            for core, copy in zip(layer.cores, layer.frozen_cores):
                core.copy_(copy)
        else:               # the zero-initialised factor zero again, the others the mean
            for i in restart[name]:
                layer.cores[i].zero_()
