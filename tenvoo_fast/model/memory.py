"""Memory the adapters need, checked before anything is allocated: the free memory of a device,
and the bytes an adapter configuration's cores and frozen copies take (from adapters built on
meta-device copies of the targets, which allocate nothing)."""
from __future__ import annotations

import os
from collections import defaultdict

import torch
from torch import nn

from ..errors import AdapterError
from ..methods import build
from ..nn.adapted_conv import meta_conv_like
from ..nn.linear import meta_linear_like


def _meta_shadow(module: nn.Module) -> nn.Module:
    """A Conv3d/Conv2d/Linear with ``module``'s hyper-parameters and dtype on the meta device (no
    memory), for building an adapter only to read its shapes; other modules as they are (the
    build refuses them before allocating anything)."""
    if isinstance(module, (nn.Conv3d, nn.Conv2d)):
        return meta_conv_like(module)
    if isinstance(module, nn.Linear):
        return meta_linear_like(module)
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


def adapter_bytes(config, targets) -> tuple[dict, dict, dict, bool]:
    """Bytes of the cores and of the frozen copies per device, the layer count per device, and
    whether there are frozen copies; from adapters built on meta copies of the targets."""
    cores, frozen_bytes, layers, frozen = defaultdict(int), defaultdict(int), defaultdict(int), \
        False
    for name, module in targets:
        layer = build(config, name, _meta_shadow(module))
        device = module.weight.device
        frozen = frozen or layer.frozen_cores is not None
        cores[device] += sum(t.numel() * t.element_size() for t in layer.cores)
        frozen_bytes[device] += sum(t.numel() * t.element_size()
                                    for t in (layer.frozen_cores or []))
        layers[device] += 1
    return cores, frozen_bytes, layers, frozen


def check_adapter_memory(config, targets) -> None:
    """Refuse, before allocating anything, adapters whose cores and frozen copies (at master
    dtype) do not fit in the memory free on their device: a large rank (TenVOO cores grow as
    r^4) would otherwise run the process out of memory half-way through injection. Building
    each adapter on a meta-device copy of its layer gives the exact shapes, and checks the
    layer can be adapted at all, before the model is touched."""
    cores, frozen_bytes, layers, frozen = adapter_bytes(config, targets)
    for device, n in cores.items():
        n += frozen_bytes[device]
        free = available_memory(device)
        if free is not None and n > free:
            what = "cores and frozen copies" if frozen else "cores"
            raise AdapterError(f"rank {config.rank}: the adapters would allocate "
                               f"{n / 2**30:.1f} GiB ({what} of {layers[device]} layers) but "
                               f"only {free / 2**30:.1f} GiB are free on {device}; use a "
                               "smaller rank or fewer targets")


