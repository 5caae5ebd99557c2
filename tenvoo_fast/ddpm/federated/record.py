"""What a federated run writes, and what ``--resume`` reads back: ``metrics.json`` (options and,
per round and client, losses, bytes, times, who was missing), ``round-NNN.safetensors`` (the
global state after each round: the aggregated adapter, or for ``exact`` every merge so far) and
``federated.png``; every file written atomically, after the round it records."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

from ...errors import RunError
from ...files import atomic_path, write_json_atomic
from .rounds import FederatedOptions

METRICS = "metrics.json"
#: Options a resumed run may change (the rest must match: they define the rounds already run);
#: the backend and strategy run the same math (a run may move to other hardware).
RESUMABLE = {"rounds", "resume", "out", "local_adaptation", "device", "backend", "strategy"}


def round_file(out: Path, round_: int) -> Path:
    return out / f"round-{round_:03d}.safetensors"


class Recorder:
    """The run folder: :meth:`start` (or resume), :meth:`round` after each, :meth:`finish`."""

    def __init__(self, opts: FederatedOptions):
        self.opts, self.out = opts, Path(opts.out)
        self.metrics = {"options": dataclasses.asdict(opts), "rounds": [], "status": "running"}

    def start(self) -> tuple[int, Optional[bytes], Optional[list]]:
        """(rounds already done, the last round's payload, its clients' rated losses) when
        resuming; (0, None, None) for a new run. A folder with another run in it is refused."""
        path = self.out / METRICS
        if not path.exists():
            if self.opts.resume:
                raise RunError(f"--resume: {self.out} holds no federated run ({METRICS} "
                               "missing); start one without --resume")
            self.out.mkdir(parents=True, exist_ok=True)
            return 0, None, None
        if not self.opts.resume:
            raise RunError(f"--out {self.out}: holds a federated run already; pass --resume to "
                           "continue it, or choose another folder")
        saved = json.loads(path.read_text())
        differ = {k: (v, getattr(self.opts, k)) for k, v in saved["options"].items()
                  if k not in RESUMABLE and v != getattr(self.opts, k)}
        if differ:
            raise RunError(f"--resume: options differ from the run in {self.out} (saved, now): "
                           f"{differ}; resume with the same options")
        self.metrics["rounds"] = saved["rounds"]
        done = len(saved["rounds"])
        if done == 0:
            return 0, None, None
        payload = round_file(self.out, done).read_bytes()
        return done, payload, saved["rounds"][-1].get("rated_val_loss")

    def round(self, record: dict, payload: bytes) -> None:
        with atomic_path(round_file(self.out, record["round"])) as tmp:
            Path(tmp).write_bytes(payload)
        self.metrics["rounds"].append(record)
        write_json_atomic(self.out / METRICS, self.metrics)

    def finish(self, adaptation: Optional[dict]) -> dict:
        self.metrics.update(status="finished", local_adaptation=adaptation)
        write_json_atomic(self.out / METRICS, self.metrics)
        _chart(self.out, self.metrics)
        return self.metrics


def _chart(out: Path, metrics: dict) -> None:
    """Per-client validation loss of the aggregated state, round by round."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    clients = sorted({c for r in metrics["rounds"] for c in r["clients"]}, key=int)
    for c in clients:
        points = [(r["round"], r["clients"][c].get("val_loss")) for r in metrics["rounds"]
                  if c in r["clients"] and r["clients"][c].get("val_loss") is not None]
        if points:
            ax.plot(*zip(*points), marker="o", label=f"client {c}")
    o = metrics["options"]
    ax.set(xlabel="round", ylabel="validation loss (aggregated adapter)",
           title=f"{o['aggregation']} ({o['mode']}), {o['method']}")
    ax.legend()
    fig.tight_layout()
    with atomic_path(out / "federated.png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
