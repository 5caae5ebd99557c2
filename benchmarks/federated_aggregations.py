"""Federated aggregation schemes side by side on the synthetic non-IID clients, and the bytes a
round sends against a full-model exchange.

Each configuration is one ``tenvoo-fast federated`` run (a Flower simulation on the CPU) on the
tiny preset: the same clients (shifted phantoms, 4, 8 and 12 of them: 3, 7 and 11 to train),
seed, rounds and local steps; only the
aggregation differs. Reported per configuration: each client's validation loss of the
aggregated adapter after the last round, their mean, and after local adaptation. The bytes of
one adapter on the wire are measured (safetensors) for the tiny and the paper presets and
compared with the full model's parameters and buffers.

    python benchmarks/federated_aggregations.py [--out DIR] [--rounds N]
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tenvoo_fast.ddpm.cli import main as cli
from tenvoo_fast.ddpm.federated.rounds import FederatedOptions, build_model
from tenvoo_fast.ddpm.federated.wire import encode, full_model_bytes, trained_state
from tenvoo_fast.ddpm.system import versions
from tenvoo_fast.files import atomic_path, write_json_atomic

CONFIGS = [("fedavg", "exact"), ("fedavg", "factors"), ("fedpetuning", "exact"),
           ("rate-my-lora", "exact")]


def wire_bytes() -> dict:
    out = {}
    for preset in ("tiny", "paper"):
        for method in ("tenvoo-l", "lora"):
            model = build_model(FederatedOptions(preset=preset, method=method))
            out[f"{preset}/{method}"] = {"adapter": len(encode(trained_state(model))),
                                         "full_model": full_model_bytes(model)}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=f"benchmarks/results/federated-{_dt.date.today()}")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = ["federated", "--preset", "tiny", "--clients", "3", "--num-volumes", "4,8,12",
              "--local-steps", "6", "--rounds", str(args.rounds), "--local-adaptation", "4",
              "--lr", "2e-3"]
    results = {"command": " ".join(["python", *sys.argv]), "date": str(_dt.datetime.now()),
               "versions": versions(), "device": "cpu (Flower simulation, Ray)",
               "options": common, "wire_bytes": wire_bytes(), "runs": {}}
    for scheme, mode in CONFIGS:
        with tempfile.TemporaryDirectory() as tmp:
            began = time.perf_counter()
            if cli([*common, "--aggregation", scheme, "--mode", mode, "--out", tmp]) != 0:
                raise SystemExit(f"{scheme}/{mode} failed")
            metrics = json.loads((Path(tmp) / "metrics.json").read_text())
        last = metrics["rounds"][-1]["clients"]
        adapted = metrics["local_adaptation"]["val_loss"]
        results["runs"][f"{scheme}/{mode}"] = {
            "val_loss": {c: v["val_loss"] for c, v in last.items()},
            "mean_val_loss": statistics.fmean(v["val_loss"] for v in last.values()),
            "adapted_val_loss": adapted,
            "mean_adapted_val_loss": statistics.fmean(adapted.values()),
            "weights": {c: v["weight"] for c, v in last.items()},
            "seconds": time.perf_counter() - began}
    write_json_atomic(out / "federated.json", results)
    lines = ["| aggregation | mean val loss (per client) | after local adaptation |",
             "|---|---|---|"]
    for name, r in results["runs"].items():
        per = ", ".join(f"{v:.4f}" for _, v in sorted(r["val_loss"].items()))
        lines.append(f"| {name} | {r['mean_val_loss']:.4f} ({per}) | "
                     f"{r['mean_adapted_val_loss']:.4f} |")
    lines += ["", "| preset/method | adapter on the wire | full model | ratio |", "|---|---|---|---|"]
    for name, b in results["wire_bytes"].items():
        lines.append(f"| {name} | {b['adapter'] / 2**20:.2f} MiB | "
                     f"{b['full_model'] / 2**20:.1f} MiB | {b['full_model'] / b['adapter']:.0f}x |")
    with atomic_path(out / "federated.md") as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
