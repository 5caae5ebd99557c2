"""The paper's 3D DDPM fine-tuning as a training program (``tenvoo-fast finetune``).

A run builds the UNet of a preset (random or ``--base-weights``), chooses what trains (an adapter
method injected on the given targets, or a baseline that injects nothing: every parameter, the
biases, or the norms), trains it with the paper's DDPM objective on phantoms or NIfTI volumes
(ddpm-finetuning.md), and writes to its folder:

- ``metrics.json``: parameter counts, per-step losses, validation loss, step time, peak memory,
  backend and versions;
- ``adapter.safetensors`` (adapter methods) or ``trained.safetensors`` (baselines);
- ``state.pt``: optimizer state and step count, so ``--resume`` continues the run.

Launched by torchrun (``WORLD_SIZE`` > 1) it trains with DistributedDataParallel, each process on
its share of the volumes; only rank 0 reports and writes.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from . import autotune
from ._version import __version__
from .backends import available_backends, current_backend, use_backend
from .checkpoint import load_adapter, save_adapter
from .config import METHODS as ADAPTER_METHODS, AdapterConfig
from .data import training_volumes
from .errors import RunError, one_line
from .io import atomic_path, write_json_atomic
from .model import adapter_layers, count_parameters, execution_plan, inject, unwrap
from .strategy import current_strategy, use_strategy
from .unets import DEFAULT_SIZES, build_unet, downsampling_factor
from .weights import load_into

#: Methods that inject nothing: every parameter, only biases, only parameters named "norm".
BASELINES = ("full", "bias", "norm")
METHODS = BASELINES + ADAPTER_METHODS
#: The paper's noise schedule.
SCHEDULER = dict(num_train_timesteps=1000, schedule="scaled_linear_beta", beta_start=0.0005,
                 beta_end=0.0195)
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}
#: Optimizer steps left out of the median step time (allocator, kernel selection, autotuning).
WARMUP_STEPS = 2
#: Validation: each volume at this many evenly spaced timesteps, with noise fixed by the seed.
VAL_TIMESTEPS = 8
#: ``--profile`` records this many optimizer steps, after one warm-up step.
PROFILE_STEPS = 3

METRICS, ADAPTER, TRAINED, STATE = "metrics.json", "adapter.safetensors", "trained.safetensors", \
    "state.pt"
TRACE, PROFILE = "trace.json", "profile.txt"


def run(opts: argparse.Namespace) -> dict:
    """Fine-tune as ``opts`` (the ``tenvoo-fast finetune`` options) says; returns the metrics.

    Raises :class:`RunError` (or :class:`AdapterError`) for anything the user can fix, before
    training starts where it can be known then.
    """
    size = volume_size(opts.preset, opts.size)
    device = torch.device(opts.device)
    amp = opts.amp or ("bf16" if device.type == "cuda" else "none")
    if amp == "fp16" and device.type != "cuda":
        raise RunError("--amp fp16 needs a CUDA device (it trains with a gradient scaler); "
                       "use --amp bf16 or --amp none on the CPU")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world_size > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        with use_backend(getattr(opts, "backend", "auto")), \
                use_strategy(getattr(opts, "strategy", None) or "auto", strict=False):
            return _run(opts, size, amp, device, rank, world_size)
    finally:
        if world_size > 1:
            torch.distributed.destroy_process_group()


def volume_size(preset: str, size=None) -> tuple[int, ...]:
    """``size`` (D, H, W), or the preset's default; raises :class:`RunError` unless every side
    is a multiple of the UNet's downsampling factor."""
    size = tuple(size or DEFAULT_SIZES[preset])
    factor = downsampling_factor(preset)
    if any(side % factor for side in size):
        raise RunError(f"--size {' '.join(map(str, size))}: every side must be a multiple of "
                       f"{factor} for the {preset} UNet (it halves each side "
                       f"{int(math.log2(factor))} times)")
    return size


def base_unet(preset: str, base_weights: str | os.PathLike | None = None) -> nn.Module:
    """The base UNet a run fine-tunes: ``preset``'s UNet with the weights in ``base_weights``,
    or random weights (drawn from torch's global RNG: seed it first) with the output conv
    re-initialised. ``tenvoo-fast sample`` builds its base with this too."""
    model = build_unet(preset)
    if base_weights:
        load_into(model, base_weights, "--base-weights", f"the {preset} UNet")
    else:
        # MONAI zero-initialises the last conv (for training from scratch). Frozen at zero, as
        # in adapter fine-tuning of random base weights, it would stop every gradient.
        for module in model.out.modules():
            if isinstance(module, nn.Conv3d):
                module.reset_parameters()
    return model


def _run(opts, size, amp, device, rank, world_size) -> dict:
    out = Path(opts.out)
    main = rank == 0
    say = print if main else (lambda *args, **kwargs: None)
    identity = _run_identity(opts)
    state = _read_state(out, identity) if opts.resume else None
    train_set, val_set, data_description = training_volumes(
        size, opts.seed, data=opts.data, num_volumes=opts.num_volumes, spacing=opts.spacing)

    torch.manual_seed(opts.seed)  # the same base weights on every rank and on resume
    model = _build_model(opts, out if opts.resume else None)
    trainable, total = count_parameters(model), count_parameters(model, trainable_only=False)
    n_layers = len(adapter_layers(model))
    adapter = opts.method in ADAPTER_METHODS
    say(f"tenvoo-fast finetune: {opts.method}" + (f" (rank {opts.rank})" if adapter else "")
        + f" on the {opts.preset} UNet, {'x'.join(map(str, size))} volumes, {device}, "
          f"amp {amp}, {world_size} process(es)")
    say(f"data: {data_description}")
    say(f"parameters: {trainable:,} trainable of {total:,} total; {n_layers} adapted layers")
    say(f"backend: {current_backend()} (available: {', '.join(available_backends())})")
    metrics = dict(
        preset=opts.preset, size=list(size), method=opts.method, rank=identity["rank"],
        targets=identity["targets"], trainable=identity["trainable"], amp=amp, device=str(device),
        world_size=world_size, backend=current_backend(), strategy=current_strategy(),
        data=data_description,
        num_train=len(train_set), num_val=len(val_set), lr=opts.lr, batch_size=opts.batch_size,
        accum=opts.accum, seed=opts.seed, dry_run=opts.dry_run, trainable_params=trainable,
        total_params=total, adapted_layers=n_layers, versions=_versions())

    if opts.dry_run:
        metrics.update(steps=0, losses=[], val_loss=None, step_time_s=None, volumes_per_s=None,
                       peak_memory_bytes=_peak_memory_bytes(device))
        if main:
            write_json_atomic(out / METRICS, metrics)
        say(f"dry run: nothing trained; wrote {out / METRICS}")
        return metrics

    from monai.inferers import DiffusionInferer
    from monai.networks.schedulers import DDPMScheduler

    model.to(device)
    if world_size > 1:
        # Buffers (frozen adapter copies) never change, so they need no per-step broadcast.
        model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=opts.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    start, losses = 0, []
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        start, losses = state["step"], list(state["losses"])
    sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True,
                                 seed=opts.seed)
    loader = DataLoader(train_set, batch_size=opts.batch_size, sampler=sampler,
                        num_workers=opts.workers, persistent_workers=opts.workers > 0,
                        pin_memory=device.type == "cuda")
    steps = math.ceil(opts.epochs * len(loader) / opts.accum) if opts.epochs else opts.steps
    steps = max(steps, start)  # a resumed run never goes back
    inferer = DiffusionInferer(DDPMScheduler(**SCHEDULER))
    autocast = partial(torch.autocast, device.type, dtype=AMP_DTYPES[amp],
                       enabled=AMP_DTYPES[amp] is not None)
    # Noise and timesteps: distinct per rank, reproducible, and fresh after a resume.
    torch.manual_seed(_mix(opts.seed, rank, start))
    batches = _batches(loader, epoch=start * opts.accum // len(loader))
    say(f"training: optimizer steps {start} -> {steps}, batch {opts.batch_size} x accum "
        f"{opts.accum} x {world_size} process(es), Adam lr {opts.lr:g}")

    if getattr(opts, "autotune", False):
        _autotune(model, train_set, inferer, autocast, opts, device, say)
        metrics["autotune"] = autotune.decisions()

    times = []
    profiler = _profiler(out, device, steps - start, say) if opts.profile and main else None
    bar = _progress_bar(start, steps, enabled=main and sys.stderr.isatty())
    with profiler or nullcontext():
        for step in range(start + 1, steps + 1):
            synchronize(device)
            began = time.perf_counter()
            loss, volumes = _optimizer_step(model, batches, inferer, optimizer, scaler, autocast,
                                            opts.accum, device, world_size)
            synchronize(device)
            times.append(time.perf_counter() - began)
            losses.append(loss)
            memory = _peak_memory_bytes(device)
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4f}", vol_s=f"{volumes / times[-1]:.2f}",
                                mem=_gib(memory))
                bar.update()
            elif step % opts.log_every == 0 or step == steps:
                say(f"step {step}/{steps}  loss {loss:.4f}  {volumes / times[-1]:.2f} vol/s  "
                    f"peak memory {_gib(memory)}")
            if profiler is not None:
                profiler.step()
            if main and opts.save_every and step % opts.save_every == 0 and step < steps:
                _save(out, model, optimizer, scaler, step, losses, identity)
    if bar is not None:
        bar.close()
    if main and not all(math.isfinite(v) for v in losses):
        print("warning: non-finite loss; try a smaller --lr or --amp bf16", file=sys.stderr)

    step_time = statistics.median(times[WARMUP_STEPS:]) if len(times) > WARMUP_STEPS else None
    volumes_per_step = opts.batch_size * opts.accum * world_size
    val_loss = (_validation_loss(unwrap(model), val_set, inferer, autocast, device, opts.seed)
                if main else None)
    metrics.update(steps=steps, losses=losses, val_loss=val_loss, step_time_s=step_time,
                   volumes_per_s=volumes_per_step / step_time if step_time else None,
                   peak_memory_bytes=_peak_memory_bytes(device),
                   execution=execution_plan(model))
    say("validation loss: " + (
        f"{val_loss:.4f} ({len(val_set)} volume(s) x {VAL_TIMESTEPS} timesteps)"
        if val_loss is not None else "n/a (no validation volume)"))
    say(f"median step time (excluding {WARMUP_STEPS} warm-up steps): "
        + (f"{step_time * 1000:.1f} ms, {volumes_per_step / step_time:.2f} volumes/s"
           if step_time else "n/a (too few steps)")
        + f"; peak memory {_gib(metrics['peak_memory_bytes'])}"
        + (" (allocated)" if device.type == "cuda" else " (RSS)"))
    if main:
        weights = _save(out, model, optimizer, scaler, steps, losses, identity)
        write_json_atomic(out / METRICS, metrics)
        say(f"wrote {out / METRICS}, {out / weights}, {out / STATE}")
    return metrics


def _run_identity(opts) -> dict:
    """What a resumed run must share with the saved one: the model, what trains, the seed
    (which draws the random base weights and the data split)."""
    adapter = opts.method in ADAPTER_METHODS
    return {"preset": opts.preset, "method": opts.method,
            "rank": opts.rank if adapter else None,
            "targets": list(opts.targets) if adapter else None,
            "trainable": sorted(set(opts.trainable)) if adapter else None,
            "base_weights": str(Path(opts.base_weights).resolve()) if opts.base_weights else None,
            "seed": opts.seed}


def _build_model(opts, resume_from: Path | None) -> nn.Module:
    """The preset's UNet with base weights, adapters (or baseline trainables) and, when
    resuming, the trained weights from ``resume_from``."""
    model = base_unet(opts.preset, opts.base_weights)
    if opts.method in BASELINES:
        for name, p in model.named_parameters():
            p.requires_grad_(opts.method == "full"
                             or (opts.method == "bias" and name.rsplit(".", 1)[-1] == "bias")
                             or (opts.method == "norm" and "norm" in name.lower()))
        if resume_from is not None:
            _load_trained(model, resume_from / TRAINED)
    elif resume_from is not None:
        load_adapter(model, resume_from / ADAPTER)
    else:
        inject(model, AdapterConfig(method=opts.method, rank=opts.rank,
                                    target_modules=list(opts.targets),
                                    trainable=tuple(opts.trainable)))
    return model


def _load_trained(model: nn.Module, path: Path) -> None:
    """Copy a baseline's saved trained parameters into ``model``."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise RunError(f"--resume: {path} is missing; the run folder is incomplete")
    params = dict(model.named_parameters())
    tensors = load_file(path)
    trained = {n for n, p in params.items() if p.requires_grad}
    if set(tensors) != trained or any(params[n].shape != t.shape for n, t in tensors.items()):
        raise RunError(f"--resume: {path} does not hold this model's trainable parameters")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)


def _read_state(out: Path, identity: dict) -> dict:
    """The saved optimizer state and step of the run in ``out``; refuses another run's."""
    path = out / STATE
    if not path.is_file():
        raise RunError(f"--resume: {path} not found; start the run without --resume first")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RunError(f"--resume: {path} is not readable ({one_line(e)})") from e
    differences = [f"{key} (saved {state['run'].get(key)!r}, now {value!r})"
                   for key, value in identity.items() if state["run"].get(key) != value]
    if differences:
        raise RunError(f"--resume: the run in {out} was started with other options: "
                       f"{'; '.join(differences)}. Resume with the same options, or use another "
                       "--out")
    return state


def _save(out: Path, model, optimizer, scaler, step: int, losses: list, identity: dict) -> str:
    """Write the trained weights, then the optimizer state and step; returns the weights' name."""
    from safetensors.torch import save_file

    if identity["method"] in ADAPTER_METHODS:
        name = ADAPTER
        save_adapter(model, out / name)
    else:
        name = TRAINED
        tensors = {n: p.detach().cpu().contiguous() for n, p in unwrap(model).named_parameters()
                   if p.requires_grad}
        with atomic_path(out / name) as tmp:
            save_file(tensors, tmp, metadata={"method": identity["method"]})
    with atomic_path(out / STATE) as tmp:
        torch.save({"step": step, "losses": losses, "run": identity,
                    "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()}, tmp)
    return name


def _batches(loader: DataLoader, epoch: int):
    """Batches from ``loader`` forever, reshuffled each epoch (deterministically by epoch)."""
    while True:
        loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def _autotune(model, train_set, inferer, autocast, opts, device, say) -> None:
    """Time every backend and strategy on each adapted layer's input for one training-shaped
    batch (its own noise and timesteps, so the training stream is unchanged); cache the
    fastest for the run."""
    example = torch.as_tensor(train_set[0])
    images = example.unsqueeze(0).expand(opts.batch_size, *example.shape).to(device)
    gen = torch.Generator(device).manual_seed(opts.seed)
    noise = torch.randn(images.shape, generator=gen, device=device)
    timesteps = torch.randint(0, SCHEDULER["num_train_timesteps"], (images.shape[0],),
                              generator=gen, device=device)
    began = time.perf_counter()
    with autocast():
        chosen = autotune.tune(model, lambda: inferer(inputs=images, diffusion_model=model,
                                                      noise=noise, timesteps=timesteps))
    counts: dict[str, int] = {}
    for d in chosen:
        counts[d["choice"]] = counts.get(d["choice"], 0) + 1
    say(f"autotune: {len(chosen)} distinct layer shapes timed in "
        f"{time.perf_counter() - began:.1f} s; chose " +
        ", ".join(f"{c} for {n}" for c, n in sorted(counts.items())))


def _optimizer_step(model, batches, inferer, optimizer, scaler, autocast, accum, device,
                    world_size) -> tuple[float, int]:
    """One optimizer step over ``accum`` micro-batches: MSE between predicted and true noise at
    uniformly drawn timesteps. Returns the loss (mean over micro-batches and processes) and the
    number of volumes seen."""
    loss_sum, volumes = torch.zeros((), device=device), 0
    for micro in range(accum):
        images = next(batches).to(device, non_blocking=True)
        volumes += images.shape[0]
        # Under DDP, gradients are all-reduced only on the last micro-batch.
        last = micro == accum - 1
        with (nullcontext() if last or world_size == 1 else model.no_sync()):
            noise = torch.randn_like(images)
            timesteps = torch.randint(0, SCHEDULER["num_train_timesteps"], (images.shape[0],),
                                      device=device)
            with autocast():
                prediction = inferer(inputs=images, diffusion_model=model, noise=noise,
                                     timesteps=timesteps)
            loss = F.mse_loss(prediction.float(), noise)
            scaler.scale(loss / accum).backward()
        loss_sum += loss.detach()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    loss_mean = loss_sum / accum
    if world_size > 1:
        torch.distributed.all_reduce(loss_mean)
        loss_mean /= world_size
    return loss_mean.item(), volumes * world_size


@torch.no_grad()
def _validation_loss(model, val_set, inferer, autocast, device, seed) -> float | None:
    """Mean noise-prediction MSE over the validation volumes at ``VAL_TIMESTEPS`` evenly spaced
    timesteps, with noise fixed by ``seed`` so runs compare; None without validation volumes."""
    if len(val_set) == 0:
        return None
    generator = torch.Generator().manual_seed(seed)
    n = SCHEDULER["num_train_timesteps"]
    timesteps = [int((k + 0.5) * n / VAL_TIMESTEPS) for k in range(VAL_TIMESTEPS)]
    model.eval()
    losses = []
    for i in range(len(val_set)):
        image = val_set[i].unsqueeze(0).to(device)
        for t in timesteps:
            noise = torch.randn(image.shape, generator=generator).to(device)
            with autocast():
                prediction = inferer(inputs=image, diffusion_model=model, noise=noise,
                                     timesteps=torch.tensor([t], device=device))
            losses.append(F.mse_loss(prediction.float(), noise).item())
    model.train()
    return statistics.fmean(losses)


def _profiler(out: Path, device: torch.device, steps: int, say):
    """A torch profiler over ``PROFILE_STEPS`` optimizer steps after one warm-up step, which
    writes ``trace.json`` (Chrome trace) and ``profile.txt`` (top 15 ops by self time, memory
    peak) and prints a summary; None when there is no step to profile."""
    from torch.profiler import ProfilerActivity, profile, schedule

    if steps < 1:
        say("profile: no optimizer step to profile")
        return None
    warmup = 1 if steps > 1 else 0
    active = min(PROFILE_STEPS, steps - warmup)
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"

    def write(prof) -> None:
        events = prof.key_averages()
        peak = _peak_memory_bytes(device)
        with atomic_path(out / TRACE) as tmp:
            prof.export_chrome_trace(tmp)
        with atomic_path(out / PROFILE) as tmp, open(tmp, "w") as f:
            f.write(f"tenvoo-fast finetune --profile: {active} optimizer step(s) after {warmup} "
                    f"warm-up, on {device}\npeak memory: {_gib(peak)} "
                    f"({peak} bytes)\n\n{events.table(sort_by=sort_by, row_limit=15)}\n")
        top = sorted(events, key=lambda e: getattr(e, sort_by), reverse=True)[:5]
        say(f"profile ({active} steps): top ops by self time: " + ", ".join(
            f"{e.key} {getattr(e, sort_by) / 1000:.1f} ms" for e in top))
        say(f"wrote {out / TRACE} and {out / PROFILE}")

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    return profile(activities=activities, profile_memory=True, on_trace_ready=write,
                   schedule=schedule(wait=0, warmup=warmup, active=active, repeat=1))


def _progress_bar(start: int, steps: int, enabled: bool):
    """A tqdm bar on a terminal; None otherwise (then steps are logged as lines)."""
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=steps, initial=start, desc="finetune", unit="step")


def _mix(*values: int) -> int:
    """A well-mixed seed from several non-negative integers."""
    return int(np.random.SeedSequence(list(values)).generate_state(1)[0])


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock step times are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated GPU memory on CUDA; else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


def _gib(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


def _versions() -> dict:
    import monai
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version, "monai": monai.__version__,
            "tenvoo_fast": __version__}
