"""The largest volume a GPU memory budget fits, for the paper DDPM: bytes measured on the CPU,
the GPU's peak calibrated on the committed H100 runs.

    predicted peak(v) = resident + k x saved(v)

- resident: what the training step holds throughout, counted exactly after a forward:
  parameters, buffers and the adapters' cached tensors (T(θ0), held between steps), the
  trainable parameters' fp32 gradients and Adam's two fp32 moments;
- saved(v): the bytes autograd keeps for backward from one forward of the paper model under
  bf16 autocast at ``v`` voxels (batch 1), measured on the CPU with saved-tensor hooks
  (``tenvoo_fast.measure.SavedBytes``; the sizes are the device's, only the speed differs) at
  three volumes and fitted as a + b·v (least squares); with ``--checkpoint-activations`` the
  blocks' inputs (what the checkpoints keep, ``ddpm.activation_checkpoints``) plus the largest
  block's own saved tensors (held again while its backward recomputes it);
- k: one factor for what the GPU holds beyond the saved tensors at its peak (the backward's
  gradients in flight, cuDNN workspaces, the allocator's rounding), fitted to the committed
  H100 peaks (``max_memory_allocated``, paper preset at 128x128x96, 2026-11-24).

The volumes it prints are predictions, not GPU measurements. Volumes keep the paper's
128:128:96 aspect in steps of (32, 32, 24) voxels, what the UNet's four downsamplings need.

    python benchmarks/memory_model.py [--out DIR]
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
from pathlib import Path

import torch

import tenvoo_fast as tf
from tenvoo_fast.ddpm.activation_checkpoints import BLOCKS, checkpoint_blocks
from tenvoo_fast.ddpm.run_options import FinetuneOptions
from tenvoo_fast.ddpm.system import versions
from tenvoo_fast.ddpm.unets import build_unet
from tenvoo_fast.files import atomic_path, write_json_atomic
from tenvoo_fast.measure import SavedBytes, held_by
from tenvoo_fast.model import AdapterConfig, inject

ROOT = Path(__file__).resolve().parent
H100_PROFILE = ROOT / "results" / "h100-2026-11-24" / "paper-profile" / "profile.json"
METHODS = ("full", "tenvoo-l", "tenvoo-q")
#: Volumes measured on the CPU (sides the UNet's downsamplings accept).
MEASURED_VOLUMES = ((32, 32, 32), (64, 64, 64), (64, 64, 96))
PAPER_VOLUME = (128, 128, 96)
STEP = (32, 32, 24)
BUDGETS_GIB = (16, 24, 40, 80)
GIB = 2 ** 30


def build(method: str, checkpointed: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_unet("paper")
    if method != "full":
        defaults = FinetuneOptions()
        inject(model, AdapterConfig(method=method, rank=4, target_modules=list(defaults.targets),
                                    trainable=tuple(defaults.trainable)))
    if checkpointed:
        checkpoint_blocks(model)
    return model


def resident_bytes(model: torch.nn.Module) -> int:
    """Held between steps, plus the trainable parameters' gradients and Adam's moments."""
    seen, total = set(), 0
    for t in held_by(model):
        key = (t.untyped_storage().data_ptr(), t.dtype, t.shape)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total + 3 * 4 * trainable


def saved_bytes(model: torch.nn.Module, volume: tuple) -> tuple[int, list[int]]:
    """(bytes saved for backward by one forward at ``volume``, the bytes each block of the
    UNet adds: what a checkpointed block holds again while its backward recomputes it)."""
    blocks = []
    for name in BLOCKS:
        found = getattr(model, name)
        blocks += list(found) if isinstance(found, torch.nn.ModuleList) else [found]
    per_block, handles, start = [0] * len(blocks), [], {}

    def before(block, *_):
        start[block] = saved.so_far

    def after(i):
        def hook(block, *_):
            per_block[i] = saved.so_far - start.pop(block)
        return hook
    for i, block in enumerate(blocks):
        handles += [block.register_forward_pre_hook(before),
                    block.register_forward_hook(after(i))]
    try:
        # Merged, as auto runs every paper-model layer on a GPU (benchmarks/auto_choices.py);
        # on the CPU auto would run the deep layers factorized, which saves other tensors.
        with tf.use_backend("torch"), tf.use_strategy("merged", strict=False), \
                torch.autocast("cpu", torch.bfloat16), SavedBytes(held_by(model)) as saved:
            model(torch.randn(1, 1, *volume), torch.tensor([10]))
    finally:
        for h in handles:
            h.remove()
    return saved.bytes, per_block


class Linear:
    """Least-squares a + b·v through (voxels, bytes) points: the saved tensors are the weights'
    casts plus activations proportional to the voxels (``residual``: the largest relative miss
    on the points)."""

    def __init__(self, points: list[tuple[int, int]]):
        v = torch.tensor([[1.0, p[0]] for p in points], dtype=torch.float64)
        y = torch.tensor([[float(p[1])] for p in points], dtype=torch.float64)
        self.a, self.b = torch.linalg.lstsq(v, y).solution.flatten().tolist()
        self.residual = max(abs(self(v) / b - 1) for v, b in points)

    def __call__(self, voxels: int) -> float:
        return self.a + self.b * voxels


class Checkpointed:
    """What checkpointed blocks keep (their inputs, and what runs outside the blocks), plus the
    largest block's saved tensors, held again while its backward recomputes it: which block
    that is depends on the volume (weights dominate small ones, activations large ones)."""

    def __init__(self, kept: Linear, blocks: list[Linear]):
        self.kept, self.blocks = kept, blocks
        self.residual = max([kept.residual] + [b.residual for b in blocks])

    def __call__(self, voxels: int) -> float:
        return self.kept(voxels) + max(b(voxels) for b in self.blocks)


def largest(resident: int, saved, k: float, budget: int) -> tuple[int, int, int] | None:
    """The largest volume of the paper's aspect whose predicted peak fits ``budget`` bytes."""
    best = None
    for n in range(1, 64):
        volume = tuple(n * s for s in STEP)
        if resident + k * saved(math.prod(volume)) > budget:
            break
        best = volume
    return best


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    measured = json.loads(H100_PROFILE.read_text())
    h100_peak = {r["method"]: r["peak_memory_bytes"] for r in measured["rows"]}
    rows = {}
    voxels = [math.prod(v) for v in MEASURED_VOLUMES]
    for method in METHODS:
        plain = [saved_bytes(build(method, False), v) for v in MEASURED_VOLUMES]
        model = build(method, True)
        kept = [saved_bytes(model, v)[0] for v in MEASURED_VOLUMES]
        resident = resident_bytes(model)
        blocks = [Linear([(v, p[1][i]) for v, p in zip(voxels, plain)])
                  for i in range(len(plain[0][1]))]
        rows[(method, False)] = dict(
            resident=resident, saved=Linear([(v, p[0]) for v, p in zip(voxels, plain)]),
            measured=[p[0] for p in plain])
        rows[(method, True)] = dict(
            resident=resident, saved=Checkpointed(Linear(list(zip(voxels, kept))), blocks),
            measured=kept)
        print(method, {k: v for k, v in rows[(method, False)].items() if k != "saved"},
              flush=True)
    paper_voxels = math.prod(PAPER_VOLUME)
    # One k for all: the least-squares ratio of (measured peak - resident) to saved bytes.
    pairs = [(h100_peak[m] - rows[(m, False)]["resident"],
              rows[(m, False)]["saved"](paper_voxels)) for m in METHODS]
    k = sum(p * s for p, s in pairs) / sum(s * s for _, s in pairs)
    table = ["| method | activation checkpoints | resident (GiB) | saved for backward at "
             "128x128x96 (GiB, CPU-measured fit) | predicted peak at 128x128x96 (GiB) | "
             "measured H100 peak (GiB) | " + " | ".join(f"largest volume in {b} GiB"
                                                         for b in BUDGETS_GIB) + " |",
             "|---|---|---:|---:|---:|---:|" + "---|" * len(BUDGETS_GIB)]
    out_rows = []
    for (method, checkpointed), r in rows.items():
        saved = r["saved"](paper_voxels)
        peak = r["resident"] + k * saved
        fits = {b: largest(r["resident"], r["saved"], k, b * GIB) for b in BUDGETS_GIB}
        measured_peak = None if checkpointed else h100_peak[method]
        table.append(
            f"| {method} | {'yes' if checkpointed else 'no'} | {r['resident'] / GIB:.2f} | "
            f"{saved / GIB:.2f} | {peak / GIB:.2f} | "
            + (f"{measured_peak / GIB:.2f}" if measured_peak else "not measured") + " | "
            + " | ".join("x".join(map(str, v)) if v else "none" for v in fits.values()) + " |")
        out_rows.append(dict(method=method, checkpoint_activations=checkpointed,
                             resident_bytes=r["resident"],
                             measured_saved=dict(zip(map(str, MEASURED_VOLUMES), r["measured"])),
                             saved_at_paper_volume=saved, fit_residual=r["saved"].residual,
                             predicted_peak_bytes=peak,
                             kept_by_checkpoints_at_paper_volume=(
                                 r["saved"].kept(paper_voxels) if checkpointed else None),
                             largest_block_at_paper_volume=(
                                 max(b(paper_voxels) for b in r["saved"].blocks)
                                 if checkpointed else None),
                             measured_h100_peak_bytes=measured_peak,
                             largest_volume={str(b): v for b, v in fits.items()}))
    text = "\n".join(table)
    print(f"k = {k:.3f}\n{text}")
    result = dict(k=k, rows=out_rows, measured_volumes=MEASURED_VOLUMES, step=STEP,
                  h100_profile=str(H100_PROFILE.relative_to(ROOT.parent)), versions=versions(),
                  date=_dt.date.today().isoformat(), command="python benchmarks/memory_model.py")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out / "memory-model.json", result)
        with atomic_path(args.out / "memory-model.md") as tmp:
            Path(tmp).write_text(  # noqa: E128
            f"Predicted from CPU-measured bytes, calibrated on the H100 peaks (k = {k:.3f}); "
            f"not GPU measurements. {result['command']}, {result['date']}.\n\n{text}\n")
    return result


if __name__ == "__main__":
    main()
