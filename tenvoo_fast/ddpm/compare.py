"""Several fine-tuning methods side by side (``tenvoo-fast profile``).

Each method runs as ``tenvoo-fast finetune --method M --out DIR/M`` (same preset, steps, seed and
the other options given), one after another in this process; their step time, peak memory and
parameter counts go to:

- ``DIR/profile.md``: a markdown table, with ratios against the first method;
- ``DIR/profile.png``: a bar chart (step time, peak memory, trainable parameters, and with
  ``--count-launches`` the launches of one counted step);
- ``DIR/profile.json``: the raw rows, device, versions and date.

On the CPU, peak memory is the process's peak resident set size, which only grows from one
method to the next in one process: later methods never report less than earlier ones. On CUDA
the allocator's peak is reset before each method, so each row is that method's own peak.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
from pathlib import Path

import torch

from ..errors import RunError
from ..files import atomic_path, write_json_atomic
from . import finetune
from .run_options import FinetuneOptions
from .system import versions

PROFILE_MD, PROFILE_PNG, PROFILE_JSON = "profile.md", "profile.png", "profile.json"

#: ``tenvoo-fast profile`` options passed on to every ``finetune`` run when given (dest, flag).
PASSED_ON = (("rank", "--rank"), ("size", "--size"), ("accum", "--accum"),
             ("batch_size", "--batch-size"), ("num_volumes", "--num-volumes"), ("lr", "--lr"),
             ("data", "--data"), ("base_weights", "--base-weights"), ("device", "--device"),
             ("amp", "--amp"), ("seed", "--seed"), ("backend", "--backend"),
             ("strategy", "--strategy"), ("weight_policy", "--weight-policy"),
             ("autotune", "--autotune"), ("count_launches", "--count-launches"),
             ("checkpoint_activations", "--checkpoint-activations"), ("compile", "--compile"),
             ("graph", "--graph"), ("fold_frozen", "--fold-frozen"),
             ("channels_last", "--channels-last"))

#: The numbers a row keeps from each method's metrics.
ROW_KEYS = ("method", "trainable_params", "total_params", "adapted_layers", "steps",
            "step_time_s", "volumes_per_s", "peak_memory_bytes", "val_loss", "amp", "backend",
            "execution", "strategy", "launches", "saved_for_backward_bytes",
            "checkpoint_activations", "compile", "graph", "fold_frozen", "channels_last")


def method_options(opts: argparse.Namespace, method: str) -> FinetuneOptions:
    """The fine-tuning options of ``method`` in this profile: finetune's defaults, overridden
    by the profile's preset, steps and output folder and the options it passes on."""
    given = {dest: getattr(opts, dest) for dest, _ in PASSED_ON
             if getattr(opts, dest, None) is not None}
    return FinetuneOptions(preset=opts.preset, method=method, steps=opts.steps,
                           out=str(Path(opts.out) / method), overwrite=True, **given)


def finetune_argv(opts: argparse.Namespace, method: str) -> list[str]:
    """The ``tenvoo-fast finetune`` command line equivalent to :func:`method_options` (recorded
    in ``profile.json`` so a row can be re-run alone)."""
    argv = ["finetune", "--preset", opts.preset, "--method", method, "--steps", str(opts.steps),
            "--out", str(Path(opts.out) / method), "--overwrite"]
    for dest, flag in PASSED_ON:
        value = getattr(opts, dest, None)
        if value is None:
            continue
        if value is True:   # a switch
            argv.append(flag)
            continue
        argv += [flag, *map(str, value)] if isinstance(value, (list, tuple)) else [flag, str(value)]
    return argv


def run(opts: argparse.Namespace) -> dict:
    """Run every method of ``opts.methods`` with :func:`.finetune.run`; write and
    print the comparison. Returns the profile (what ``profile.json`` holds)."""
    methods = list(opts.methods)
    if not methods:
        raise RunError("--methods: name at least one method")
    unknown = [m for m in methods if m not in finetune.METHODS]
    if unknown:
        raise RunError(f"--methods: unknown method(s) {', '.join(unknown)}; choose from "
                       f"{', '.join(finetune.METHODS)}")
    if len(set(methods)) != len(methods):
        raise RunError(f"--methods {','.join(methods)}: a method is named twice")
    runs = [method_options(opts, m) for m in methods]
    out = Path(opts.out)
    device = torch.device(runs[0].device)
    if opts.steps <= finetune.WARMUP_STEPS:
        print(f"note: --steps {opts.steps}: the step time is the median after "
              f"{finetune.WARMUP_STEPS} warm-up steps, so it is n/a; use --steps "
              f"{finetune.WARMUP_STEPS + 3} or more to time the methods")

    rows = []
    for i, method_opts in enumerate(runs):
        print(f"\n=== profile {i + 1}/{len(runs)}: {method_opts.method} ===", flush=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        metrics = finetune.run(method_opts)
        rows.append({key: metrics.get(key) for key in ROW_KEYS})

    memory_kind = "allocated" if device.type == "cuda" else "rss"
    profile = dict(
        preset=runs[0].preset, size=list(finetune.volume_size(runs[0].preset, runs[0].size)),
        steps=opts.steps, accum=runs[0].accum, batch_size=runs[0].batch_size,
        seed=runs[0].seed, device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        peak_memory=memory_kind, versions=versions(),
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        commands=[" ".join(finetune_argv(opts, m)) for m in methods], rows=rows)
    table = markdown_table(profile)
    with atomic_path(out / PROFILE_MD) as tmp, open(tmp, "w") as f:
        f.write(table)
    plot(profile, out / PROFILE_PNG)
    write_json_atomic(out / PROFILE_JSON, profile)
    print("\n" + markdown_table(profile, details=False))
    print(f"wrote {out / PROFILE_MD}, {out / PROFILE_PNG}, {out / PROFILE_JSON}")
    return profile


def _ratio(value, reference) -> str:
    if value is None or not reference:
        return "n/a"
    return f"{value / reference:.2f}x"


def _fmt(value, scale: float, digits: int) -> str:
    return "n/a" if value is None else f"{value * scale:,.{digits}f}"


def markdown_table(profile: dict, details: bool = True) -> str:
    """The profile as a markdown table with a caption, then how each adapted layer ran (per
    method: a summary, and with ``details`` one line per layer)."""
    rows = profile["rows"]
    first = rows[0]
    ref = first["method"]
    cuda = profile["peak_memory"] == "allocated"
    lines = [
        f"| method | trainable params | % of total | vs {ref} | step time (ms) | vs {ref} "
        f"| peak memory (MiB) | vs {ref} | saved for backward (MiB) | vs {ref} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {row['trainable_params']:,} "
            f"| {100 * row['trainable_params'] / row['total_params']:.2f}% "
            f"| {_ratio(row['trainable_params'], first['trainable_params'])} "
            f"| {_fmt(row['step_time_s'], 1000, 1)} "
            f"| {_ratio(row['step_time_s'], first['step_time_s'])} "
            f"| {_fmt(row['peak_memory_bytes'], 2**-20, 1)} "
            f"| {_ratio(row['peak_memory_bytes'], first['peak_memory_bytes'])} "
            f"| {_fmt(row.get('saved_for_backward_bytes'), 2**-20, 1)} "
            f"| {_ratio(row.get('saved_for_backward_bytes'), first.get('saved_for_backward_bytes'))} |")
    size = "x".join(map(str, profile["size"]))
    caption = (
        f"{profile['preset']} UNet, {size} volumes, {profile['steps']} optimizer "
        f"step{'s' if profile['steps'] != 1 else ''} of "
        f"batch {profile['batch_size']} x accum {profile['accum']}, seed {profile['seed']}, "
        f"on {profile['device']} ({profile['device_name']}), torch "
        f"{profile['versions']['torch']}, {profile['date']}. Step time: median optimizer step "
        f"after {finetune.WARMUP_STEPS} warm-up steps (n/a with too few steps). Saved for "
        "backward: the distinct tensors one micro-batch's forward keeps for its backward "
        "(autograd's saved tensors, and the inputs a checkpointed block keeps), less what "
        "the model holds anyway (parameters, buffers, cached T(θ0)); measured on the first step on any device. ")
    if any(row.get("checkpoint_activations") for row in rows):
        caption += "The UNet's blocks ran checkpointed (--checkpoint-activations). "
    if any(row.get("compile") for row in rows):
        caption += "The model ran under torch.compile (--compile). "
    if any(row.get("fold_frozen") for row in rows):
        caption += "T(θ0) was folded into the fp32 base weights (--fold-frozen). "
    if any(row.get("channels_last") for row in rows):
        caption += "The UNet ran in channels_last_3d (--channels-last). "
    if any(row.get("graph") for row in rows):
        caption += ("Each step ran over static buffers (--graph), replayed as a CUDA graph on "
                    "a GPU. ")
    if cuda:
        caption += ("Peak memory: peak allocated CUDA memory, reset before each method, so each "
                    "row is that method's own peak.")
    else:
        caption += ("Peak memory: the process's peak resident set size (RSS). The methods ran "
                    "one after another in one process and the peak RSS only grows, so each row "
                    "is the peak so far, never less than the rows above it; compare memory on "
                    "CUDA, or run the methods one per process.")
    return ("\n".join(lines) + "\n\n" + caption + "\n" + launch_table(rows)
            + execution_table(rows, details))


def launch_table(rows: list[dict]) -> str:
    """The counted step of each method (``--count-launches``): what it asked of the host, in
    total and per counted layer; empty if nothing was counted."""
    counted = [r for r in rows if r.get("launches")]
    if not counted:
        return ""
    first = counted[0]["launches"]["step"]["launches"]
    lines = ["", "### Launches (one counted training step)", "",
             f"| method | launches / step | vs {counted[0]['method']} | copies | views "
             "| allocations | host syncs | Triton | counted layers | launches / layer "
             "| copies / layer | optimizer launches |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in counted:
        c = r["launches"]
        step, per = c["step"], c["per_layer"] or {}
        lines.append(
            f"| {r['method']} | {step['launches']:,} | {_ratio(step['launches'], first)} "
            f"| {step['copies']:,} | {step['views']:,} | {step['allocations']:,} "
            f"| {step['syncs']:,} | {step['triton']:,} | {c['layers']} "
            f"| {per.get('launches', 0):.1f} | {per.get('copies', 0):.1f} "
            f"| {c['optimizer']['launches']:,} |")
    lines += ["", "Counted with a TorchDispatchMode (tenvoo_fast.measure.launches) over one "
              "optimizer step after the warm-up, all micro-batches: ATen calls that launch a "
              "kernel (copies included) plus Triton launches; the counted layers are the "
              "adapted ones (full fine-tuning: every Conv3d and Linear). Host syncs include "
              "the optimizer's (CPU Adam reads each step count) and the loss's item().", ""]
    return "\n".join(lines) + "\n"


def _how(layer: dict) -> str:
    if layer["backend"] is None:
        return "did not run"
    return layer["backend"] + (f"/{layer['strategy']}" if layer["strategy"] else "")


def execution_table(rows: list[dict], details: bool = True) -> str:
    """Which backend and strategy ran each adapted layer, per method (from the last step)."""
    out = []
    for row in rows:
        layers = row.get("execution") or []
        if not layers:
            continue
        counts: dict[str, int] = {}
        for layer in layers:
            counts[_how(layer)] = counts.get(_how(layer), 0) + 1
        summary = ", ".join(f"{how}: {n}" for how, n in sorted(counts.items()))
        out += ["", f"**{row['method']}**: {len(layers)} adapted layers ({summary})"]
        if details:
            out += ["", "| layer | method | ran as |", "|---|---|---|"]
            out += [f"| {l['layer']} | {l['method']} | {_how(l)} |" for l in layers]
    if not out:
        return ""
    return "\n### Execution per layer\n" + "\n".join(out) + "\n"


def plot(profile: dict, path: Path) -> None:
    """A three-panel bar chart (step time, peak memory, trainable parameters), written
    atomically to ``path`` as PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = profile["rows"]
    names = [r["method"] for r in rows]
    memory_label = ("peak allocated memory (MiB)" if profile["peak_memory"] == "allocated"
                    else "peak RSS so far (MiB)")
    panels = [
        ("step time (ms)", [r["step_time_s"] and r["step_time_s"] * 1000 for r in rows]),
        (memory_label, [r["peak_memory_bytes"] and r["peak_memory_bytes"] / 2**20 for r in rows]),
        ("trainable parameters", [r["trainable_params"] for r in rows]),
    ]
    if any(r.get("launches") for r in rows):
        panels.append(("launches per step", [r["launches"]["step"]["launches"]
                                             if r.get("launches") else None for r in rows]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels) + 1, 4))
    for ax, (title, values) in zip(axes, panels):
        heights = [v or 0 for v in values]
        bars = ax.bar(names, heights, color=[f"C{i}" for i in range(len(names))])
        for bar, value in zip(bars, values):
            label = ("n/a" if value is None else f"{value:,.0f}" if value >= 1000
                     else f"{value:.1f}")
            ax.annotate(label,
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
        ax.set_title(title)
        ax.tick_params(axis="x", labelrotation=30)
    size = "x".join(map(str, profile["size"]))
    fig.suptitle(f"tenvoo-fast profile: {profile['preset']} UNet, {size}, "
                 f"{profile['steps']} steps, {profile['device']}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
