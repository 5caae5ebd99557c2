"""Model-level API: inject adapters into a model, choose what trains, merge them back out."""
from __future__ import annotations

import re

from torch import nn

from ..errors import AdapterError
from ..methods import build
from ..nn.adapter_layer import AdapterLayer
from .config import AdapterConfig
from .memory import adapter_bytes, check_adapter_memory

_CONFIG_ATTR = "tenvoo_config"


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / DataParallel and ``torch.compile`` wrappers,
    if any (their parameter names carry ``module.`` / ``_orig_mod.``)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):   # torch.compile's
            model = model._orig_mod
        else:
            return model


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """Adapted layers by module name, in module order."""
    return {n: m for n, m in unwrap(model).named_modules() if isinstance(m, AdapterLayer)}


def execution_plan(model: nn.Module) -> list[dict]:
    """How each adapted layer ran in its latest forward: name, method, backend and strategy
    (``"merged"``/``"factorized"`` for the fast backends; None for the reference, which has
    one way, or for a layer that has not run yet)."""
    return [dict(layer=name, method=m.network.method,
                 backend=getattr(m, "execution_backend", None),
                 strategy=getattr(m, "execution_strategy", None))
            for name, m in adapter_layers(model).items()]


def get_config(model: nn.Module) -> AdapterConfig | None:
    return getattr(unwrap(model), _CONFIG_ATTR, None)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def adapter_memory(model: nn.Module, config: AdapterConfig) -> tuple[int, int]:
    """(bytes of the cores, bytes of the frozen copies) that ``inject(model, config)`` would
    allocate, computed without allocating them (for memory checks before training)."""
    cores, frozen, _, _ = adapter_bytes(config, _targets(unwrap(model), config)[0])
    return sum(cores.values()), sum(frozen.values())


def inject(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Replace every target layer of ``model`` by its adapter, in place; freeze the rest.

    Returns the model. Only adapter cores, and what ``config.trainable`` adds, keep
    ``requires_grad``. Raises :class:`AdapterError` for patterns that match nothing or match
    something other than a Conv3d/Linear, for a model that is already adapted, for layers
    the method cannot adapt, and for adapters that would not fit in the free memory of their
    device (all before the model is changed).
    """
    if not isinstance(config, AdapterConfig):
        raise AdapterError(f"inject needs an AdapterConfig, got {type(config).__name__}")
    model_ = unwrap(model)
    existing = adapter_layers(model_)
    if existing:
        raise AdapterError(f"the model already has adapters (e.g. {next(iter(existing))}); "
                           "inject once per model, or call merge_and_unload(model) first")
    targets, skipped = _targets(model_, config)
    check_adapter_memory(config, targets)
    for name, module in targets:
        _set_submodule(model_, name, build(config, name, module))
    setattr(model_, _CONFIG_ATTR, config)
    model_.tenvoo_skipped = skipped
    mark_trainable(model_, config)
    return model


def _targets(model_: nn.Module, config: AdapterConfig) -> tuple[list, list]:
    """The (name, module) pairs ``config`` adapts in ``model_``, and the names it skips
    (single-channel convs); refuses patterns that match nothing."""
    named = [(n, m) for n, m in model_.named_modules() if n]
    targets, hits = [], {p: 0 for p in config.target_modules}
    for name, module in named:
        matched = [p for p in config.target_modules if re.search(p, name)]
        for p in matched:
            hits[p] += 1
        if matched:
            targets.append((name, module))
    unmatched = [p for p, n in hits.items() if n == 0]
    if unmatched:
        raise AdapterError(f"target pattern(s) {unmatched} match no module of this "
                           f"{type(model_).__name__}; check the names in model.named_modules() "
                           "or remove the pattern")
    skipped = [name for name, module in targets
               if isinstance(module, nn.Conv3d) and config.skip_single_channel
               and (module.in_channels == 1 or module.out_channels == 1)]
    return [(name, module) for name, module in targets if name not in skipped], skipped


def mark_trainable(model: nn.Module, config: AdapterConfig) -> None:
    """Set ``requires_grad``: cores always; plus the config's ``trainable`` groups."""
    model = unwrap(model)
    layers = adapter_layers(model)
    frozen_base = set()
    for layer in layers.values():
        frozen_base.add(id(layer.weight))
        if layer.bias is not None:
            frozen_base.add(id(layer.bias))
    core_ids = {id(p) for layer in layers.values() for p in layer.cores}
    groups = set(config.trainable)
    for name, p in model.named_parameters():
        if id(p) in core_ids:
            train = True
        elif "all" in groups:
            train = id(p) not in frozen_base
        else:
            train = "norm" in groups and "norm" in name.lower()
        p.requires_grad_(train)
    if "bias" in groups:
        for layer in layers.values():
            if layer.bias is not None:
                layer.bias.requires_grad_(True)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every adapter by a plain ``nn.Conv3d`` / ``nn.Linear`` with the merged weight.

    The merged weight is formed in fp32 and cast last to the layer's dtype. The model becomes
    a plain torch model: adapter bookkeeping is removed and every parameter is trainable again.
    """
    model_ = unwrap(model)
    for name, layer in adapter_layers(model_).items():
        _set_submodule(model_, name, layer.merged_module())
    for attr in (_CONFIG_ATTR, "tenvoo_skipped"):
        if hasattr(model_, attr):
            delattr(model_, attr)
    for p in model_.parameters():
        p.requires_grad_(True)
    return model


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in unwrap(model).parameters() if p.requires_grad or not trainable_only)
