"""LyCORIS's LoCon, LoHa and LoKr modules to tenvoo_fast's layers.

LyCORIS's ``apply_to`` leaves each original Conv3d/Conv2d/Linear in the model and replaces its
``forward`` with the LyCORIS module's, which adds ``multiplier · scale · scalar · ΔW``. The
module's factors are tenvoo_fast's cores in the same order and shapes (LoCon: down, up; LoHa:
w1a, w1b, w2a, w2b; LoKr: w1, w2 (or w2a, w2b), LyCORIS's split rule), so a
layer converts by restoring the original forward, adapting the layer with the same rank and
an alpha that gives the same scale (LoKr with two full factors included, where LyCORIS forces
scale 1), and copying the factors. Each converted layer is checked against LyCORIS's forward on
a probe input (its ``get_diff_weight`` scales LoHa twice, so the forward is the reference).
Options tenvoo_fast does not implement (Tucker factors, weight decomposition, a split w1) are
refused naming the layer.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from ..errors import AdapterError
from ..model.config import AdapterConfig
from ..methods.loha import LoHaConv2d, LoHaConv3d, LoHaLinear
from ..methods.lokr import LoKrConv2d, LoKrConv3d, LoKrLinear
from ..methods.lora import LoRAConv2d, LoRAConv3d, LoRALinear

#: LyCORIS module class -> (parameter names tenvoo_fast reproduces, Conv3d class, Linear class,
#: Conv2d class).
MODULES = {
    "LoConModule": (({"lora_down.weight", "lora_up.weight"},), LoRAConv3d, LoRALinear,
                    LoRAConv2d),
    "LohaModule": (({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"},), LoHaConv3d,
                   LoHaLinear, LoHaConv2d),
    "LokrModule": (({"lokr_w1", "lokr_w2"}, {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}), LoKrConv3d,
                   LoKrLinear, LoKrConv2d),
}


def is_lycoris(owner) -> bool:
    return type(owner).__module__.startswith("lycoris.")


def hooked_forwards(root: nn.Module) -> dict[str, object]:
    """Name -> the object whose bound method replaced that module's ``forward``."""
    found = {}
    for name, m in root.named_modules():
        owner = getattr(m.__dict__.get("forward"), "__self__", None)
        if owner is not None and owner is not m:
            found[name] = owner
    return found


def lycoris_hooks(root: nn.Module) -> dict[str, nn.Module]:
    """Name -> the LyCORIS module whose forward replaced that layer's."""
    return {n: owner for n, owner in hooked_forwards(root).items() if is_lycoris(owner)}


def convert_module(name: str, layer: nn.Module, module: nn.Module) -> tuple[nn.Module, str]:
    """(the tenvoo_fast layer for ``layer`` with ``module``'s factors, a note or "")."""
    kind = type(module).__name__
    if kind not in MODULES:
        raise AdapterError(f"{name}: a LyCORIS {kind}; tenvoo_fast converts LyCORIS's "
                           f"{', '.join(MODULES)}")
    if getattr(module, "wd", False):
        raise AdapterError(f"{name}: LyCORIS {kind} with weight decomposition (DoRA), which "
                           "tenvoo_fast does not implement")
    names = {n for n, _ in module.named_parameters()}
    sets, conv_cls, linear_cls, conv2d_cls = MODULES[kind]
    if names not in sets:
        extra = sorted(names - set().union(*sets))
        raise AdapterError(f"{name}: LyCORIS {kind} with factors {sorted(names)}"
                           + (f" ({', '.join(extra)}: Tucker or scalar options)" if extra else "")
                           + "; tenvoo_fast reproduces the plain factorisation only")
    if isinstance(layer, nn.Conv3d):
        cls, adapt = conv_cls, conv_cls.from_conv
    elif isinstance(layer, nn.Conv2d):
        cls, adapt = conv2d_cls, conv2d_cls.from_conv
    elif isinstance(layer, nn.Linear):
        cls, adapt = linear_cls, linear_cls.from_linear
    else:
        raise AdapterError(f"{name}: LyCORIS {kind} on a {type(layer).__name__}; tenvoo_fast "
                           "adapts Conv3d, Conv2d and Linear layers")
    rank = int(module.lora_dim)
    scale = float(module.scale) * float(module.multiplier) * float(module.scalar)
    options = {}
    if cls in (LoKrConv3d, LoKrConv2d, LoKrLinear):
        options = dict(factor=int(getattr(module, "factor", -1)), full_w2="lokr_w2" in names)
    new = adapt(layer, rank, scale * rank, name=name, **options)
    factors = [p for _, p in module.named_parameters()]
    shapes = [tuple(p.shape) for p in factors]
    ours = [tuple(c.shape) for c in new.cores]
    if shapes != ours:
        raise AdapterError(f"{name}: LyCORIS {kind} factors {shapes} do not match tenvoo_fast's "
                           f"{ours} for rank {rank}; a LyCORIS option changed the split")
    with torch.no_grad():
        for core, p in zip(new.cores, factors):
            core.copy_(p)
    difference = _probe(layer, new, module)
    if difference > 1e-4:
        raise AdapterError(f"{name}: LyCORIS {kind} computes another function than tenvoo_fast's "
                           f"layer with its factors (relative difference {difference:.2g} on a "
                           "probe input); not converted")
    drops = [f"{k}={getattr(module, k)}" for k in ("rank_dropout", "module_dropout")
             if float(getattr(module, k, 0) or 0) > 0]
    dropout = getattr(module, "dropout", 0)
    if isinstance(dropout, (int, float)) and dropout > 0:
        drops.append(f"dropout={dropout}")
    note = (f"{name}: LyCORIS {', '.join(drops)} is not part of tenvoo_fast's layers; it trains "
            "without it") if drops else ""
    return new, note


def convert_lycoris(root: nn.Module, hooks: dict[str, nn.Module]
                    ) -> tuple[nn.Module, AdapterConfig, list[str]]:
    """Replace every layer of ``root`` that a LyCORIS module in ``hooks`` drives, in place (all
    checked before any is replaced); returns (``root``, its adapter config, notes)."""
    converted = {name: convert_module(name, root.get_submodule(name), module)
                 for name, module in hooks.items()}
    kinds = {(type(m).__name__, int(m.lora_dim), float(m.scale) * float(m.multiplier)
              * float(m.scalar), int(getattr(m, "factor", -1))) for m in hooks.values()}
    if len(kinds) > 1:
        raise AdapterError(f"LyCORIS model: {len(kinds)} kinds of module (type, rank, scale, "
                           f"factor) {sorted(kinds)[:3]}; tenvoo_fast's AdapterConfig holds one")
    (kind, rank, scale, factor), = kinds
    for name, (new, _) in converted.items():
        layer = root.get_submodule(name)
        del layer.__dict__["forward"]          # LyCORIS's hook: the layer's own forward again
        new.weight.requires_grad_(False)
        if new.bias is not None:
            new.bias.requires_grad_(False)
        parent, _, child = name.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, child, new)
    method = {"LoConModule": "lora", "LohaModule": "loha", "LokrModule": "lokr"}[kind]
    config = AdapterConfig(method=method, rank=rank, alpha=scale * rank, lokr_factor=factor,
                           target_modules=[f"^{re.escape(n)}$" for n in converted])
    return root, config, [note for _, note in converted.values() if note]


def _probe(layer: nn.Module, new: nn.Module, module: nn.Module) -> float:
    """The largest difference between the LyCORIS-driven ``layer`` and ``new`` on a random
    input, relative to the output's largest magnitude (LyCORIS in eval mode: no dropout)."""
    weight = layer.weight
    if isinstance(layer, (nn.Conv3d, nn.Conv2d)):
        spatial = [(k - 1) * d + s + 1 for k, d, s in
                   zip(layer.kernel_size, layer.dilation, layer.stride)]
        x = torch.randn(2, layer.in_channels, *spatial, dtype=weight.dtype, device=weight.device)
    else:
        x = torch.randn(2, layer.in_features, dtype=weight.dtype, device=weight.device)
    training = module.training
    module.eval()
    try:
        with torch.no_grad():
            want, got = layer(x), new(x)
    finally:
        module.train(training)
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))
