"""Model-level API: inject adapters into a model, choose what trains, merge them back out."""
from __future__ import annotations

import os
import re
from collections import defaultdict

import torch
from torch import nn

from .config import AdapterConfig
from .errors import AdapterError
from .modules.adapter_layer import AdapterLayer

_CONFIG_ATTR = "tenvoo_config"


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel / DataParallel wrapper, if any."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
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


def _meta_shadow(module: nn.Module) -> nn.Module:
    """A Conv3d/Linear with ``module``'s hyper-parameters and dtype on the meta device (no
    memory), for building an adapter only to read its shapes; other modules as they are (the
    build refuses them before allocating anything)."""
    if isinstance(module, nn.Conv3d):
        return nn.Conv3d(module.in_channels, module.out_channels, module.kernel_size,
                         stride=module.stride, padding=module.padding, dilation=module.dilation,
                         groups=module.groups, bias=module.bias is not None,
                         padding_mode=module.padding_mode, device="meta",
                         dtype=module.weight.dtype)
    if isinstance(module, nn.Linear):
        return nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                         device="meta", dtype=module.weight.dtype)
    return module


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on ``device``, or None where unknown (then nothing is
    checked). CPU: MemAvailable from /proc/meminfo (else os.sysconf's available pages), and
    no more than a cgroup v2 memory limit leaves; CUDA: torch.cuda.mem_get_info."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    if device.type != "cpu":
        return None
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if free is None:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, OSError, ValueError):
            return None
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        if limit != "max":
            free = min(free, max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return free


def _adapter_bytes(config: AdapterConfig, targets) -> tuple[dict, dict, bool]:
    """Bytes of the cores and of the frozen copies per device, the layer count per device, and
    whether there are frozen copies; from adapters built on meta copies of the targets."""
    cores, frozen_bytes, layers, frozen = defaultdict(int), defaultdict(int), defaultdict(int), \
        False
    for name, module in targets:
        layer = config.build(name, _meta_shadow(module))
        device = module.weight.device
        frozen = frozen or layer.frozen_cores is not None
        cores[device] += sum(t.numel() * t.element_size() for t in layer.cores)
        frozen_bytes[device] += sum(t.numel() * t.element_size()
                                    for t in (layer.frozen_cores or []))
        layers[device] += 1
    return cores, frozen_bytes, layers, frozen


def adapter_memory(model: nn.Module, config: AdapterConfig) -> tuple[int, int]:
    """(bytes of the cores, bytes of the frozen copies) that ``inject(model, config)`` would
    allocate, computed without allocating them (for memory checks before training)."""
    cores, frozen, _, _ = _adapter_bytes(config, _targets(unwrap(model), config)[0])
    return sum(cores.values()), sum(frozen.values())


def _check_adapter_memory(config: AdapterConfig, targets) -> None:
    """Refuse, before allocating anything, adapters whose cores and frozen copies (at master
    dtype) do not fit in the memory free on their device: a large rank (TenVOO cores grow as
    r^4) would otherwise run the process out of memory half-way through injection. Building
    each adapter on a meta-device copy of its layer gives the exact shapes, and checks the
    layer can be adapted at all, before the model is touched."""
    cores, frozen_bytes, layers, frozen = _adapter_bytes(config, targets)
    for device, n in cores.items():
        n += frozen_bytes[device]
        free = available_memory(device)
        if free is not None and n > free:
            what = "cores and frozen copies" if frozen else "cores"
            raise AdapterError(f"rank {config.rank}: the adapters would allocate "
                               f"{n / 2**30:.1f} GiB ({what} of {layers[device]} layers) but "
                               f"only {free / 2**30:.1f} GiB are free on {device}; use a "
                               "smaller rank or fewer targets")


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
    _check_adapter_memory(config, targets)
    for name, module in targets:
        _set_submodule(model_, name, config.build(name, module))
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
