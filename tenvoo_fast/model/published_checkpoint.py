"""Checkpoints of the published TenVOO code, read as tenvoo_fast adapters.

The authors' code keeps, for an adapted layer ``P``: the cores ``P.tenvoo_weights.{0..9}`` (a
Linear layer's QuanTA gates ``P.quanta_weights.{'-1 -2', '-1 -3', '-2 -3'}``) in the order and
shapes of adapters.md, their frozen copy under ``tenvoo_weights2`` / ``quanta_weights2``, and
two flags saved as buffers, ``P.frozen_merged.merged`` and ``P.merged.merged``. The first
forward folds the frozen copy into the weight (saved ``weight`` = W - T(θ0) once
``frozen_merged`` is set) and eval mode also merges the cores (+ T(θ) while ``merged`` is set).
So the base weight W is the saved one with both folds undone, in fp64: exact but for the fp32
rounding of the saved difference (an ulp of T(θ0)), or taken from the base checkpoint instead.

Everything else is read from shapes: the variant from core 9 (3-D: L, 4-D: Q), the rank from
core 7, the channel factors from cores 0, 1, 5 and 6 (from the gates for QuanTA). A wrapper's
``model.`` prefix and MONAI Generative's old module names are mapped to the model's names.
A full state dict (``torch.save(model.state_dict())``) also holds the base and what trained
besides the cores (the adapted layers' biases, the norms): ``load_published`` compares its
base with the model's and loads the rest. A ``save_peft`` file holds only cores and frozen
copies: loading one says which trained tensors it lacks. The published layers themselves, in a
live model, are converted by :mod:`tenvoo_fast.convert.published_tenvoo`.
"""
from __future__ import annotations

import os
import pickle
import re
import warnings
from dataclasses import dataclass, replace
from typing import Iterable, Mapping, Optional

import torch
from torch import nn

from ..contraction import reference
from ..contraction.network import TensorNetwork
from ..errors import AdapterError
from ..methods.channels import default_factors
from ..methods.quanta import quanta
from ..methods.tenvoo import tenvoo
from .config import AdapterConfig

#: QuanTA's axis pairs in gate order, as the published code names its gates.
GATE_KEYS = ("-1 -2", "-1 -3", "-2 -3")
#: What the published training trains besides the cores (its default, and adapters.md §6's).
PUBLISHED_TRAINABLE = ("bias", "norm")

_TENSOR = re.compile(r"^(?P<layer>.+)\.(?P<group>tenvoo_weights2?|quanta_weights2?)\."
                     r"(?P<index>[^.]+)$")
_FLAG = re.compile(r"^(?P<layer>.+)\.(?P<flag>merged|frozen_merged)\.merged$")
#: Prefixes the published wrappers add to module names.
_PREFIXES = ("", "model.", "base_model.model.", "module.")


@dataclass
class PublishedLayer:
    """One published adapted layer as saved: cores (gates) and frozen copies in spec order, the
    weight with its folds, the bias and the two fold flags (None when not saved)."""
    name: str
    cores: list
    frozen: Optional[list]
    weight: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    frozen_merged: Optional[bool] = None
    merged: Optional[bool] = None

    @property
    def is_conv(self) -> bool:
        return len(self.cores) == 10

    def network(self) -> TensorNetwork:
        """The tenvoo_fast network these cores are the tensors of (shapes checked)."""
        c = [tuple(t.shape) for t in self.cores]
        try:
            if self.is_conv:
                (i2, i1), i3, o3 = c[0][:2], c[1][0], c[5][0]
                o2, o1, r = c[6][0], c[6][3], c[7][0]
                variant = "L" if len(c[9]) == 3 else "Q"
                net = tenvoo(variant, (i1, i2, i3), (o1, o2, o3), (c[2][0], c[3][0], c[4][0]),
                             r, layer=self.name)
            else:
                net = quanta(*_gate_factors(c), layer=self.name)
        except (IndexError, ValueError, AdapterError):
            net = None
        if net is None or [tuple(k.shape) for k in net.cores] != c:
            kind = "TenVOO cores" if self.is_conv else "QuanTA gates"
            raise AdapterError(f"{self.name}: its {kind} have shapes {c}, which are not a "
                               "TenVOO-L/Q network's (adapters.md §3-4); the checkpoint is "
                               "not from the published TenVOO code, or is damaged")
        return net

    @torch.no_grad()
    def base_weight(self, network: TensorNetwork) -> torch.Tensor:
        """W: the saved weight with the published folds undone in fp64, in the weight's dtype.
        Off by the roundings of the saved sums and of the published code's own fp32 ΔW (a few
        ulps of T(θ0), which is about 1-10 where W is about 0.01-0.1)."""
        if self.weight is None or self.frozen_merged is None or self.merged is None:
            raise AdapterError(f"{self.name}: the checkpoint lacks its weight or its merge "
                               "flags (frozen_merged.merged, merged.merged); give the base "
                               "weights it was trained on")
        if tuple(network.weight_shape) != tuple(self.weight.shape):
            raise AdapterError(f"{self.name}: its published cores build a "
                               f"{list(network.weight_shape)} update for a "
                               f"{list(self.weight.shape)} weight; tenvoo_fast needs factors "
                               "whose products are the channel counts (the published code "
                               "zero-pads others)")
        w = self.weight.to(torch.float64)
        if self.frozen_merged:
            if self.frozen is None:
                raise AdapterError(f"{self.name}: its frozen copy is folded into the weight, "
                                   "but the checkpoint lacks the copy (tenvoo_weights2)")
            w = w + _delta(network, self.frozen)
        if self.merged:
            w = w - _delta(network, self.cores)
        return w.to(self.weight.dtype)


def _gate_factors(shapes) -> tuple:
    """(in factors, out factors, rank) of QuanTA gates: equal factors (n2, n3, n2, n3), ...
    or the rank-r shapes (r, r, n2, n3), (r, m3, n1, r), (m1, m2, r, r)."""
    g0, g1, g2 = shapes
    if g0[:2] == g0[2:] and g1[:2] == g1[2:] and g2[:2] == g2[2:]:
        n = (g1[0], g0[0], g0[1])
        return n, n, 1
    r, (n2, n3), (m3, n1), (m1, m2) = g0[0], g0[2:], g1[1:3], g2[:2]
    return (n1, n2, n3), (m1, m2, m3), r


def _delta(network: TensorNetwork, tensors) -> torch.Tensor:
    return reference.delta_weight(network, [t.detach().to(torch.float64) for t in tensors])


def is_published(state: Mapping) -> bool:
    return any(_TENSOR.match(k) for k in state)


def published_layers(state: Mapping[str, torch.Tensor]) -> dict[str, PublishedLayer]:
    """Name -> :class:`PublishedLayer` for every published adapted layer in ``state``."""
    tensors: dict[str, dict] = {}
    for key, t in state.items():
        m = _TENSOR.match(key)
        if m:
            tensors.setdefault(m["layer"], {}).setdefault(m["group"], {})[m["index"]] = t
    flags: dict[str, dict] = {}
    for key, t in state.items():
        m = _FLAG.match(key)
        if m:
            flags.setdefault(m["layer"], {})[m["flag"]] = bool(t.item())
    layers = {}
    for name, groups in tensors.items():
        group = "tenvoo_weights" if "tenvoo_weights" in groups else "quanta_weights"
        keys = [str(i) for i in range(10)] if group == "tenvoo_weights" else list(GATE_KEYS)
        for part in (group, group + "2"):
            if part in groups and set(groups[part]) != set(keys):
                raise AdapterError(f"{name}: published {part} {sorted(groups[part])}, expected "
                                   f"{keys}; the checkpoint is incomplete")
        if group not in groups:
            raise AdapterError(f"{name}: the checkpoint has its {group}2 but not its {group}; "
                               "it is incomplete")
        frozen = groups.get(group + "2")
        layer_flags = flags.get(name, {})
        layers[name] = PublishedLayer(
            name, [groups[group][k] for k in keys],
            None if frozen is None else [frozen[k] for k in keys],
            state.get(f"{name}.weight"), state.get(f"{name}.bias"),
            layer_flags.get("frozen_merged"), layer_flags.get("merged"))
    return layers


def published_state_keys(state: Mapping) -> set[str]:
    """The keys of ``state`` that belong to the published adapters: cores, copies and every
    merge flag."""
    return {k for k in state if _TENSOR.match(k) or _FLAG.match(k)}


def name_map(names: Iterable[str], own: Mapping[str, object]) -> dict[str, str]:
    """Published name -> the name in ``own`` (a model's module or state-dict names): the
    wrapper's prefix removed (the one that resolves the most names), MONAI Generative's old
    names (``X.to_q`` for ``X.attn.to_q``, ``upsampler.conv`` for ``upsampler.postconv``)
    renamed. Names that resolve to nothing are left out."""
    names = list(names)

    def resolve(name, prefix):
        if not name.startswith(prefix):
            return None
        name = name[len(prefix):]
        for candidate in (name, re.sub(r"\.to_([qkv])(\.|$)", r".attn.to_\1\2", name),
                          name.replace(".upsampler.conv", ".upsampler.postconv")):
            if candidate in own:
                return candidate
        return None

    best = max(_PREFIXES, key=lambda p: sum(resolve(n, p) is not None for n in names))
    return {n: resolve(n, best) for n in names if resolve(n, best) is not None}


def layer_config(layers: Mapping[str, PublishedLayer], modules: Mapping[str, nn.Module],
                 trainable=PUBLISHED_TRAINABLE) -> AdapterConfig:
    """The :class:`AdapterConfig` that injects ``layers`` (by the model's names) as the
    published code had them: its variant and rank, per-layer factors where they are not the
    table's, the frozen-copy initialisation, ``trainable`` besides the cores."""
    convs = {n: l.network() for n, l in layers.items() if l.is_conv}
    gates = {n: l.network() for n, l in layers.items() if not l.is_conv}
    variants = {net.meta["variant"] for net in convs.values()}
    ranks = {net.meta["rank"] for net in convs.values()} | {
        net.meta["rank"] for net in gates.values() if not net.meta["equal"]}
    if len(variants) > 1 or len(ranks) > 1:
        raise AdapterError(f"published checkpoint: layers of variants {sorted(variants)} and "
                           f"ranks {sorted(ranks)}; tenvoo_fast's AdapterConfig holds one of each")
    factors = {}
    for name, net in {**convs, **gates}.items():
        own = (net.meta["in_factors"], net.meta["out_factors"])
        layer = modules[name]
        if tuple(net.weight_shape) != tuple(layer.weight.shape):
            raise AdapterError(f"{name}: its published cores build a {list(net.weight_shape)} "
                               f"update (factors {own}) for a {list(layer.weight.shape)} weight; "
                               "tenvoo_fast needs factors whose products are the channel counts "
                               "(the published code zero-pads others)")
        sizes = ((layer.in_channels, layer.out_channels) if isinstance(layer, nn.Conv3d)
                 else (layer.in_features, layer.out_features))
        if own != tuple(default_factors(c) for c in sizes):
            factors[name] = own
    single = any(1 in (m.in_channels, m.out_channels) for n, m in modules.items()
                 if n in convs)
    return AdapterConfig(method=f"tenvoo-{(variants or {'L'}).pop().lower()}",
                         rank=(ranks or {4}).pop(),
                         target_modules=[f"^{re.escape(n)}$" for n in layers],
                         trainable=trainable, factors={"layers": factors} if factors else None,
                         skip_single_channel=not single)


def adapter_tensors(layers: Mapping[str, PublishedLayer]) -> dict[str, torch.Tensor]:
    """Cores and frozen copies under tenvoo_fast's adapter-file names."""
    tensors = {}
    for name, layer in layers.items():
        if layer.frozen is None:
            raise AdapterError(f"{name}: the checkpoint lacks its frozen copy (tenvoo_weights2 "
                               "or quanta_weights2), which the published layers always keep")
        for i, (core, copy) in enumerate(zip(layer.cores, layer.frozen)):
            tensors[f"{name}.cores.{i}"] = core
            tensors[f"{name}.frozen_cores.{i}"] = copy
    return tensors




class IncompleteAdapterWarning(UserWarning):
    """``load_adapter``: the file lacks tensors that trained (a published ``save_peft`` file
    has no biases or norms); the model keeps its own values for them."""


#: Base tensors saved as they are compare equal within this (absolute and relative).
BASE_TOL = 1e-6
#: Unfolded weights compare equal within this relative (Frobenius) distance plus this RMS: their
#: fp32 folds leave about 1e-6 (a few ulps of T(θ0)); another base's weights differ by about
#: their own size (1e-2 to 1e-1).
UNFOLDED_RTOL, UNFOLDED_RMS = 1e-3, 1e-5


def read_published(path) -> Optional[dict]:
    """The state dict in the torch file ``path`` if it holds published TenVOO adapters (under
    ``"state_dict"`` or ``"model"`` too), else None (also for files torch cannot read). A torch
    file that holds objects other than tensors is an :class:`AdapterError` saying what to do."""
    try:
        state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):
            return None                   # not a torch file
        raise AdapterError(f"{os.fspath(path)}: a torch file holding objects other than "
                           "tensors, which load_adapter does not unpickle (weights_only); if "
                           "you trust it, torch.load it yourself and pass its state dict to "
                           "tenvoo_fast.model.load_published") from e
    except Exception:
        return None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not is_published(state):
        return None
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def published_adapter(model: nn.Module, state: Mapping[str, torch.Tensor], where: str
                      ) -> tuple[AdapterConfig, dict, Optional[dict]]:
    """(config, tensors under adapter-file names, the base or None) of the published checkpoint
    ``state`` for ``model`` (unwrapped; plain or injected). The base, a full state dict's, is
    (every tensor but what trained, with the adapted weights' folds undone; the names of those);
    None for a ``save_peft`` file, whose missing trained tensors are warned about."""
    layers = published_layers(state)
    modules = dict(model.named_modules())
    names = name_map(layers, modules)
    unknown = [n for n in layers if n not in names]
    if unknown:
        raise AdapterError(f"{where}: its adapted layer {unknown[0]} ({len(unknown)} of "
                           f"{len(layers)}) is not a module of this {type(model).__name__}; "
                           "load it into the architecture it was trained on")
    layers = {names[n]: replace(layer, name=names[n]) for n, layer in layers.items()}
    config = layer_config(layers, modules)
    tensors = adapter_tensors(layers)
    own = model.state_dict()
    rest_keys = [k for k in state if k not in published_state_keys(state)]
    full = all(layer.weight is not None for layer in layers.values())
    trained = [f"{n}.bias" for n, m in modules.items() if n in layers and m.bias is not None] + [
        n for n, _ in model.named_parameters() if "norm" in n and n not in tensors]
    if not full:
        if trained:
            warnings.warn(IncompleteAdapterWarning(
                f"{where}: a published save_peft file: it holds the cores of {len(layers)} "
                f"layers but not the {len(trained)} tensors the published training also "
                f"trains (the adapted layers' biases and the norms, e.g. {trained[0]}); they "
                "keep this model's values, so its outputs are the fine-tuned model's only if "
                "those did not train; load the full state dict (torch.save(model."
                "state_dict())) to have them"), stacklevel=3)
        return config, tensors, None
    keymap = name_map(rest_keys, own)
    stray = [k for k in rest_keys if k not in keymap
             and not k.endswith(("proj_attn.weight", "proj_attn.bias"))]
    if stray:
        raise AdapterError(f"{where}: {len(stray)} of its tensors are not in this "
                           f"{type(model).__name__} (e.g. {stray[0]}); load it into the "
                           "architecture it was trained on")
    rest = {keymap[k]: state[k] for k in rest_keys if k in keymap}
    for key in trained:
        if key in rest:
            tensors[key] = rest.pop(key)
    unfolded = set()
    for name, layer in layers.items():
        rest[f"{name}.weight"] = layer.base_weight(layer.network())
        unfolded.add(f"{name}.weight")
    return config, tensors, (rest, unfolded)


def published_base(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model a full published state dict holds, without its adapters: every tensor but the
    cores, copies and flags, each adapted weight with its folds undone, under the wrapped
    model's names (the wrapper's prefix removed). Its biases and norms are the fine-tuned ones
    (the original base's are not in the checkpoint)."""
    layers = published_layers(state)
    adapter = published_state_keys(state)
    base = {k: v for k, v in state.items() if k not in adapter}
    for name, layer in layers.items():
        base[f"{name}.weight"] = layer.base_weight(layer.network())
    prefix = next((p for p in _PREFIXES[1:] if all(k.startswith(p) for k in base)), "")
    return {k[len(prefix):]: v for k, v in base.items()}


def base_differences(model: nn.Module, base: tuple[Mapping, set], adapter_keys) -> list[str]:
    """Sentences saying where ``model``'s base differs from ``base`` (:func:`published_adapter`'s),
    empty if it does not: tensors saved as they are within :data:`BASE_TOL`, unfolded weights
    within :data:`UNFOLDED_RTOL` and :data:`UNFOLDED_RMS`."""
    base, unfolded = base
    own = {k: v for k, v in model.state_dict().items() if k not in adapter_keys
           and ".cores." not in k and ".frozen_cores." not in k}
    out = []
    absent = [k for k in own if k not in base]
    if absent:
        out.append(f"{len(absent)} of this model's tensors are not in it (e.g. {absent[0]})")

    def differs(k, v):
        if tuple(v.shape) != tuple(own[k].shape):
            return True
        a, b = v.to(torch.float64), own[k].detach().cpu().to(torch.float64)
        if k in unfolded:
            return bool(torch.linalg.vector_norm(a - b) > UNFOLDED_RTOL
                        * torch.linalg.vector_norm(b) + UNFOLDED_RMS * b.numel() ** 0.5)
        return not torch.allclose(a, b, rtol=BASE_TOL, atol=BASE_TOL)

    differ = [k for k, v in base.items() if k in own and differs(k, v)]
    if differ:
        out.append(f"{len(differ)} tensors differ (e.g. {differ[0]})")
    return out
