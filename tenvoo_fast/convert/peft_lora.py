"""peft's LoRA layers to tenvoo_fast's and back.

A peft LoRA layer computes ``base(x) + s · B(A(dropout(x)))``; ``LoRAConv3d`` / ``LoRALinear``
compute ``conv/linear(x, W + s · up ×_r down)``: the same function (fp32 rounding), with
``down = A.weight`` and ``up = B.weight`` in the same shapes (``LoRAConv2d`` likewise for a
Conv2d). What tenvoo_fast cannot compute
the same way is refused with the layer's name: DoRA and peft's other LoRA variants, a LoRA bias,
several adapters on a layer, a merged or disabled adapter, and base layers other than Conv3d,
Conv2d and Linear. Dropout is not part of tenvoo_fast's layers: a converted layer trains without it (the
conversion says so).
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..errors import AdapterError
from ..methods.lora import LoRAConv2d, LoRAConv3d, LoRALinear
from ..model.config import AdapterConfig

#: The weights file of a peft adapter folder.
WEIGHTS_FILE = "adapter_model.safetensors"


def peft_root(model: nn.Module) -> nn.Module:
    """The torch model inside a ``PeftModel`` / ``LoraModel`` (``model`` itself otherwise)."""
    try:
        from peft import PeftModel
        from peft.tuners.tuners_utils import BaseTuner
    except ImportError:
        return model
    if isinstance(model, PeftModel):
        model = model.base_model
    if isinstance(model, BaseTuner):
        model = model.model
    return model


def peft_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> every peft tuner layer (LoRA or any other peft method) in ``model``."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return {}
    return {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


def convert_layer(name: str, layer: nn.Module) -> tuple[nn.Module, int, float, float]:
    """(the tenvoo_fast layer holding ``layer``'s base and trained LoRA weights, its rank, the
    alpha that gives peft's scale, peft's dropout probability)."""
    from peft.tuners.lora import LoraLayer
    if not isinstance(layer, LoraLayer):
        module = type(layer).__module__        # peft.tuners.<method>.layer
        method = module.split(".")[2] if module.startswith("peft.tuners.") else module
        raise AdapterError(f"{name}: a peft {method} layer ({module}.{type(layer).__name__}); "
                           "tenvoo_fast converts peft's LoRA layers")
    adapters = list(layer.lora_A.keys())
    if len(adapters) != 1:
        raise AdapterError(f"{name}: {len(adapters)} peft adapters {adapters}; convert a model "
                           "with one (peft's delete_adapter removes the others)")
    a = adapters[0]
    if layer.merged:
        raise AdapterError(f"{name}: peft adapter {a!r} is merged into the base weight; call "
                           "unmerge_adapter() first")
    if layer.disable_adapters:
        raise AdapterError(f"{name}: peft adapters are disabled on this layer; enable them, or "
                           "convert the model without the adapter")
    variant = layer.lora_variant.get(a) if hasattr(layer, "lora_variant") else None
    if variant is not None or layer.use_dora.get(a, False):
        kind = "DoRA" if layer.use_dora.get(a, False) else type(variant).__name__
        raise AdapterError(f"{name}: peft adapter {a!r} is a {kind} variant of LoRA, which "
                           "tenvoo_fast does not implement; merge it with peft's "
                           "merge_and_unload() to keep its update in the base weight")
    if layer.lora_bias.get(a, False):
        raise AdapterError(f"{name}: peft adapter {a!r} has a LoRA bias (lora_bias=True), "
                           "which tenvoo_fast's LoRA does not have")
    base = layer.get_base_layer()
    down, up = layer.lora_A[a].weight, layer.lora_B[a].weight
    r, scale = int(down.shape[0]), float(layer.scaling[a])
    alpha = scale * r
    if isinstance(base, (nn.Conv3d, nn.Conv2d)):
        if base.groups != 1:
            raise AdapterError(f"{name}: a grouped {type(base).__name__} (groups={base.groups}); "
                               "tenvoo_fast adapts ungrouped convs")
        cls = LoRAConv3d if isinstance(base, nn.Conv3d) else LoRAConv2d
        new = cls.from_conv(base, r, alpha, name=name)
    elif isinstance(base, nn.Linear):
        new = LoRALinear.from_linear(base, r, alpha, name=name)
    else:
        raise AdapterError(f"{name}: peft LoRA on a {type(base).__name__}; tenvoo_fast adapts "
                           "Conv3d, Conv2d and Linear layers")
    with torch.no_grad():
        new.cores[0].copy_(down.reshape(new.cores[0].shape))
        new.cores[1].copy_(up.reshape(new.cores[1].shape))
    dropout = layer.lora_dropout[a]
    p = float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0
    return new, r, alpha, p


def convert_peft(model: nn.Module) -> tuple[nn.Module, AdapterConfig, list[str]]:
    """Replace every peft LoRA layer of ``model`` (a ``PeftModel`` or what it wraps), in place,
    by a tenvoo_fast LoRA layer; returns (the torch model, its adapter config, notes). Every
    layer is checked before any is replaced."""
    root = peft_root(model)
    layers = peft_layers(root)
    _refuse_wrappers(root)
    converted = {name: convert_layer(name, layer) for name, layer in layers.items()}
    ranks = {(r, alpha) for _, r, alpha, _ in converted.values()}
    if len(ranks) > 1:
        raise AdapterError(f"peft model: layers of {len(ranks)} (rank, alpha) pairs "
                           f"{sorted(ranks)[:3]}; tenvoo_fast's AdapterConfig holds one")
    notes = []
    dropped = sorted({p for *_, p in converted.values() if p > 0})
    if dropped:
        notes.append(f"peft's LoRA dropout (p={dropped}) is not part of tenvoo_fast's layers: "
                     "the converted model trains without it (outputs in eval mode are equal)")
    for name, (new, *_) in converted.items():
        parent, _, child = name.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, child, new)
    (r, alpha), = ranks
    config = AdapterConfig(method="lora", rank=r, alpha=alpha,
                           target_modules=[f"^{re.escape(n)}$" for n in converted])
    return root, config, notes


def _refuse_wrappers(root: nn.Module) -> None:
    try:
        from peft.utils.other import ModulesToSaveWrapper
    except ImportError:
        return
    for name, m in root.named_modules():
        if isinstance(m, ModulesToSaveWrapper):
            raise AdapterError(f"{name}: a peft modules_to_save copy; set its trained copy in "
                               "place of the module (or train without modules_to_save), then "
                               "convert")


def export_peft(model: nn.Module, folder: str | os.PathLike) -> Path:
    """Write ``model``'s tenvoo_fast LoRA layers as a peft adapter folder (``adapter_config.json``
    and ``adapter_model.safetensors``) that ``PeftModel.from_pretrained(base, folder)`` loads;
    the folder appears whole or not at all."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    from ..model.inject import adapter_layers
    layers = adapter_layers(model)
    others = [n for n, m in layers.items()
              if not isinstance(m, (LoRAConv3d, LoRAConv2d, LoRALinear))]
    if not layers or others:
        raise AdapterError(f"export to peft: {'no adapter layers' if not layers else others[0]}"
                           "; peft holds LoRA layers (method 'lora')")
    ranks = {(m.network.meta["rank"], m.network.scale) for m in layers.values()}
    if len(ranks) > 1:
        raise AdapterError(f"export to peft: layers of {len(ranks)} (rank, scale) pairs; this "
                           "export writes one")
    (r, scale), = ranks
    folder = Path(folder)
    if folder.exists():
        raise AdapterError(f"export to peft: {folder} exists; choose a new folder")
    tensors = {}
    for name, m in layers.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = m.down.detach().contiguous().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = m.up.detach().contiguous().cpu()
    # A string is one regular expression peft full-matches against module names.
    config = LoraConfig(r=r, lora_alpha=scale * r, lora_dropout=0.0, bias="none",
                        target_modules="|".join(re.escape(n) for n in layers))
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.") as tmp:
        config.save_pretrained(tmp)
        save_file(tensors, os.path.join(tmp, WEIGHTS_FILE))
        os.rename(tmp, folder)
        os.makedirs(tmp)      # for TemporaryDirectory's cleanup
    return folder

