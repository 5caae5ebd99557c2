"""The paper's 3D DDPM fine-tuning as a training program (``tenvoo-fast finetune``).

A run builds the UNet of a preset (random or ``--base-weights``), chooses what trains (an adapter
method injected on the given targets, or a baseline that injects nothing: every parameter, the
biases, or the norms), trains it with the paper's DDPM objective on phantoms or NIfTI volumes
(ddpm-finetuning.md), and writes to its folder:

- ``metrics.json``: parameter counts, per-step losses, validation loss, step time, peak memory,
  backend and versions (also at each checkpoint, with ``status``);
- ``adapter.safetensors`` (adapter methods) or ``trained.safetensors`` (baselines): the weights
  of the latest checkpoint;
- ``checkpoint.json`` and ``checkpoints/step-*/``: the latest checkpoint (weights and
  ``state.pt``: optimizer, scaler, step, losses, every RNG state), published atomically
  (:mod:`tenvoo_fast.run_checkpoint`) every ``--save-every`` steps or
  ``--save-every-minutes``, on SIGTERM/SIGINT and at the end; ``--resume`` continues from it
  exactly as the uninterrupted run would have gone on.

Launched by torchrun (``WORLD_SIZE`` > 1) it trains with DistributedDataParallel, each process on
its share of the volumes; only rank 0 reports and writes.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import signal
import statistics
import sys
import threading
import time
import warnings
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from . import autotune, run_checkpoint
from ._version import __version__
from .backends import available_backends, current_backend, use_backend
from .checkpoint import BaseMismatchWarning, load_adapter, save_adapter
from .config import METHODS as ADAPTER_METHODS, AdapterConfig
from .data import training_volumes
from .errors import RunError, one_line
from .io import atomic_path, check_writable_folder, write_json_atomic
from .model import (adapter_layers, adapter_memory, available_memory, count_parameters,
                    execution_plan, inject, unwrap)
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
#: Default checkpoint interval: every this many optimizer steps, or this many minutes, whichever
#: comes first (and on SIGTERM/SIGINT, and at the end).
SAVE_EVERY_STEPS = 500
SAVE_EVERY_MINUTES = 10.0
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
    if opts.spacing and not opts.data:
        raise RunError("--spacing resamples NIfTI volumes and needs --data DIR; the synthetic "
                       "phantoms are generated at --size")
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
    identity = _run_identity(opts, size, amp, world_size)
    if main:
        _prepare_out(out, opts)
    if world_size > 1:
        torch.distributed.barrier()  # rank 0 has checked and cleaned the folder
    state = _read_state(out, identity, world_size) if opts.resume else None
    train_set, val_set, data_description = training_volumes(
        size, opts.seed, data=opts.data, num_volumes=opts.num_volumes, spacing=opts.spacing)

    torch.manual_seed(opts.seed)  # the same base weights on every rank and on resume
    model = _build_model(opts, state)
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
        total_params=total, adapted_layers=n_layers, versions=versions())

    if opts.dry_run:
        metrics.update(steps=0, losses=[], val_loss=None, step_time_s=None, volumes_per_s=None,
                       peak_memory_bytes=_peak_memory_bytes(device), status="dry run")
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
    # Noise and timesteps come from their own generator (distinct per rank); the data order
    # from the sampler's seed and epoch and the position in the epoch. Both are checkpointed,
    # so a resumed run draws exactly what the uninterrupted one would have.
    noise_rng = torch.Generator(device).manual_seed(_mix(opts.seed, rank))
    run = dict(step=0, losses=[], lr_history=[[1, opts.lr]])
    if state is not None:
        run = _restore(state, rank, optimizer, scaler, noise_rng, opts.lr, say)
    start = run["step"]
    sampler = PositionedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True,
                                seed=opts.seed)
    loader = DataLoader(train_set, batch_size=opts.batch_size, sampler=sampler,
                        num_workers=opts.workers, persistent_workers=opts.workers > 0,
                        pin_memory=device.type == "cuda", worker_init_fn=_ignore_sigint,
                        generator=torch.Generator().manual_seed(_mix(opts.seed, rank, 1)))
    steps = math.ceil(opts.epochs * len(loader) / opts.accum) if opts.epochs else opts.steps
    steps = max(steps, start)  # a resumed run never goes back
    inferer = DiffusionInferer(DDPMScheduler(**SCHEDULER))
    autocast = partial(torch.autocast, device.type, dtype=AMP_DTYPES[amp],
                       enabled=AMP_DTYPES[amp] is not None)
    batches = _batches(loader, consumed=start * opts.accum)
    say(f"training: optimizer steps {start} -> {steps}, batch {opts.batch_size} x accum "
        f"{opts.accum} x {world_size} process(es), Adam lr {opts.lr:g}")
    say("checkpoints: " + _describe_interval(opts) + f", and on SIGTERM/SIGINT, into {out}")

    if getattr(opts, "autotune", False):
        _autotune(model, train_set, inferer, autocast, opts, device, say)
        metrics["autotune"] = autotune.decisions()

    base_origin = {"preset": opts.preset, "seed": opts.seed,
                   "base_weights": identity["base_weights"]}

    def checkpoint(step: int, status: str) -> None:
        """Save step ``step`` as one checkpoint (all ranks take part: RNG states are gathered)."""
        _check_finite_parameters(model, step, out)
        rng = _rng_states(noise_rng)
        ranks = [rng]
        if world_size > 1:
            ranks = [None] * world_size
            torch.distributed.all_gather_object(ranks, rng)
        if main:
            run.update(step=step, rng=ranks)
            _save(out, model, optimizer, scaler, run, identity, base_origin)
            metrics.update(steps=step, losses=run["losses"], status=status,
                           lr_history=run["lr_history"])
            write_json_atomic(out / METRICS, metrics)

    times = []
    stopper = _Stopper(opts, device, world_size)
    profiler = _profiler(out, device, steps - start, say) if opts.profile and main else None
    bar = _progress_bar(start, steps, enabled=main and sys.stderr.isatty())
    stopped = None
    try:
        with stopper, profiler or nullcontext():
            for step in range(start + 1, steps + 1):
                synchronize(device)
                began = time.perf_counter()
                try:
                    loss, volumes = _optimizer_step(model, batches, inferer, optimizer, scaler,
                                                    autocast, opts.accum, device, world_size,
                                                    noise_rng)
                except NonFiniteLoss as e:
                    raise RunError(_non_finite_message(e, step, model, out)) from None
                synchronize(device)
                times.append(time.perf_counter() - began)
                run["losses"].append(loss)
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
                save_due, signum = stopper.poll(step)
                if signum is not None and step < steps:
                    stopped = signum
                    checkpoint(step, f"interrupted by {signal.Signals(signum).name}")
                    break
                if save_due and step < steps:
                    checkpoint(step, "running")
                    stopper.saved()
    finally:
        if bar is not None:
            bar.close()
    if stopped is not None:
        name = signal.Signals(stopped).name
        say(f"{name} at step {step}/{steps}: checkpoint saved in {out}; continue with the same "
            "command and --resume")
        raise Interrupted(128 + stopped)

    checkpoint(steps, "trained; validating")
    step_time = statistics.median(times[WARMUP_STEPS:]) if len(times) > WARMUP_STEPS else None
    volumes_per_step = opts.batch_size * opts.accum * world_size
    val_loss = (_validation_loss(unwrap(model), val_set, inferer, autocast, device, opts.seed)
                if main else None)
    metrics.update(val_loss=val_loss, step_time_s=step_time, lr_history=run["lr_history"],
                   volumes_per_s=volumes_per_step / step_time if step_time else None,
                   peak_memory_bytes=_peak_memory_bytes(device),
                   execution=execution_plan(model), status="finished")
    say("validation loss: " + (
        f"{val_loss:.4f} ({len(val_set)} volume(s) x {VAL_TIMESTEPS} timesteps)"
        if val_loss is not None else "n/a (no validation volume)"))
    say(f"median step time (excluding {WARMUP_STEPS} warm-up steps): "
        + (f"{step_time * 1000:.1f} ms, {volumes_per_step / step_time:.2f} volumes/s"
           if step_time else "n/a (too few steps)")
        + f"; peak memory {_gib(metrics['peak_memory_bytes'])}"
        + (" (allocated)" if device.type == "cuda" else " (RSS)"))
    if main:
        write_json_atomic(out / METRICS, metrics)
        say(f"wrote {out / METRICS}, {out / _weights_name(identity)} and the checkpoint of step "
            f"{steps} ({out / run_checkpoint.MANIFEST})")
    return metrics


class Interrupted(Exception):
    """The run stopped on a signal after saving a checkpoint; ``code`` is the exit status."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


class NonFiniteLoss(Exception):
    """An optimizer step's loss was NaN or infinite; raised before the optimizer step."""

    def __init__(self, loss: float, batch_finite: bool):
        super().__init__(loss)
        self.loss, self.batch_finite = loss, batch_finite


class PositionedSampler(DistributedSampler):
    """A DistributedSampler that can start an epoch part-way (after ``skip`` indices), so a
    resumed run continues the data order exactly where the checkpoint left it."""

    skip = 0

    def __iter__(self):
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0
        return iter(indices[skip:])


def _ignore_sigint(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C to the main process, which checkpoints and then stops
    them (a worker that died of it would take the batch in flight with it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _Stopper:
    """When to checkpoint: every ``--save-every`` steps, every ``--save-every-minutes``, and on
    SIGTERM/SIGINT (noted by a handler, acted on after the step in flight). Under DDP rank 0's
    clock and any rank's signal decide for all ranks (one small all-reduce per step)."""

    def __init__(self, opts, device, world_size):
        self.every = opts.save_every
        self.seconds = opts.save_every_minutes * 60
        self.device, self.world_size = device, world_size
        self.signum = None
        self.last = time.monotonic()
        self.previous = {}

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        # A second signal acts at once (checkpoints are atomic, so that is safe).
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

    def poll(self, step: int) -> tuple[bool, int | None]:
        due = bool(self.every and step % self.every == 0) or bool(
            self.seconds and time.monotonic() - self.last >= self.seconds)
        signum = self.signum
        if self.world_size > 1:
            flags = torch.tensor([int(due), signum or 0], device=self.device)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            due, signum = bool(flags[0]), int(flags[1]) or None
        return due, signum

    def saved(self) -> None:
        self.last = time.monotonic()


def _describe_interval(opts) -> str:
    parts = []
    if opts.save_every:
        parts.append(f"every {opts.save_every} steps")
    if opts.save_every_minutes:
        parts.append(f"every {opts.save_every_minutes:g} minutes")
    return (" and ".join(parts) if parts else "none during training") + ", at the end"


def _weights_name(identity: dict) -> str:
    return ADAPTER if identity["method"] in ADAPTER_METHODS else TRAINED


def _prepare_out(out: Path, opts) -> None:
    """Check ``--out`` can take the run before anything trains: a writable folder (created if
    missing), not another run's unless resuming or ``--overwrite``; remove what a killed
    checkpoint write left there."""
    check_writable_folder(out, "--out")
    manifest = run_checkpoint.read_manifest(out) if out.is_dir() else None
    if manifest is not None and not opts.resume:
        if not getattr(opts, "overwrite", False):
            raise RunError(f"--out {out} holds a run (checkpoint of step {manifest['step']}); "
                           "continue it with --resume, replace it with --overwrite, or choose "
                           "another --out")
        # Replaced as asked: a later --resume must not find the old run's checkpoint.
        run_checkpoint.remove(out)
        manifest = None
    if opts.resume and manifest is None:
        legacy = (out / STATE).is_file()
        raise RunError(f"--resume: {out / run_checkpoint.MANIFEST} not found; "
                       + ("this run was saved by an older tenvoo_fast without RNG states, "
                          "so it cannot resume exactly: start it again" if legacy else
                          "start the run without --resume first"))
    removed = run_checkpoint.clean_stale(out)
    if removed:
        print(f"note: removed {len(removed)} leftover(s) of an interrupted checkpoint write in "
              f"{out} (e.g. {removed[0].name})", file=sys.stderr)


def _run_identity(opts, size, amp, world_size) -> dict:
    """What a resumed run must share with the saved one to continue it exactly: the model,
    what trains, the seed (base weights, data split, noise), the data and how it is batched."""
    adapter = opts.method in ADAPTER_METHODS
    return {"preset": opts.preset, "method": opts.method,
            "rank": opts.rank if adapter else None,
            "targets": list(opts.targets) if adapter else None,
            "trainable": sorted(set(opts.trainable)) if adapter else None,
            "base_weights": str(Path(opts.base_weights).resolve()) if opts.base_weights else None,
            "seed": opts.seed, "size": list(size),
            "data": str(Path(opts.data).resolve()) if opts.data else None,
            "num_volumes": None if opts.data else opts.num_volumes,
            "spacing": list(opts.spacing) if opts.spacing else None,
            "batch_size": opts.batch_size, "accum": opts.accum, "amp": amp,
            "world_size": world_size}


#: The option that sets each identity entry, for the refusal message.
_IDENTITY_FLAGS = {"preset": "--preset", "method": "--method", "rank": "--rank",
                   "targets": "--targets", "trainable": "--trainable",
                   "base_weights": "--base-weights", "seed": "--seed", "size": "--size",
                   "data": "--data", "num_volumes": "--num-volumes", "spacing": "--spacing",
                   "batch_size": "--batch-size", "accum": "--accum", "amp": "--amp",
                   "world_size": "the number of processes"}


def _build_model(opts, state: dict | None) -> nn.Module:
    """The preset's UNet with base weights, adapters (or baseline trainables) and, when
    resuming, the trained weights of the checkpoint ``state`` came from."""
    model = base_unet(opts.preset, opts.base_weights)
    folder = state["folder"] if state is not None else None
    if opts.method in BASELINES:
        for name, p in model.named_parameters():
            p.requires_grad_(opts.method == "full"
                             or (opts.method == "bias" and name.rsplit(".", 1)[-1] == "bias")
                             or (opts.method == "norm" and "norm" in name.lower()))
        if folder is not None:
            _load_trained(model, folder / TRAINED)
    elif folder is not None:
        _load_checkpoint_adapter(model, folder / ADAPTER, opts)
    else:
        config = AdapterConfig(method=opts.method, rank=opts.rank,
                               target_modules=list(opts.targets),
                               trainable=tuple(opts.trainable))
        if not opts.dry_run:
            _check_training_memory(model, config, opts)
        inject(model, config)
    return model


def _check_training_memory(model, config: AdapterConfig, opts) -> None:
    """Refuse, before building them, adapters whose training state does not fit the device:
    each core also has a gradient and Adam's two moments (4x the cores) beside the frozen
    copies. (``inject`` itself checks only what building allocates.)"""
    cores, frozen = adapter_memory(model, config)
    need = 4 * cores + frozen
    device = torch.device(opts.device)
    free = available_memory(device)
    if free is not None and need > free:
        raise RunError(f"--rank {opts.rank}: training these adapters needs about "
                       f"{need / 2**30:.1f} GiB on {device} (cores, their gradients and Adam's "
                       f"two moments, frozen copies) but only {free / 2**30:.1f} GiB are free; "
                       "use a smaller --rank or fewer --targets")


def _load_checkpoint_adapter(model, path: Path, opts) -> None:
    """Load the checkpoint's adapter, warning (or with ``--strict-base`` refusing) when the base
    weights differ from those it was trained on."""
    mode = "error" if getattr(opts, "strict_base", False) else "warn"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", BaseMismatchWarning)
        load_adapter(model, path, base_mismatch=mode)
    for w in caught:
        if issubclass(w.category, BaseMismatchWarning):
            print(f"warning: --resume: {one_line(w.message)}; pass --strict-base to make this an "
                  "error", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _load_trained(model: nn.Module, path: Path) -> None:
    """Copy a baseline's saved trained parameters into ``model``."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise RunError(f"--resume: {path} is missing; the run folder is incomplete")
    params = dict(model.named_parameters())
    try:
        tensors = load_file(path)
    except Exception as e:
        raise RunError(f"--resume: {path} is not a readable safetensors file ({one_line(e)})"
                       ) from e
    trained = {n for n, p in params.items() if p.requires_grad}
    if set(tensors) != trained or any(params[n].shape != t.shape for n, t in tensors.items()):
        raise RunError(f"--resume: {path} does not hold this model's trainable parameters")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)


#: What a checkpoint's state.pt holds.
STATE_KEYS = {"format", "step", "losses", "lr_history", "run", "optimizer", "scaler", "rng"}
STATE_FORMAT = "tenvoo_fast.finetune_state/1"


def _read_state(out: Path, identity: dict, world_size: int) -> dict:
    """The state of the latest checkpoint in ``out``; refuses another run's, or one started
    with options that would make the continuation differ from the uninterrupted run."""
    manifest = run_checkpoint.read_manifest(out)
    folder = run_checkpoint.checkpoint_folder(out, manifest)
    path = folder / STATE
    if not path.is_file():
        raise RunError(f"--resume: {path} is missing; the checkpoint was changed by hand")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RunError(f"--resume: {path} is not readable ({one_line(e)})") from e
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT \
            or not STATE_KEYS <= set(state):
        raise RunError(f"--resume: {path} is not a tenvoo-fast finetune state "
                       f"(expected {STATE_FORMAT}); restore the run folder or start afresh")
    if state["step"] != manifest["step"]:
        raise RunError(f"--resume: {path} is of step {state['step']} but the manifest says "
                       f"{manifest['step']}; the checkpoint was changed by hand")
    differences = [f"{_IDENTITY_FLAGS[key]} (saved {state['run'].get(key)!r}, now {value!r})"
                   for key, value in identity.items() if state["run"].get(key) != value]
    if differences:
        raise RunError(f"--resume: the run in {out} was started with other options: "
                       f"{'; '.join(differences)}. Resume with the same options (only --steps, "
                       "--epochs, --lr and how it runs may change), or use another --out")
    state["folder"] = folder
    return state


def _restore(state: dict, rank: int, optimizer, scaler, noise_rng, lr: float, say) -> dict:
    """Put the optimizer, scaler and RNG states of a checkpoint back; apply a changed ``lr``
    to the restored optimizer (and record it). Returns the run's bookkeeping."""
    optimizer.load_state_dict(state["optimizer"])
    if state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    _set_rng_states(state["rng"][rank], noise_rng)
    run = {"step": state["step"], "losses": list(state["losses"]),
           "lr_history": [list(x) for x in state["lr_history"]]}
    previous = run["lr_history"][-1][1]
    if lr != previous:
        for group in optimizer.param_groups:
            group["lr"] = lr
        run["lr_history"].append([state["step"] + 1, lr])
        say(f"resume: Adam lr {lr:g} from step {state['step'] + 1} (it was {previous:g}); "
            "recorded in metrics.json (lr_history)")
    return run


def _rng_states(noise_rng: torch.Generator) -> dict:
    """Every RNG a step draws from, as tensors and lists (loadable with weights_only=True):
    the noise/timestep generator, and torch's, numpy's and Python's global ones."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"noise": noise_rng.get_state(), "torch": torch.get_rng_state(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                      float(gauss)],
            "python": [version, list(internal), gauss_next]}


def _set_rng_states(rng: dict, noise_rng: torch.Generator) -> None:
    noise_rng.set_state(rng["noise"])
    torch.set_rng_state(rng["torch"])
    kind, keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = rng["python"]
    random.setstate((version, tuple(internal), gauss_next))


def _save(out: Path, model, optimizer, scaler, run: dict, identity: dict,
          base_origin: dict) -> None:
    """Publish the checkpoint of ``run['step']``: the trained weights and state.pt in one
    step folder (run_checkpoint), the weights also at the top of ``out``."""
    from safetensors.torch import save_file

    name = _weights_name(identity)

    def write(folder: Path) -> list[str]:
        if name == ADAPTER:
            save_adapter(model, folder / name, base_origin=base_origin)
        else:
            tensors = {n: p.detach().cpu().contiguous()
                       for n, p in unwrap(model).named_parameters() if p.requires_grad}
            save_file(tensors, folder / name, metadata={"method": identity["method"]})
        torch.save({"format": STATE_FORMAT, "step": run["step"], "losses": run["losses"],
                    "lr_history": run["lr_history"], "run": identity,
                    "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                    "rng": run["rng"]}, folder / STATE)
        return [name, STATE]

    run_checkpoint.publish(out, run["step"], write, top_level=[name])


def _check_finite_parameters(model, step: int, out: Path) -> None:
    """Refuse to checkpoint non-finite trained parameters (the last good checkpoint stays)."""
    bad = [n for n, p in unwrap(model).named_parameters()
           if p.requires_grad and not bool(torch.isfinite(p).all())]
    if bad:
        raise RunError(f"step {step}: the update made {len(bad)} trained tensor(s) non-finite "
                       f"(e.g. {bad[0]}), so nothing was saved; {_last_good(out)}; try a smaller "
                       "--lr")


def _last_good(out: Path) -> str:
    manifest = run_checkpoint.read_manifest(out) if out.is_dir() else None
    if manifest is None:
        return "no checkpoint was saved before"
    return (f"the last good checkpoint (step {manifest['step']}) is kept in {out}: continue from "
            "it with --resume")


def _non_finite_message(e: NonFiniteLoss, step: int, model, out: Path) -> str:
    params_finite = all(bool(torch.isfinite(p).all()) for p in unwrap(model).parameters())
    if not e.batch_finite:
        cause = ("the batch holds NaN or Inf voxels (the data); the parameters are finite")
        fix = "fix or remove the volume"
    elif not params_finite:
        cause = "the parameters are non-finite (an earlier update diverged)"
        fix = "resume with a smaller --lr"
    else:
        cause = ("the batch and the parameters are finite, so the forward or backward pass "
                 "overflowed")
        fix = "resume with a smaller --lr, or --amp none"
    return (f"step {step}: the loss is {e.loss} ({cause}); the run stopped before the "
            f"optimizer step and saved nothing; {_last_good(out)}; {fix}")


def _batches(loader: DataLoader, consumed: int):
    """Batches from ``loader`` forever, reshuffled each epoch (deterministically by epoch),
    starting after the first ``consumed`` batches."""
    epoch, offset = divmod(consumed, len(loader))
    while True:
        loader.sampler.set_epoch(epoch)
        loader.sampler.skip = offset * loader.batch_size
        offset = 0
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
                    world_size, noise_rng) -> tuple[float, int]:
    """One optimizer step over ``accum`` micro-batches: MSE between predicted and true noise at
    uniformly drawn timesteps. Returns the loss (mean over micro-batches and processes) and the
    number of volumes seen; raises :class:`NonFiniteLoss` before the optimizer step when the
    loss is not finite."""
    loss_sum, volumes, seen = torch.zeros((), device=device), 0, []
    for micro in range(accum):
        batch = next(batches)
        seen.append(batch)
        images = batch.to(device, non_blocking=True)
        volumes += images.shape[0]
        # Under DDP, gradients are all-reduced only on the last micro-batch.
        last = micro == accum - 1
        with (nullcontext() if last or world_size == 1 else model.no_sync()):
            noise = torch.randn(images.shape, generator=noise_rng, device=device,
                                dtype=images.dtype)
            timesteps = torch.randint(0, SCHEDULER["num_train_timesteps"], (images.shape[0],),
                                      generator=noise_rng, device=device)
            with autocast():
                prediction = inferer(inputs=images, diffusion_model=model, noise=noise,
                                     timesteps=timesteps)
            loss = F.mse_loss(prediction.float(), noise)
            scaler.scale(loss / accum).backward()
        loss_sum += loss.detach()
    loss_mean = loss_sum / accum
    if world_size > 1:
        torch.distributed.all_reduce(loss_mean)
        loss_mean /= world_size
    value = loss_mean.item()
    if not math.isfinite(value):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLoss(value, all(bool(torch.isfinite(b).all()) for b in seen))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return value, volumes * world_size


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


def versions() -> dict:
    """The versions of what a run's numbers depend on, for metrics and profiles."""
    import monai
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version, "monai": monai.__version__,
            "tenvoo_fast": __version__}
