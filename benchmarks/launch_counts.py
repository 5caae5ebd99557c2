"""Launches per training step of the paper DDPM, per method x backend x strategy.

Each configuration is one ``tenvoo-fast finetune`` run (paper UNet, small volume, bf16
autocast, batch 1, no accumulation) with ``--count-launches``: its third step (after two
warm-up steps) is counted by :class:`tenvoo_fast.measure.launches.LaunchCounter`. Without a GPU
the ``triton`` configurations run under
:func:`tenvoo_fast.triton_kernels.launching.dry_run` (launches counted, not run). Counts do not
depend on the volume size or the device, so a CPU run predicts what a GPU's host must issue
(kernels that ATen runs internally aside); they are deterministic.

A second table counts one adapted layer's training step beyond the same layer trainable and
plain, per method x backend, at two DDPM shapes (the ``triton`` backend in Triton's interpreter
when there is no GPU: launches are what its launcher issues either way); a third gives the
``triton`` backend's launch plan over every DDPM conv shape (no execution).

Usage (writes DIR/launch-counts.json and .md, and prints the tables)::

    python benchmarks/launch_counts.py --out benchmarks/results/launch-counts-cpu-DATE
    python benchmarks/launch_counts.py --configs full tenvoo-l:torch:merged  # a subset
    python benchmarks/launch_counts.py --torch-shapes --out DIR  # torch path, every DDPM shape
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import tempfile
from pathlib import Path

import torch

if not torch.cuda.is_available():          # before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tenvoo_fast.ddpm import finetune
from tenvoo_fast.ddpm.run_options import FinetuneOptions
from tenvoo_fast.ddpm.system import versions
from tenvoo_fast.files import atomic_path, write_json_atomic

#: method:backend:strategy[:weight policy] (backend and strategy default to auto, the weight
#: policy to recompute).
CONFIGS = ("full", "lora", "lora:reference", "lora:torch", "lora:triton:merged",
           "tenvoo-l", "tenvoo-l:reference", "tenvoo-l:torch:merged", "tenvoo-l:torch:merged:keep",
           "tenvoo-l:torch:factorized", "tenvoo-l:triton:merged", "tenvoo-l:triton:merged:keep",
           "tenvoo-q", "tenvoo-q:reference", "tenvoo-q:torch:merged", "tenvoo-q:torch:merged:keep",
           "tenvoo-q:torch:factorized", "tenvoo-q:triton:merged", "tenvoo-q:triton:merged:keep")


def count(config: str, size: int, rank: int, amp: str, work: Path) -> dict:
    parts = config.split(":")
    method, backend, strategy, policy = parts + ["auto", "auto", "recompute"][len(parts) - 1:]
    opts = FinetuneOptions(preset="paper", method=method, steps=finetune.WARMUP_STEPS + 1,
                           accum=1, batch_size=1, size=(size,) * 3, rank=rank, amp=amp,
                           num_volumes=2, backend=backend, strategy=strategy,
                           weight_policy=policy, count_launches=True, overwrite=True,
                           out=str(work / "run"))
    if backend == "triton" and not torch.cuda.is_available():
        # The interpreter would take hours on the paper UNet: count the launches, run none.
        from tenvoo_fast.triton_kernels.launching import dry_run
        with dry_run():
            metrics = finetune.run(opts)
    else:
        metrics = finetune.run(opts)
    how: dict[str, int] = {}
    for layer in metrics.get("execution") or []:
        key = layer["backend"] + (f"/{layer['strategy']}" if layer["strategy"] else "")
        how[key] = how.get(key, 0) + 1
    return dict(config=config, method=method, backend=backend, strategy=strategy,
                weight_policy=policy, execution=how, **metrics["launches"])


#: Per-layer table: (method, backends) at these (Cin, Cout) of the DDPM's 3x3x3 convs, r=4.
LAYER_SHAPES = ((32, 64), (128, 256))
LAYER_METHODS = ("lora", "loha", "lokr", "tenvoo-l", "tenvoo-q")
LAYER_BACKENDS = (("reference", "auto", "recompute"), ("torch", "merged", "recompute"),
                  ("torch", "merged", "keep"), ("triton", "merged", "recompute"),
                  ("triton", "merged", "keep"))


def _conv_adapter(method: str, conv, rank: int):
    from tenvoo_fast import LoHaConv3d, LoKrConv3d, LoRAConv3d, TenVOOConv3d
    if method.startswith("tenvoo-"):
        return TenVOOConv3d.from_conv(conv, rank, method[-1].upper())
    return {"lora": LoRAConv3d, "loha": LoHaConv3d, "lokr": LoKrConv3d}[method].from_conv(
        conv, rank)


def layer_rows(rank: int) -> list[dict]:
    """Each method x backend's extra launches and copies per adapted Conv3d step."""
    import tenvoo_fast
    from tenvoo_fast.measure.launches import extra_step_counts
    rows = []
    for method in LAYER_METHODS:
        for backend, strategy, policy in LAYER_BACKENDS:
            row = dict(method=method, backend=backend, strategy=strategy, weight_policy=policy,
                       shapes={})
            for cin, cout in LAYER_SHAPES:
                torch.manual_seed(0)
                plain = torch.nn.Conv3d(cin, cout, 3, padding=1)
                layer = _conv_adapter(method, torch.nn.Conv3d(cin, cout, 3, padding=1), rank)
                x = torch.randn(1, cin, 2, 2, 2, requires_grad=True)
                with tenvoo_fast.use_backend(backend), tenvoo_fast.use_strategy(strategy), \
                        tenvoo_fast.use_weight_policy(policy):
                    row["shapes"][f"{cin}->{cout}"] = extra_step_counts(layer, plain, x).as_dict()
            rows.append(row)
    return rows


def plan_rows(rank: int) -> list[dict]:
    """The ``triton`` backend's launches per adapted Conv3d step over every DDPM conv shape,
    from its launch plan (3 fixed launches, 2 keeping the weight, + the tree's)."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))     # the repository's tests/
    from tenvoo_fast.triton_kernels.launch_tree import fused_for
    from tests.ddpm_shapes import DDPM_CONV_SHAPES
    rows = []
    for method in LAYER_METHODS:
        for policy, fixed in (("recompute", 3), ("keep", 2)):
            counts = {}
            for cin, cout in DDPM_CONV_SHAPES:
                layer = _conv_adapter(method, torch.nn.Conv3d(cin, cout, 3), rank)
                net = layer.network
                f = fused_for(net.equation,
                              tuple(tuple(c.shape) for c in net.views(layer.cores)))
                counts[f"{cin}->{cout}"] = (None if f is None else fixed
                                            + len(f.forward_launches) + len(f.backward_launches))
            rows.append(dict(method=method, weight_policy=policy, launches=counts))
    return rows


def torch_shape_rows(rank: int) -> list[dict]:
    """The torch path's extra launches and copies per adapted Conv3d step (fp32, 2x2x2 volume)
    for TenVOO-L and TenVOO-Q over every DDPM conv shape, recomputing and keeping the weight."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))     # the repository's tests/
    import tenvoo_fast
    from tenvoo_fast.measure.launches import extra_step_counts
    from tests.ddpm_shapes import DDPM_CONV_SHAPES
    rows = []
    for method in ("tenvoo-l", "tenvoo-q"):
        for policy in ("recompute", "keep"):
            shapes = {}
            for cin, cout in DDPM_CONV_SHAPES:
                torch.manual_seed(0)
                plain = torch.nn.Conv3d(cin, cout, 3, padding=1)
                layer = _conv_adapter(method, torch.nn.Conv3d(cin, cout, 3, padding=1), rank)
                x = torch.randn(1, cin, 2, 2, 2, requires_grad=True)
                with tenvoo_fast.use_backend("torch"), tenvoo_fast.use_strategy("merged"), \
                        tenvoo_fast.use_weight_policy(policy):
                    c = extra_step_counts(layer, plain, x)
                shapes[f"{cin}->{cout}"] = dict(launches=c.launches, copies=c.copies)
            rows.append(dict(method=method, weight_policy=policy, shapes=shapes))
    return rows


def torch_shape_table(rows: list[dict], budget=(40, 10)) -> str:
    lines = [f"| method | weight | shapes within +{budget[0]} / {budget[1]} | launches (min-max) "
             "| copies (min-max) |", "|---|---|---:|---:|---:|"]
    for r in rows:
        n = [c["launches"] for c in r["shapes"].values()]
        k = [c["copies"] for c in r["shapes"].values()]
        within = sum(a <= budget[0] and b <= budget[1] for a, b in zip(n, k))
        lines.append(f"| {r['method']} | {r['weight_policy']} | {within} of {len(n)} | "
                     f"+{min(n)}..{max(n)} | {min(k)}-{max(k)} |")
    return "\n".join(lines)


def layer_table(rows: list[dict]) -> str:
    heads = [f"{s} launches / copies" for s in (f"{a}->{b}" for a, b in LAYER_SHAPES)]
    lines = ["| method | backend | weight | " + " | ".join(heads) + " |",
             "|---|---|---|" + "---:|" * len(heads)]
    for r in rows:
        cells = [f"+{c['launches']} / +{c['copies']}" for c in r["shapes"].values()]
        lines.append(f"| {r['method']} | {r['backend']} ({r['strategy']}) | "
                     f"{r['weight_policy']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plan_table(rows: list[dict]) -> str:
    lines = ["| method | weight | shapes within 6 | launches (min-max) | over 6 |",
             "|---|---|---:|---:|---|"]
    for r in rows:
        n = [v for v in r["launches"].values() if v is not None]
        over = ", ".join(f"{k}: {v}" for k, v in r["launches"].items() if v is not None and v > 6)
        lines.append(f"| {r['method']} | {r['weight_policy']} | "
                     f"{sum(v <= 6 for v in n)} of {len(r['launches'])} | "
                     f"{min(n)}-{max(n)} | {over or '-'} |")
    return "\n".join(lines)


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
    ap.add_argument("--no-layers", action="store_true", help="skip the per-layer tables")
    ap.add_argument("--torch-shapes", action="store_true",
                    help="only the torch path's counts over every DDPM conv shape (TenVOO-L/Q)")
    args = ap.parse_args(argv)
    if args.torch_shapes:
        rows = torch_shape_rows(args.rank)
        out = Path(args.out)
        write_json_atomic(out / "torch-shapes.json", dict(
            rank=args.rank, device="cpu", versions=versions(),
            date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            command=f"python benchmarks/launch_counts.py --torch-shapes --rank {args.rank}",
            rows=rows))
        text = ("The torch path's launches and copies per adapted 3x3x3 Conv3d step beyond the same "
                f"conv trainable (r={args.rank}, fp32, 2x2x2 volume), over the DDPM's conv shapes:"
                f"\n\n{torch_shape_table(rows)}\n")
        with atomic_path(out / "torch-shapes.md") as tmp:
            Path(tmp).write_text(text)
        print(text)
        return
    layers = [] if args.no_layers else layer_rows(args.rank)
    plans = [] if args.no_layers else plan_rows(args.rank)
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
                  rows=rows, layers=layers, triton_plans=plans)
    write_json_atomic(out / "launch-counts.json", result)
    text = table(rows)
    if layers:
        text += ("\n\nOne adapted 3x3x3 Conv3d's training step beyond the same conv trainable "
                 f"(r={args.rank}, fp32, 2x2x2 volume):\n\n{layer_table(layers)}"
                 "\n\nThe triton backend's launches per adapted Conv3d step over the DDPM's "
                 f"{len(plans[0]['launches'])} conv shapes (launch plan):\n\n{plan_table(plans)}")
    with atomic_path(out / "launch-counts.md") as tmp:
        Path(tmp).write_text(
        f"Paper DDPM UNet, {args.size}^3, bf16 autocast, r={args.rank}, one counted step "
        f"(batch 1) after two warm-up steps, CPU; {result['date']}; torch "
        f"{result['versions'].get('torch')}.\n\n{text}\n")  # noqa: E128
    print(text)


if __name__ == "__main__":
    main()
