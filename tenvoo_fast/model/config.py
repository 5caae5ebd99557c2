"""AdapterConfig: which method, rank and layers, and what else trains; plain data (the methods
registry, :func:`tenvoo_fast.methods.build`, turns it into layers)."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Mapping, Optional, Sequence, Union

from ..errors import AdapterError
from ..methods import method_names
from ..methods.common import INITS
from ..methods.lora import MODES as LORA_MODES

#: The methods a config may name (registered by :mod:`tenvoo_fast.methods`).
METHODS = method_names()
TRAINABLE = ("bias", "norm", "all")


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
        if self.lora_mode not in LORA_MODES:
            raise AdapterError(f"lora_mode must be 'merged' or 'bypass', got {self.lora_mode!r}")
        self.factors = _normalise_factors(self.factors)

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
