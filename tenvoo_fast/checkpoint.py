"""Adapter files: everything that trained, the frozen copies and the configuration, in safetensors.

A file holds, for each adapted layer ``N``, its cores ``N.cores.i`` and frozen copies
``N.frozen_cores.i``; every other trainable parameter under its model name (biases, norms, or
everything for joint fine-tuning); and, as metadata, the :class:`AdapterConfig` and each
adapted layer's method and shapes. Loading into a fresh base model injects the same adapters and
reproduces the fine-tuned outputs exactly; a file from another configuration or base shape is
refused with a message that says what differs. Files are written to a temporary name and renamed,
so an interrupted save never leaves a half-written file behind.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ._version import __version__
from .config import AdapterConfig
from .errors import AdapterError
from .io import atomic_path
from .model import adapter_layers, get_config, inject, unwrap

FORMAT = "tenvoo_fast.adapter"
FORMAT_VERSION = "1"


def _layer_signature(layer) -> dict:
    return {"class": type(layer).__name__, "method": layer.network.method,
            "weight_shape": list(layer.weight.shape),
            "core_shapes": [list(c.shape) for c in layer.network.cores]}


def _trained_tensors(model) -> dict[str, torch.Tensor]:
    layers = adapter_layers(model)
    tensors = {}
    core_ids = set()
    for name, layer in layers.items():
        for i, p in enumerate(layer.cores):
            tensors[f"{name}.cores.{i}"] = p.detach()
            core_ids.add(id(p))
        if layer.frozen_cores is not None:
            for i, t in enumerate(layer.frozen_cores):
                tensors[f"{name}.frozen_cores.{i}"] = t.detach()
    for name, p in unwrap(model).named_parameters():
        if p.requires_grad and id(p) not in core_ids:
            tensors[name] = p.detach()
    return tensors


def save_adapter(model, path: str | os.PathLike) -> None:
    """Write the adapter of ``model`` (injected with :func:`inject`) to ``path`` atomically."""
    config = get_config(model)
    if config is None:
        raise AdapterError("save_adapter: this model has no adapters; call inject(model, config) "
                           "first")
    layers = adapter_layers(model)
    tensors = {k: v.contiguous().cpu().clone() for k, v in _trained_tensors(model).items()}
    metadata = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "tenvoo_fast_version": __version__,
        "config": json.dumps(config.to_dict()),
        "layers": json.dumps({n: _layer_signature(m) for n, m in layers.items()}),
        "skipped": json.dumps(getattr(unwrap(model), "tenvoo_skipped", [])),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def read_adapter_metadata(path) -> tuple[AdapterConfig, dict]:
    """The configuration and per-layer signatures stored in an adapter file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise AdapterError(f"adapter file {path} does not exist")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise AdapterError(f"{path} is not a readable safetensors file: {e}") from e
    if meta.get("format") != FORMAT:
        raise AdapterError(f"{path} is not a tenvoo_fast adapter file (no '{FORMAT}' metadata)")
    return AdapterConfig.from_dict(json.loads(meta["config"])), json.loads(meta["layers"])


def load_adapter(model, path: str | os.PathLike):
    """Load an adapter file into ``model`` and return the model.

    A plain base model is injected with the file's configuration first; an already adapted
    model must have been injected with the same configuration. Every adapted layer must exist
    with the same shapes, and every saved parameter must exist in the model with the same shape.
    """
    config, saved_layers = read_adapter_metadata(path)
    current = get_config(model)
    if current is None:
        inject(model, config)
    elif current.to_dict() != config.to_dict():
        a, b = current.to_dict(), config.to_dict()
        diff = {k: (a[k], b[k]) for k in a if a[k] != b[k]}
        raise AdapterError(f"{os.fspath(path)} was saved with a different adapter configuration; "
                           f"differences (model, file): {diff}. Load it into a fresh base model, "
                           "or inject the file's configuration")
    layers = adapter_layers(model)
    missing = sorted(set(saved_layers) - set(layers))
    extra = sorted(set(layers) - set(saved_layers))
    if missing or extra:
        raise AdapterError(f"{os.fspath(path)} does not fit this model: adapted layers only in the "
                           f"file: {missing[:5]}, only in the model: {extra[:5]}; load it into the "
                           "base architecture it was trained on")
    for name, layer in layers.items():
        mine, theirs = _layer_signature(layer), saved_layers[name]
        if mine != theirs:
            raise AdapterError(f"{name}: the file's adapter was trained on a layer with "
                               f"{theirs}, but this model's layer has {mine}; load it into the "
                               "base architecture it was trained on")
    tensors = load_file(os.fspath(path))
    params = dict(unwrap(model).named_parameters())
    targets = {}
    for name, layer in layers.items():
        for i, p in enumerate(layer.cores):
            targets[f"{name}.cores.{i}"] = p
        if layer.frozen_cores is not None:
            for i, t in enumerate(layer.frozen_cores):
                targets[f"{name}.frozen_cores.{i}"] = t
    for key in tensors:
        if key not in targets:
            if key not in params:
                raise AdapterError(f"{os.fspath(path)} holds '{key}', which this model does not "
                                   "have; load it into the base architecture it was trained on")
            targets[key] = params[key]
    missing = [k for k in targets if k not in tensors]
    if missing:
        raise AdapterError(f"{os.fspath(path)} lacks {missing[:5]}; the file is incomplete")
    for key, dst in targets.items():
        src = tensors[key]
        if tuple(src.shape) != tuple(dst.shape):
            raise AdapterError(f"'{key}': the file has shape {list(src.shape)}, the model "
                               f"{list(dst.shape)}; load it into the base it was trained on")
    with torch.no_grad():
        for key, dst in targets.items():
            dst.copy_(tensors[key].to(device=dst.device, dtype=dst.dtype))
            if key in params:
                dst.requires_grad_(True)
    return model
