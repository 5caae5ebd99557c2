"""What ``auto`` picks on a GPU for the paper DDPM, per adapted layer, and what it predicts.

Builds the paper UNet on the meta device (no memory, no compute), injects the method with the
paper's targets, records each adapted layer's input shape at the paper volume, and asks the
GPU cost model (``tenvoo_fast.dispatch.gpu_costs``) for every layer: the backend ranking and
strategy ``auto`` takes on CUDA under bf16 autocast, for an eager step ("host": each launch
costs the host's time) and a replayed CUDA graph ("replay": ``--graph``), and the predicted
extra seconds per step of every (backend, strategy), summed over the model's adapted layers
(launches beyond a trainable plain layer's, device work beyond a frozen layer's: a figure for
ranking the options; ``step_model.py`` predicts whole steps).
Everything it prints is a prediction of a model calibrated on the committed H100 runs, not a
measurement.

    python benchmarks/auto_choices.py [--methods tenvoo-l tenvoo-q lora] [--out DIR]
"""
from __future__ import annotations

import argparse
import datetime as _dt
from collections import Counter, defaultdict
from pathlib import Path

import torch

import tenvoo_fast as tf
from tenvoo_fast.ddpm.run_options import FinetuneOptions
from tenvoo_fast.ddpm.system import versions
from tenvoo_fast.ddpm.unets import build_unet
from tenvoo_fast.dispatch import gpu_costs
from tenvoo_fast.files import atomic_path, write_json_atomic
from tenvoo_fast.model import AdapterConfig, inject

VOLUME = (128, 128, 96)
MODES = ("host", "replay")


def layer_inputs(method: str) -> list[tuple[str, torch.nn.Module, tuple]]:
    """(name, layer, input shape) of every adapted layer of the paper model at :data:`VOLUME`."""
    with torch.device("meta"):
        model = build_unet("paper")
    defaults = FinetuneOptions()
    inject(model, AdapterConfig(method=method, rank=4, target_modules=list(defaults.targets),
                                trainable=tuple(defaults.trainable)))
    seen: dict[str, tuple] = {}
    for name, module in model.named_modules():
        if isinstance(module, tf.AdapterLayer):
            module.register_forward_pre_hook(
                lambda mod, args, n=name: seen.setdefault(n, (mod, tuple(args[0].shape))) and None)
    model(torch.zeros(1, 1, *VOLUME, device="meta"), torch.tensor([10], device="meta"))
    return [(n, m, s) for n, (m, s) in seen.items()]


def choices(method: str) -> dict:
    picked = {mode: Counter() for mode in MODES}
    totals = {mode: defaultdict(float) for mode in MODES}
    layers = layer_inputs(method)
    for _, layer, shape in layers:
        for mode in MODES:
            with tf.use_launch_cost(mode):
                backend = gpu_costs.ranking(layer, shape, torch.bfloat16)[0]
                strategy = gpu_costs.cheapest_strategy(layer, shape, torch.bfloat16, backend,
                                                       ("merged", "factorized"))
                seconds = gpu_costs.seconds(*gpu_costs.layer_args(layer, shape, torch.bfloat16))
            picked[mode][f"{backend}:{strategy}"] += 1
            for (b, s), t in seconds.items():
                totals[mode][f"{b}:{s}"] += t
    return dict(layers=len(layers), picked={m: dict(c) for m, c in picked.items()},
                predicted_extra_s={m: dict(t) for m, t in totals.items()})


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["tenvoo-l", "tenvoo-q", "lora"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = {m: choices(m) for m in args.methods}
    lines = ["| method | adapted layers | auto picks (eager) | auto picks (--graph) | "
             "predicted extra ms/step, eager: triton / torch / reference | "
             "--graph: triton / torch / reference |", "|---|---:|---|---|---|---|"]
    for method, r in rows.items():
        def best(mode, backend):
            ts = [t for k, t in r["predicted_extra_s"][mode].items() if k.startswith(backend)]
            return f"{min(ts) * 1e3:.0f}"
        lines.append(
            f"| {method} | {r['layers']} | "
            + ", ".join(f"{k} x{n}" for k, n in r["picked"]["host"].items()) + " | "
            + ", ".join(f"{k} x{n}" for k, n in r["picked"]["replay"].items()) + " | "
            + " / ".join(best("host", b) for b in gpu_costs.CANDIDATES) + " | "
            + " / ".join(best("replay", b) for b in gpu_costs.CANDIDATES) + " |")
    table = "\n".join(lines)
    print(table)
    result = dict(volume=list(VOLUME), dtype="bfloat16 (autocast)", model="paper", rank=4,
                  gpu=gpu_costs.H100.name, host_s_per_launch=gpu_costs.HOST_S_PER_LAUNCH,
                  replay_s_per_launch=gpu_costs.seconds_per_launch("replay"), rows=rows,
                  versions=versions(), date=_dt.date.today().isoformat(),
                  command="python benchmarks/auto_choices.py --methods "
                          + " ".join(args.methods))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out / "auto-choices.json", result)
        with atomic_path(args.out / "auto-choices.md") as tmp:
            Path(tmp).write_text(  # noqa: E128
            f"Predicted, not measured ({result['command']}, {result['date']}, CPU, meta "
            f"device).\n\n{table}\n")
    return result


if __name__ == "__main__":
    main()
