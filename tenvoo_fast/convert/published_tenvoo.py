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
from ..model.published_checkpoint import layer_config, published_layers


def _plain_layer(module: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A plain Conv3d / Linear with ``module``'s settings and bias and the weight ``weight``."""
    bias = module.bias
    if isinstance(module, nn.Conv3d):
        new = nn.Conv3d(module.in_channels, module.out_channels, module.kernel_size,
                        stride=module.stride, padding=module.padding, dilation=module.dilation,
                        groups=module.groups, bias=bias is not None,
                        padding_mode=module.padding_mode, device="meta")
    else:
        new = nn.Linear(module.in_features, module.out_features, bias=bias is not None,
                        device="meta")
    new.weight = nn.Parameter(weight, requires_grad=False)
    new.bias = bias
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
    returns (root, its adapter config, notes). Every layer is checked before any is replaced."""
    converted, parsed = {}, {}
    for name, m in modules.items():
        if getattr(m, "fan_in_fan_out", False):
            raise AdapterError(f"{name}: a published Linear with fan_in_fan_out=True (a "
                               "transposed weight); tenvoo_fast's Linear keeps [out, in]")
        if not isinstance(m, (nn.Conv3d, nn.Linear)):
            raise AdapterError(f"{name}: a published TenVOO layer on a {type(m).__name__}; "
                               "tenvoo_fast adapts Conv3d and Linear layers")
        state = {f"{name}.{k}": v for k, v in m.state_dict().items()}
        layer, = published_layers(state).values()
        parsed[name] = layer
        net = layer.network()
        plain = _plain_layer(m, layer.base_weight(net))
        cls = TenVOOConv3d if layer.is_conv else QuanTALinear
        new = cls._build(plain, net, name, frozen_copy=True)
        with torch.no_grad():
            for dst, src in zip(new.cores, layer.cores):
                dst.copy_(src)
            for dst, src in zip(new.frozen_cores, layer.frozen):
                dst.copy_(src)
        converted[name] = new
    trains_bias = any(m.bias is not None and m.bias.requires_grad for m in modules.values())
    trains_norm = any(p.requires_grad for n, p in root.named_parameters() if "norm" in n)
    trainable = [t for t, on in (("bias", trains_bias), ("norm", trains_norm)) if on]
    config = layer_config(parsed, modules, trainable=trainable)
    notes = []
    dropouts = sorted({float(m.dropout.p) for m in modules.values()
                       if isinstance(getattr(m, "dropout", None), nn.Dropout)})
    if dropouts:
        notes.append(f"the published layers' dropout (p={dropouts}) is not part of "
                     "tenvoo_fast's layers: the converted model trains without it")
    for name, new in converted.items():
        parent, _, child = name.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, child, new)
    return root, config, notes
