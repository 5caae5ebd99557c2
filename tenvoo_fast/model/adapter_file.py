"""Adapter files: everything that trained, the frozen copies and the configuration, in safetensors.

A file holds, for each adapted layer ``N``, its cores ``N.cores.i`` and frozen copies
``N.frozen_cores.i``; every other trainable parameter under its model name (biases, norms, or
everything for joint fine-tuning); and, as metadata, the :class:`AdapterConfig` and each
adapted layer's method and shapes, and a fingerprint of the base weights it was trained on
(with what the caller says that base was). Loading into a fresh base model injects the same
adapters and reproduces the fine-tuned outputs exactly; a file from another configuration or base
shape is refused with a message that says what differs, and a base whose weights differ from the
fingerprint is warned about (or refused). Files are written to a temporary name and renamed, so
an interrupted save never leaves a half-written file behind.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings

import torch
from torch import nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .._version import __version__
from ..errors import AdapterError, one_line
from ..files import atomic_path
from .config import AdapterConfig
from .inject import adapter_layers, get_config, inject, unwrap
from .published_checkpoint import base_differences, published_adapter, read_published

FORMAT = "tenvoo_fast.adapter"
FORMAT_VERSION = "1"
BASE_MISMATCH = ("warn", "error", "ignore")


class BaseMismatchWarning(UserWarning):
    """``load_adapter``: the model's base weights differ from the ones the adapter was trained
    on (its outputs will not be the fine-tuned model's)."""


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


#: Where :func:`~tenvoo_fast.model.fold.fold_frozen` keeps the base fingerprint before folding.
FOLDED_BASE_ATTR = "tenvoo_unfolded_fingerprint"


def _fingerprint(model, exclude) -> str | None:
    """sha256 (hex) over the name, dtype, shape and stored bytes of every tensor in the
    unwrapped model's ``state_dict`` whose name is not in ``exclude`` and that is not the same
    tensor as an excluded one (tied weights), in sorted name order, hashed on the CPU. None if
    one of them is on the meta device (no values to hash). A model whose frozen copies are
    folded into its weights (:func:`~tenvoo_fast.model.fold.fold_frozen`) answers with the
    fingerprint taken before folding, while its tensors are still the ones folding left
    (after a later load into them, the fingerprint of what they are now)."""
    model_ = unwrap(model)
    mine = _hash_state(model_, exclude)
    folded = getattr(model_, FOLDED_BASE_ATTR, None)
    if mine is None or folded is None:
        return mine
    trained = set(_trained_tensors(model_))
    now = mine if set(exclude) == trained else _hash_state(model_, trained)
    return folded[0] if folded[1] == now else mine


def current_fingerprint(model) -> str | None:
    """The fingerprint of the model's tensors as they are now (folded weights included)."""
    model_ = unwrap(model)
    return _hash_state(model_, set(_trained_tensors(model_)) if get_config(model_) else set())


def _hash_state(model_, exclude) -> str | None:
    state = {k: v for k, v in model_.state_dict(keep_vars=True).items()
             if isinstance(v, torch.Tensor)}
    skip = {id(state[k]) for k in exclude if k in state}
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        if name in exclude or id(t) in skip:
            continue
        if t.device.type == "meta":
            return None
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}\0{str(t.dtype)}\0{list(state[name].shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()


def base_fingerprint(model) -> str:
    """A hex sha256 of the base weights the adapter of ``model`` is trained on: every parameter
    and buffer of the (unwrapped) model except what :func:`save_adapter` stores (cores, frozen
    copies, trained parameters), by name, dtype, shape and bytes. A model without adapters is
    hashed whole. :func:`save_adapter` records it; :func:`load_adapter` compares it."""
    fingerprint = _fingerprint(model, set(_trained_tensors(model)) if get_config(model) else set())
    if fingerprint is None:
        raise AdapterError("base_fingerprint: the model has tensors on the meta device, which "
                           "hold no values; materialise it (to_empty + load its weights) first")
    return fingerprint


def _check_save_path(path) -> str:
    """``path`` as a string, or :class:`AdapterError` if no file can be written there (a
    folder, a path under a file, a folder that cannot be written), before any work."""
    given = os.fspath(path)
    example = os.path.join(given, "adapter.safetensors")
    if given.endswith(tuple(sep for sep in (os.sep, os.altsep) if sep)) or os.path.isdir(given):
        raise AdapterError(f"save_adapter: {given} is a folder; give a file path such as "
                           f"{example}")
    folder = os.path.dirname(os.path.abspath(given))
    existing = folder
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise AdapterError(f"save_adapter: cannot write {given}: {existing} is a file, not a "
                           "folder; give a path in a folder, such as "
                           f"{os.path.join(os.path.dirname(existing), 'adapter.safetensors')}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise AdapterError(f"save_adapter: cannot write {given}: no write permission in the "
                           f"folder {existing}; choose a folder you can write to, or change its "
                           "permissions")
    return given


def save_adapter(model, path: str | os.PathLike, *, base_origin: dict | None = None) -> None:
    """Write the adapter of ``model`` (injected with :func:`inject`) to ``path`` atomically.

    The file also records :func:`base_fingerprint` of the base weights and ``base_origin``, a
    JSON-serialisable dict saying what that base is (e.g. ``{"preset": "tiny", "seed": 0,
    "base_weights": None}``), which :func:`load_adapter`'s base-mismatch message repeats.
    """
    config = get_config(model)
    if config is None:
        raise AdapterError("save_adapter: this model has no adapters; call inject(model, config) "
                           "first")
    given = _check_save_path(path)
    if base_origin is not None and not isinstance(base_origin, dict):
        raise AdapterError(f"save_adapter: base_origin must be a dict or None, got "
                           f"{type(base_origin).__name__}")
    try:
        origin = json.dumps(base_origin)
    except (TypeError, ValueError) as e:
        raise AdapterError(f"save_adapter: base_origin is not JSON-serialisable ({e}); pass "
                           "plain strings, numbers, lists and dicts") from e
    layers = adapter_layers(model)
    trained = _trained_tensors(model)
    tensors = {k: v.contiguous().cpu().clone() for k, v in trained.items()}
    metadata = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "tenvoo_fast_version": __version__,
        "config": json.dumps(config.to_dict()),
        "layers": json.dumps({n: _layer_signature(m) for n, m in layers.items()}),
        "skipped": json.dumps(getattr(unwrap(model), "tenvoo_skipped", [])),
        "base_origin": origin,
    }
    fingerprint = _fingerprint(model, set(trained))
    if fingerprint is not None:
        metadata["base_fingerprint"] = fingerprint
    try:
        with atomic_path(given) as tmp:
            save_file(tensors, tmp, metadata=metadata)
    except (OSError, SafetensorError) as e:   # e.g. a full disk, or a read-only file system
        raise AdapterError(f"save_adapter: cannot write {given} ({one_line(e)}); choose a "
                           "folder you can write to") from e


def _read_metadata(path) -> dict:
    """The metadata of the tenvoo_fast adapter file ``path``, or a clear AdapterError."""
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
    return meta


def read_adapter_metadata(path) -> tuple[AdapterConfig, dict]:
    """The configuration and per-layer signatures stored in an adapter file."""
    meta = _read_metadata(path)
    return AdapterConfig.from_dict(json.loads(meta["config"])), json.loads(meta["layers"])


def read_adapter_base(path) -> dict:
    """What an adapter file says about its base: ``{"fingerprint": str | None, "origin": dict |
    None}`` (both None for files written before they were recorded)."""
    meta = _read_metadata(path)
    try:
        origin = json.loads(meta["base_origin"]) if "base_origin" in meta else None
    except ValueError as e:
        raise AdapterError(f"{os.fspath(path)}: its base_origin metadata is not JSON ({e}); "
                           "the file is damaged") from e
    return {"fingerprint": meta.get("base_fingerprint"),
            "origin": origin if isinstance(origin, dict) else None}


def _check_base(model, path, exclude, mode: str) -> None:
    """Compare the model's base (every tensor but the file's ``exclude`` keys, before they are
    copied in) with the file's fingerprint; warn or raise per ``mode``."""
    if mode == "ignore":
        return
    base = read_adapter_base(path)
    if base["fingerprint"] is None:
        return   # a file from before fingerprints: nothing to compare
    mine = _fingerprint(model, exclude)
    if mine is None or mine == base["fingerprint"]:
        return
    origin = json.dumps(base["origin"]) if base["origin"] else "not recorded"
    _mismatch([], f"{os.fspath(path)}: this model's base weights differ from the ones the "
                  f"adapter was trained on (the file's base: {origin}; fingerprint "
                  f"{base['fingerprint'][:12]}, this model's {mine[:12]})", mode, force=True,
              stacklevel=_stacklevel())


def _mismatch(differences: list[str], message: str, mode: str, *, stacklevel: int,
              force: bool = False) -> None:
    """Warn (``mode="warn"``) or raise (``"error"``) that the base differs: ``message`` and
    ``differences``, when there are any (or ``force``); the warning points ``stacklevel``
    frames up (at ``load_adapter``'s caller)."""
    if mode == "ignore" or not (differences or force):
        return
    if differences:
        message += f" ({'; '.join(differences)})"
    message += ", so its outputs will not be the fine-tuned model's; load it into that base"
    if mode == "error":
        raise AdapterError(f"{message}, or pass base_mismatch='ignore' to load it anyway")
    warnings.warn(BaseMismatchWarning(f"{message}, or pass base_mismatch='error' to make this an "
                                      "error ('ignore' to silence it)"), stacklevel=stacklevel)


def load_adapter(model, path: str | os.PathLike, *, base_mismatch: str = "warn"):
    """Load an adapter file into ``model`` and return the model.

    A plain base model is injected with the file's configuration first; an already adapted
    model must have been injected with the same configuration. Every adapted layer must exist
    with the same shapes, and every saved parameter must exist in the model with the same shape.
    If the file records a base fingerprint and the model's base weights differ from it,
    ``base_mismatch`` says what happens: ``"warn"`` (a :class:`BaseMismatchWarning`),
    ``"error"`` (:class:`AdapterError`) or ``"ignore"``. Files without one load silently.

    A checkpoint of the published TenVOO code (a torch file: a full state dict, whose base is
    compared with the model's in the same way, or a ``save_peft`` file, whose missing biases and
    norms are warned about) loads too (:mod:`.published_checkpoint`).
    """
    if base_mismatch not in BASE_MISMATCH:
        raise AdapterError(f"load_adapter: base_mismatch must be one of {list(BASE_MISMATCH)}, "
                           f"got {base_mismatch!r}")
    where = os.fspath(path)
    state = None if not os.path.isfile(where) or _is_safetensors(where) else read_published(where)
    if state is not None:
        return load_published(model, state, where, base_mismatch=base_mismatch)
    config, saved_layers = read_adapter_metadata(path)
    return _load(model, config, saved_layers, load_file(where), where,
                 lambda exclude: _check_base(model, path, exclude, base_mismatch))


def load_published(model, state: dict, where: str = "published checkpoint", *,
                   base_mismatch: str = "warn"):
    """Load a published TenVOO checkpoint's ``state`` (a state dict read from ``where``) into
    ``model``, as :func:`load_adapter` loads such a file (:mod:`.published_checkpoint`)."""
    if base_mismatch not in BASE_MISMATCH:
        raise AdapterError(f"load_published: base_mismatch must be one of "
                           f"{list(BASE_MISMATCH)}, got {base_mismatch!r}")
    config, tensors, base = published_adapter(unwrap(model), state, where)

    def check(exclude):
        if base is not None and base_mismatch != "ignore":
            _mismatch(base_differences(unwrap(model), base, exclude),
                      f"{where}: this model's base weights differ from the base in this "
                      "published checkpoint", base_mismatch, stacklevel=_stacklevel())
    return _load(model, config, None, tensors, where, check)


def _stacklevel() -> int:
    """Frames from :func:`_mismatch`'s warning up to the first caller outside this module (the
    user's call of load_adapter / load_published)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        frame, level = frame.f_back, level + 1
    return level + 1


def _is_safetensors(path: str) -> bool:
    try:
        with safe_open(path, framework="pt"):
            return True
    except Exception:
        return False


def _load(model, config: AdapterConfig, saved_layers: dict | None, tensors: dict, where: str,
          check_base) -> nn.Module:
    """Inject ``config`` (or check the model's), check the layers against ``saved_layers``
    (their signatures; None: not checked, the tensors' names and shapes still are), call
    ``check_base(keys loaded)``, then copy ``tensors`` in."""
    folded = [n for n, m in adapter_layers(model).items() if m.frozen_folded]
    if folded:
        raise AdapterError(f"{where}: {folded[0]} (and {len(folded) - 1} more) has its "
                           "frozen copy folded into the base weight (fold_frozen), so another "
                           "adapter's frozen copy cannot replace it; load the file into an "
                           "unfolded model, then fold")
    current = get_config(model)
    if current is None:
        inject(model, config)
    elif current.to_dict() != config.to_dict():
        a, b = current.to_dict(), config.to_dict()
        diff = {k: (a[k], b[k]) for k in a if a[k] != b[k]}
        raise AdapterError(f"{where} was saved with a different adapter configuration; "
                           f"differences (model, file): {diff}. Load it into a fresh base model, "
                           "or inject the file's configuration")
    layers = adapter_layers(model)
    if saved_layers is not None:
        missing = sorted(set(saved_layers) - set(layers))
        extra = sorted(set(layers) - set(saved_layers))
        if missing or extra:
            raise AdapterError(f"{where} does not fit this model: adapted layers only in the "
                               f"file: {missing[:5]}, only in the model: {extra[:5]}; load it "
                               "into the base architecture it was trained on")
        for name, layer in layers.items():
            mine, theirs = _layer_signature(layer), saved_layers[name]
            if mine != theirs:
                raise AdapterError(f"{name}: the file's adapter was trained on a layer with "
                                   f"{theirs}, but this model's layer has {mine}; load it into "
                                   "the base architecture it was trained on")
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
                raise AdapterError(f"{where} holds '{key}', which this model does not "
                                   "have; load it into the base architecture it was trained on")
            targets[key] = params[key]
    missing = [k for k in targets if k not in tensors]
    if missing:
        raise AdapterError(f"{where} lacks {missing[:5]}; the file is incomplete")
    for key, dst in targets.items():
        src = tensors[key]
        if tuple(src.shape) != tuple(dst.shape):
            raise AdapterError(f"'{key}': the file has shape {list(src.shape)}, the model "
                               f"{list(dst.shape)}; load it into the base it was trained on")
    check_base(set(tensors))
    with torch.no_grad():
        for key, dst in targets.items():
            dst.copy_(tensors[key].to(device=dst.device, dtype=dst.dtype))
            if key in params:
                dst.requires_grad_(True)
    return model
