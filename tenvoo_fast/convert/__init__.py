"""Drop-in conversion: the adapter layers a model got from another library replaced, in place,
by tenvoo_fast's layers holding the same trained weights (the same function, to fp32 rounding),
and back.

- :func:`convert`: peft LoRA on Conv3d, Conv2d and Linear (rsLoRA's scale included), LyCORIS's
  LoCon, LoHa and LoKr modules (hooked into the layers by its ``apply_to``), and the published
  TenVOO code's Conv3d (TenVOO-L/Q) and Linear (QuanTA) layers;
- :func:`~tenvoo_fast.model.load_published` (and :func:`~tenvoo_fast.load_adapter` given its
  file): a published TenVOO checkpoint (a full state dict, or a ``save_peft`` file) into a
  model;
- :func:`export_peft`: tenvoo_fast LoRA layers as a peft adapter folder.

Adapters of any other kind in the model (another library's module hooked into a layer's
forward, peft's other methods) are named in an error, never dropped.
"""
from __future__ import annotations

import warnings

from torch import nn

from ..errors import AdapterError
from ..model.inject import _CONFIG_ATTR, adapter_layers
from .lycoris_modules import convert_lycoris, hooked_forwards, is_lycoris, lycoris_hooks
from .peft_lora import convert_peft, export_peft, peft_layers, peft_root
from .published_tenvoo import convert_published, published_modules

__all__ = ["convert", "export_peft"]


def convert(model: nn.Module) -> nn.Module:
    """Replace every foreign adapter layer of ``model`` (a peft ``PeftModel`` or the torch model
    inside it, a model LyCORIS's network was applied to, or one adapted by the published TenVOO
    code) by a tenvoo_fast layer holding its
    trained weights, in place; returns the torch model, ready for ``save_adapter``, the fast
    backends and further training. What the converted model does differently (a dropout) is
    said as a warning."""
    root = peft_root(model)
    if adapter_layers(root):
        raise AdapterError("convert: the model already has tenvoo_fast adapters "
                           f"(e.g. {next(iter(adapter_layers(root)))})")
    foreign = _foreign_hooks(root)
    if foreign:
        name, kind = foreign[0]
        raise AdapterError(f"convert: {name} runs a {kind}'s forward, an adapter kind "
                           f"tenvoo_fast does not convert yet ({len(foreign)} such layers)")
    lycoris, published = lycoris_hooks(root), published_modules(root)
    sources = [s for s, found in (("peft", peft_layers(root)), ("LyCORIS", lycoris),
                                  ("published TenVOO", published)) if found]
    if len(sources) > 1:
        raise AdapterError(f"convert: the model has {' and '.join(sources)} adapters; convert "
                           "a model adapted by one of them")
    if published:
        root, config, notes = convert_published(root, published)
    elif lycoris:
        root, config, notes = convert_lycoris(root, lycoris)
    elif peft_layers(root):
        root, config, notes = convert_peft(root)
    else:
        raise AdapterError("convert: no adapter layers found (peft LoRA layers, LyCORIS "
                           "LoCon/LoHa/LoKr modules and the published TenVOO layers are "
                           f"converted; the model is a {type(root).__name__})")
    setattr(root, _CONFIG_ATTR, config)
    root.tenvoo_skipped = []
    for note in notes:
        warnings.warn(f"convert: {note}", stacklevel=2)
    return root


def _foreign_hooks(root: nn.Module) -> list[tuple[str, str]]:
    """Layers whose forward another library's module has taken over (LyCORIS's ``apply_to``
    replaces the original layer's ``forward``) other than LyCORIS's."""
    return [(name or type(root).__name__, f"{type(owner).__module__}.{type(owner).__name__}")
            for name, owner in hooked_forwards(root).items() if not is_lycoris(owner)]
