"""Folding each frozen copy's T(θ0) into its fp32 base weight: the memory-lean frozen copy.

An adapter with a frozen copy computes ``W - T(θ0) + T(θ)``; keeping T(θ0) costs one fp32
weight-size tensor per adapted layer (about 0.6 GB on the paper model). :func:`fold_frozen`
stores ``W - T(θ0)`` in the weight instead, where the base is fp32 or fp64; low-precision bases
keep the copy (folding would destroy W). The folded model computes the same function up to the
rounding of ``W - T(θ0)`` (not bit-exactly at initialisation, where the unfolded one is exact),
and its adapter files are those of the unfolded model, so they load into a fresh base.
"""
from __future__ import annotations

from collections import Counter

from torch import nn

from ..errors import AdapterError
from .adapter_file import FOLDED_BASE_ATTR, base_fingerprint, current_fingerprint
from .inject import adapter_layers, unwrap


def fold_frozen(model: nn.Module) -> list[str]:
    """Fold T(θ0) into the base weight of every adapted layer that keeps a frozen copy on an
    fp32/fp64 base; returns the names of the layers folded (the others keep their copy).
    The weight tensors change in place (also for whoever else holds them); a weight that two
    modules share is not folded (it would be folded twice). Call it after ``inject`` and any
    ``load_adapter``: a folded model refuses to load another adapter's frozen copies."""
    model_ = unwrap(model)
    layers = adapter_layers(model_)
    if not layers:
        raise AdapterError("fold_frozen: the model has no adapter layers; inject first")
    before = base_fingerprint(model_)
    uses = Counter(id(p) for _, p in model_.named_parameters(remove_duplicate=False))
    folded = [name for name, layer in layers.items()
              if uses[id(layer.weight)] == 1 and layer._fold_frozen()]
    if folded:
        # What save_adapter records as the base: the weights before folding, valid while the
        # folded weights are these (a later load into them makes it stale).
        setattr(model_, FOLDED_BASE_ATTR, (before, current_fingerprint(model_)))
    return folded


def folded_layers(model: nn.Module) -> list[str]:
    return [n for n, layer in adapter_layers(unwrap(model)).items() if layer.frozen_folded]
