"""A fine-tuning run's options, typed, with their defaults (:class:`FinetuneOptions`)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..model.presets import PAPER_DDPM_TARGETS

#: Default checkpoint interval: every this many optimizer steps, or this many minutes, whichever
#: comes first (and on SIGTERM/SIGINT, and at the end).
SAVE_EVERY_STEPS = 500
SAVE_EVERY_MINUTES = 10.0


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class FinetuneOptions:
    """A fine-tuning run's options, typed, with their defaults: what ``tenvoo-fast finetune``
    parses into (:meth:`from_namespace`) and what :func:`.finetune.run` takes. ``tenvoo-fast
    profile`` builds one per method with :func:`dataclasses.replace` (nothing is re-parsed)."""
    # model
    preset: str = "paper"
    method: str = "tenvoo-l"
    rank: int = 4
    targets: list = field(default_factory=lambda: list(PAPER_DDPM_TARGETS))
    trainable: list = field(default_factory=lambda: ["bias", "norm"])
    base_weights: Optional[str] = None
    # data
    data: Optional[str] = None
    num_volumes: int = 20
    size: Optional[list] = None
    spacing: Optional[list] = None
    workers: int = 0
    # training
    recipe: Optional[str] = None         # None: "published" for --preset published, else ours
    steps: Optional[int] = None          # None (and no epochs): the recipe's default length
    epochs: Optional[float] = None
    lr: float = 5e-5
    batch_size: int = 1
    accum: int = 4
    seed: int = 0
    device: str = field(default_factory=lambda: default_device())
    backend: str = "auto"
    strategy: str = "auto"
    weight_policy: str = "recompute"
    autotune: bool = False
    amp: Optional[str] = None
    checkpoint_activations: bool = False
    compile: bool = False
    graph: bool = False
    fold_frozen: bool = False
    channels_last: bool = False
    # run
    out: str = "runs/finetune"
    resume: bool = False
    overwrite: bool = False
    save_every: int = SAVE_EVERY_STEPS
    save_every_minutes: float = SAVE_EVERY_MINUTES
    strict_base: bool = False
    log_every: int = 10
    dry_run: bool = False
    profile: bool = False
    count_launches: bool = False

    @classmethod
    def from_namespace(cls, ns) -> "FinetuneOptions":
        """From parsed arguments (or any object with these attributes; missing ones take
        their defaults)."""
        if isinstance(ns, cls):
            return ns
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{n: getattr(ns, n) for n in names if hasattr(ns, n)})
