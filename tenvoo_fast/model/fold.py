"""Folding each frozen copy's T(θ0) into its fp32 base weight: the memory-lean frozen copy.

An adapter with a frozen copy computes ``W - T(θ0) + T(θ)``; keeping T(θ0) costs one fp32
weight-size tensor per adapted layer (about 0.6 GB on the paper model). :func:`fold_frozen`
stores ``W - T(θ0)`` in the weight instead, where the base is fp32 or fp64; low-precision bases
keep the copy (folding would destroy W). The folded model computes the same function up to the
rounding of ``W - T(θ0)`` (not bit-exactly at initialisation, where the unfolded one is exact),
and its adapter files are those of the unfolded model, so they load into a fresh base.
"""
from __future__ import annotations

from torch import nn

from ..errors import AdapterError
from .adapter_file import FOLDED_BASE_ATTR, base_fingerprint
from .inject import adapter_layers, unwrap


def fold_frozen(model: nn.Module) -> list[str]:
    """Fold T(θ0) into the base weight of every adapted layer that keeps a frozen copy on an
    fp32/fp64 base; returns the names of the layers folded (the others keep their copy).
    Call it after ``inject`` and any ``load_adapter``: a folded model refuses to load another
    adapter's frozen copies."""
    model_ = unwrap(model)
    layers = adapter_layers(model_)
    if not layers:
        raise AdapterError("fold_frozen: the model has no adapter layers; inject first")
    if not any(layer.frozen_folded for layer in layers.values()):
        # What save_adapter records as the base: the weights before any folding.
        setattr(model_, FOLDED_BASE_ATTR, base_fingerprint(model_))
    return [name for name, layer in layers.items() if layer.fold_frozen()]


def folded_layers(model: nn.Module) -> list[str]:
    return [n for n, layer in adapter_layers(unwrap(model)).items() if layer.frozen_folded]
