"""Launches per training step of the paper DDPM, per method x backend x strategy.

Each configuration is one ``tenvoo-fast finetune`` run (paper UNet, small volume, bf16
autocast, batch 1, no accumulation) with ``--count-launches``: its third step (after two
warm-up steps) is counted by :class:`tenvoo_fast.measure.launches.LaunchCounter`. Counts do not
depend on the volume size or the device, so a CPU run predicts what a GPU's host must issue
(kernels that ATen runs internally aside); they are deterministic.

Usage (writes DIR/launch-counts.json and .md, and prints the table)::

    python benchmarks/launch_counts.py --out benchmarks/results/launch-counts-cpu-DATE
    python benchmarks/launch_counts.py --configs full tenvoo-l:torch:merged  # a subset
"""
from __future__ import annotations

import argparse
import datetime as _dt
import tempfile
from pathlib import Path

from tenvoo_fast.ddpm import finetune
from tenvoo_fast.ddpm.run_options import FinetuneOptions
from tenvoo_fast.ddpm.system import versions
from tenvoo_fast.files import atomic_path, write_json_atomic

#: method:backend:strategy (backend and strategy default to auto).
CONFIGS = ("full", "lora", "lora:reference", "lora:torch",
           "tenvoo-l", "tenvoo-l:reference", "tenvoo-l:torch:merged", "tenvoo-l:torch:factorized",
           "tenvoo-q", "tenvoo-q:reference", "tenvoo-q:torch:merged", "tenvoo-q:torch:factorized")


def count(config: str, size: int, rank: int, amp: str, work: Path) -> dict:
    method, backend, strategy = (config.split(":") + ["auto", "auto"])[:3]
    opts = FinetuneOptions(preset="paper", method=method, steps=finetune.WARMUP_STEPS + 1,
                           accum=1, batch_size=1, size=(size,) * 3, rank=rank, amp=amp,
                           num_volumes=2, backend=backend, strategy=strategy,
                           count_launches=True, overwrite=True, out=str(work / "run"))
    metrics = finetune.run(opts)
    how: dict[str, int] = {}
    for layer in metrics.get("execution") or []:
        key = layer["backend"] + (f"/{layer['strategy']}" if layer["strategy"] else "")
        how[key] = how.get(key, 0) + 1
    return dict(config=config, method=method, backend=backend, strategy=strategy,
                execution=how, **metrics["launches"])


def table(rows: list[dict]) -> str:
    full = next((r for r in rows if r["method"] == "full"), rows[0])["step"]["launches"]
    lines = ["| configuration | ran as | launches / step | vs full | copies | views | host syncs "
             "| launches / adapted layer | copies / adapted layer | optimizer |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        s, per = r["step"], r["per_layer"] or {}
        ran = ", ".join(f"{k}: {v}" for k, v in sorted(r["execution"].items())) or "-"
        lines.append(f"| {r['config']} | {ran} | {s['launches']:,} | {s['launches'] / full:.2f}x "
                     f"| {s['copies']:,} | {s['views']:,} | {s['syncs']} "
                     f"| {per.get('launches', 0):.1f} | {per.get('copies', 0):.1f} "
                     f"| {r['optimizer']['launches']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS))
    ap.add_argument("--size", type=int, default=32, help="volume edge (the paper UNet needs 32k)")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--amp", default="bf16")
    ap.add_argument("--out", default="runs/launch-counts", help="output folder")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for config in args.configs:
            print(f"=== {config}", flush=True)
            rows.append(count(config, args.size, args.rank, args.amp, Path(work)))
    out = Path(args.out)
    result = dict(model="paper DiffusionModelUNet (166.67 M)", size=[args.size] * 3,
                  rank=args.rank, amp=args.amp, batch=1, accum=1, device="cpu",
                  versions=versions(),
                  date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                  command="python benchmarks/launch_counts.py " + " ".join(
                      f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                      for k, v in vars(args).items()),
                  rows=rows)
    write_json_atomic(out / "launch-counts.json", result)
    text = table(rows)
    with atomic_path(out / "launch-counts.md") as tmp:
        Path(tmp).write_text(
        f"Paper DDPM UNet, {args.size}^3, bf16 autocast, r={args.rank}, one counted step "
        f"(batch 1) after two warm-up steps, CPU; {result['date']}; torch "
        f"{result['versions'].get('torch')}.\n\n{text}\n")  # noqa: E128
    print(text)


if __name__ == "__main__":
    main()
