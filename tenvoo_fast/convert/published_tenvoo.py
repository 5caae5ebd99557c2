"""The published TenVOO code's layers, in a live model, converted to tenvoo_fast's.

A published ``Conv3d`` (TenVOO-L/Q) or ``Linear`` (QuanTA) layer becomes a
:class:`~tenvoo_fast.TenVOOConv3d` / :class:`~tenvoo_fast.QuanTALinear` holding the same cores,
frozen copy and bias around the base weight with the published folds undone (how the saved
state is read: :mod:`tenvoo_fast.model.published_checkpoint`).
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..errors import AdapterError
from ..methods.quanta import QuanTALinear
from ..methods.tenvoo import TenVOOConv3d
from ..model.config import AdapterConfig
from ..model.inject import _set_submodule, mark_trainable
from ..model.published_checkpoint import layer_config, published_layers
from ..nn.adapted_conv import meta_conv_like
from ..nn.linear import meta_linear_like


def _plain_layer(module: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A plain Conv3d / Linear with ``module``'s settings and bias and the weight ``weight``."""
    new = (meta_conv_like(module) if isinstance(module, nn.Conv3d)
           else meta_linear_like(module))
    new.weight = nn.Parameter(weight, requires_grad=False)
    new.bias = module.bias
    return new


def published_modules(root: nn.Module) -> dict[str, nn.Module]:
    """Name -> every published TenVOO layer (a module with ``tenvoo_weights`` or
    ``quanta_weights``) in ``root``."""
    return {n: m for n, m in root.named_modules()
            if hasattr(m, "tenvoo_weights") or hasattr(m, "quanta_weights")}


def convert_published(root: nn.Module, modules: Mapping[str, nn.Module]
                      ) -> tuple[nn.Module, AdapterConfig, list[str]]:
    """Replace the published TenVOO layers ``modules`` of ``root``, in place, by TenVOOConv3d /
    QuanTALinear holding the same cores, frozen copies, bias and base weight (folds undone);
    returns (root, its adapter config, notes). Every layer is checked before any is replaced.
    What trains is what the published training trains: the cores, the adapted layers' biases
    and the norms."""
    parsed = {}
    for name, m in modules.items():
        if getattr(m, "fan_in_fan_out", False):
            raise AdapterError(f"{name}: a published Linear with fan_in_fan_out=True (a "
                               "transposed weight); tenvoo_fast's Linear keeps [out, in]")
        if not isinstance(m, (nn.Conv3d, nn.Linear)):
            raise AdapterError(f"{name}: a published TenVOO layer on a {type(m).__name__}; "
                               "tenvoo_fast adapts Conv3d and Linear layers")
        state = {f"{name}.{k}": v for k, v in m.state_dict().items()}
        parsed[name], = published_layers(state).values()
        if parsed[name].frozen is None:
            raise AdapterError(f"{name}: a published layer without its frozen copy "
                               "(tenvoo_weights2 / quanta_weights2), which the published "
                               "layers always keep")
    # What the published training trains besides the cores (adapters.md §6's default), whatever
    # requires_grad says now (a model prepared for inference has it off everywhere).
    config = layer_config(parsed, modules)
    converted = {}
    for name, layer in parsed.items():
        net = layer.network()
        plain = _plain_layer(modules[name], layer.base_weight(net))
        cls = TenVOOConv3d if layer.is_conv else QuanTALinear
        new = cls._build(plain, net, name, frozen_copy=True)
        with torch.no_grad():
            for dst, src in zip(new.cores, layer.cores):
                dst.copy_(src)
            for dst, src in zip(new.frozen_cores, layer.frozen):
                dst.copy_(src)
        converted[name] = new
    notes = []
    dropouts = sorted({float(m.dropout.p) for m in modules.values()
                       if isinstance(getattr(m, "dropout", None), nn.Dropout)})
    if dropouts:
        notes.append(f"the published layers' dropout (p={dropouts}) is not part of "
                     "tenvoo_fast's layers: the converted model trains without it")
    for name, new in converted.items():
        _set_submodule(root, name, new)
    mark_trainable(root, config)
    return root, config, notes
