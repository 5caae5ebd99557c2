"""AdapterConfig: which method, rank and layers, what else trains, and how to build each adapter."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Mapping, Optional, Sequence, Union

from torch import nn

from .errors import AdapterError

METHODS = ("tenvoo-l", "tenvoo-q", "lora", "loha", "lokr")
TRAINABLE = ("bias", "norm", "all")
INITS = ("frozen-copy", "zero-last")


@dataclass
class AdapterConfig:
    """How to adapt a model.

    - ``method``: ``"tenvoo-l"`` / ``"tenvoo-q"`` (TenVOO on Conv3d, QuanTA on Linear targets),
      ``"lora"``, ``"loha"`` or ``"lokr"`` (on both).
    - ``target_modules``: regular expressions matched with ``re.search`` against module names;
      each must match at least one module, and every match must be an ``nn.Conv3d`` or
      ``nn.Linear``. Conv3d layers with a single input or output channel are skipped (the
      published behaviour) unless ``skip_single_channel=False``.
    - ``trainable``: besides the adapter cores, ``"bias"`` (biases of adapted layers), ``"norm"``
      (parameters whose name contains "norm") or ``"all"`` (every parameter except the adapted
      layers' frozen weights and biases: the paper's joint fine-tuning).
    - ``factors``: channel count -> ``(f1, f2, f3)`` overrides of the table, and/or layer name ->
      ``((i1, i2, i3), (o1, o2, o3))`` for one layer (TenVOO and QuanTA).
    - ``init``: ``"frozen-copy"`` (default, the paper's) or ``"zero-last"`` (TenVOO and QuanTA).
    - ``alpha``: scale ``alpha / rank`` for LoRA/LoHa/LoKr (default ``rank``, i.e. scale 1).
    """
    method: str
    rank: int
    target_modules: Union[str, Sequence[str]]
    alpha: Optional[float] = None
    trainable: Sequence[str] = ()
    factors: Optional[Mapping] = None
    init: str = "frozen-copy"
    skip_single_channel: bool = True
    lora_mode: str = "merged"
    lokr_factor: int = -1

    def __post_init__(self):
        self.method = str(self.method).lower()
        if self.method not in METHODS:
            raise AdapterError(f"unknown method {self.method!r}; choose one of {list(METHODS)}")
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise AdapterError(f"rank must be an integer >= 1, got {self.rank!r}")
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        self.target_modules = list(self.target_modules)
        if not self.target_modules:
            raise AdapterError("target_modules is empty; give at least one regular expression")
        for p in self.target_modules:
            try:
                re.compile(p)
            except re.error as e:
                raise AdapterError(f"target pattern {p!r} is not a valid regular expression: {e}")
        if isinstance(self.trainable, str):
            self.trainable = [self.trainable]
        self.trainable = sorted(set(self.trainable))
        bad = [t for t in self.trainable if t not in TRAINABLE]
        if bad:
            raise AdapterError(f"unknown trainable group(s) {bad}; choose from {list(TRAINABLE)}")
        if self.init not in INITS:
            raise AdapterError(f"unknown init {self.init!r}; choose one of {list(INITS)}")
        if self.lora_mode not in ("merged", "bypass"):
            raise AdapterError(f"lora_mode must be 'merged' or 'bypass', got {self.lora_mode!r}")
        self.factors = _normalise_factors(self.factors)

    # -- building -----------------------------------------------------------------------------
    def layer_factors(self, name: str):
        return self.factors["layers"].get(name)

    def build(self, name: str, module: nn.Module):
        """The adapter layer for ``module`` (an ``nn.Conv3d`` or ``nn.Linear`` named ``name``)."""
        from .modules import (LoHaConv3d, LoHaLinear, LoKrConv3d, LoKrLinear, LoRAConv3d,
                              LoRALinear, QuanTALinear, TenVOOConv3d)
        from .factorization import resolve_factors
        m, r = self.method, self.rank
        table = self.factors["channels"]
        if isinstance(module, nn.Conv3d):
            if m.startswith("tenvoo"):
                f = self.layer_factors(name) or resolve_factors(
                    None, module.in_channels, module.out_channels, layer=name, table=table)
                return TenVOOConv3d.from_conv(module, r, variant=m[-1].upper(), factors=f,
                                              init=self.init, name=name)
            if m == "lora":
                return LoRAConv3d.from_conv(module, r, self.alpha, mode=self.lora_mode, name=name)
            if m == "loha":
                return LoHaConv3d.from_conv(module, r, self.alpha, name=name)
            return LoKrConv3d.from_conv(module, r, self.alpha, factor=self.lokr_factor, name=name)
        if isinstance(module, nn.Linear):
            if m.startswith("tenvoo"):
                f = self.layer_factors(name) or resolve_factors(
                    None, module.in_features, module.out_features, layer=name, table=table)
                return QuanTALinear.from_linear(module, r, factors=f, init=self.init, name=name)
            if m == "lora":
                return LoRALinear.from_linear(module, r, self.alpha, name=name)
            if m == "loha":
                return LoHaLinear.from_linear(module, r, self.alpha, name=name)
            return LoKrLinear.from_linear(module, r, self.alpha, factor=self.lokr_factor, name=name)
        raise AdapterError(
            f"{name}: target pattern matched a {type(module).__name__}, but only nn.Conv3d and "
            f"nn.Linear can be adapted; anchor the pattern so it names the layer itself (for "
            f"MONAI's Convolution wrapper, match '{name}.conv' with a pattern ending in '.conv$')")

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["factors"] = {"channels": {str(k): list(v) for k, v in self.factors["channels"].items()},
                        "layers": {k: [list(v[0]), list(v[1])]
                                   for k, v in self.factors["layers"].items()}}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AdapterConfig":
        d = dict(d)
        f = d.get("factors") or {}
        d["factors"] = {"channels": {int(k): tuple(v) for k, v in f.get("channels", {}).items()},
                        "layers": {k: (tuple(v[0]), tuple(v[1]))
                                   for k, v in f.get("layers", {}).items()}}
        return cls(**d)


def _normalise_factors(factors) -> dict:
    """-> {"channels": {int: (f1,f2,f3)}, "layers": {name: ((i..), (o..))}}."""
    if factors is None:
        return {"channels": {}, "layers": {}}
    if set(factors) <= {"channels", "layers"} and factors:
        ch = dict(factors.get("channels", {}))
        ly = dict(factors.get("layers", {}))
    else:
        ch = {k: v for k, v in factors.items() if isinstance(k, int)}
        ly = {k: v for k, v in factors.items() if isinstance(k, str)}
        if len(ch) + len(ly) != len(factors):
            raise AdapterError("factors keys must be channel counts (int) or layer names (str)")
    out_ch = {}
    for c, f in ch.items():
        f = tuple(int(x) for x in f)
        if len(f) != 3 or f[0] * f[1] * f[2] != int(c):
            raise AdapterError(f"factors[{c}] = {list(f)} must be three integers whose product "
                               f"is {c}")
        out_ch[int(c)] = f
    out_ly = {}
    for name, f in ly.items():
        if len(f) != 2:
            raise AdapterError(f"factors[{name!r}] must be ((i1, i2, i3), (o1, o2, o3)), got {f!r}")
        out_ly[name] = (tuple(int(x) for x in f[0]), tuple(int(x) for x in f[1]))
    return {"channels": out_ch, "layers": out_ly}
