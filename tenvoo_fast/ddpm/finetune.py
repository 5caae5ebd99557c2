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
  (:mod:`.run_checkpoint`, :mod:`.run_state`) every ``--save-every`` steps or
  ``--save-every-minutes``, on SIGTERM/SIGINT and at the end; ``--resume`` continues from it
  exactly as the uninterrupted run would have gone on.

Launched by torchrun (``WORLD_SIZE`` > 1) it trains with DistributedDataParallel, each process on
its share of the volumes; only rank 0 reports and writes.
"""
from __future__ import annotations

import dataclasses
import math
import os
import signal
import statistics
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ..dispatch import (autotune, available_backends, current_backend, current_strategy,
                        current_weight_policy, use_backend, use_launch_cost, use_strategy,
                        use_weight_policy)
from ..errors import RunError, one_line
from ..files import write_json_atomic
from ..model import (AdapterConfig, BaseMismatchWarning, adapter_layers, adapter_memory,
                     available_memory, count_parameters, execution_plan, fold_frozen,
                     folded_layers, inject, load_adapter,
                     unwrap)
from ..model.config import METHODS as ADAPTER_METHODS
from ..measure import SavedBytes, held_by
from . import run_checkpoint
from .activation_checkpoints import checkpoint_blocks
from .data import training_volumes
from .launch_count import counting, summary as launch_summary
from .profiler import step_profiler
from .recipes import RECIPES, Recipe, batches_before, micro_batches, steps_per_epoch
from .run_options import FinetuneOptions
from .run_state import (ADAPTER, METRICS, TRAINED, check_finite_parameters, prepare_out,
                        read_state, restore, rng_states, run_identity, save_checkpoint,
                        weights_name)
from .static_step import StaticStep
from .system import gib, mix_seed, peak_memory_bytes, synchronize, versions
from .training import (SCHEDULER, VAL_TIMESTEPS, Interrupted, NonFiniteLoss, PositionedSampler,
                       Stopper, describe_interval, endless_batches, ignore_sigint,
                       non_finite_message, optimizer_step, progress_bar, validation_loss)
from .unets import DEFAULT_SIZES, build_unet, downsampling_factor
from .generative_bases import load_generative, old_layout, without_projection
from .weights import load_state, read_state_dict

#: Methods that inject nothing: every parameter, only biases, only parameters named "norm".
BASELINES = ("full", "bias", "norm")
METHODS = BASELINES + ADAPTER_METHODS
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}
#: Optimizer steps left out of the median step time (allocator, kernel selection, autotuning).
WARMUP_STEPS = 2


def run(opts: FinetuneOptions) -> dict:
    """Fine-tune as ``opts`` says (a :class:`.run_options.FinetuneOptions`, or the parsed
    ``tenvoo-fast finetune`` options); returns the metrics.

    Raises :class:`RunError` (or :class:`AdapterError`) for anything the user can fix, before
    training starts where it can be known then.
    """
    opts = resolve_recipe(FinetuneOptions.from_namespace(opts))
    recipe = RECIPES[opts.recipe]
    size = volume_size(opts.preset, opts.size)
    if opts.spacing and not opts.data:
        raise RunError("--spacing resamples NIfTI volumes and needs --data DIR; the synthetic "
                       "phantoms are generated at --size")
    device = torch.device(opts.device)
    amp = opts.amp or (recipe.cuda_amp if device.type == "cuda" else "none")
    if amp == "fp16" and device.type != "cuda":
        raise RunError("--amp fp16 needs a CUDA device (it trains with a gradient scaler); "
                       "use --amp bf16 or --amp none on the CPU")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    _check_graph(opts, amp, world_size)
    if world_size > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        with use_backend(opts.backend), use_strategy(opts.strategy or "auto", strict=False), \
                use_weight_policy(opts.weight_policy or "recompute"), \
                use_launch_cost("replay" if opts.graph else "host"):
            return _run(opts, size, amp, device, rank, world_size)
    finally:
        if world_size > 1:
            torch.distributed.destroy_process_group()


def resolve_recipe(opts: FinetuneOptions) -> FinetuneOptions:
    """``--preset published`` as the paper UNet with the published recipe (at the published
    field of view unless --size says otherwise), and the recipe's run length when neither
    --steps nor --epochs is given."""
    if opts.preset == "published":
        if opts.recipe not in (None, "published"):
            raise RunError(f"--preset published trains with the published recipe, not "
                           f"--recipe {opts.recipe}; use --preset paper --recipe {opts.recipe}")
        opts = dataclasses.replace(opts, preset="paper", recipe="published",
                                   size=opts.size or list(RECIPES["published"].field_of_view))
    if opts.recipe is None:
        opts = dataclasses.replace(opts, recipe="tenvoo_fast")
    if opts.recipe not in RECIPES:
        raise RunError(f"--recipe {opts.recipe}: choose one of {', '.join(RECIPES)}")
    if opts.steps is None and opts.epochs is None:
        steps, epochs = RECIPES[opts.recipe].default_length
        opts = dataclasses.replace(opts, steps=steps, epochs=epochs)
    return opts


def _check_graph(opts, amp: str, world_size: int) -> None:
    """--graph's limits, said before anything is built."""
    if not opts.graph:
        return
    if amp == "fp16":
        raise RunError("--graph with --amp fp16: the gradient scaler checks for overflow on the "
                       "host every step; use --amp bf16 (the GPU default) with --graph")
    if world_size > 1:
        raise RunError(f"--graph runs one process, not {world_size} (DDP's all-reduce is not "
                       "captured); drop --graph under torchrun")
    recipe = RECIPES[opts.recipe]
    if opts.accum > 1 and (recipe.partial_last_step or recipe.accumulated_loss != "mean"):
        raise RunError(f"--graph captures a step of --accum micro-batches averaged, but the "
                       f"{opts.recipe} recipe sums them and shortens each epoch's last step; "
                       "drop --graph (or use --accum 1)")
    if opts.compile:
        raise RunError("--graph and --compile both remove the step's host overhead; choose "
                       "one of them")


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


def base_unet(preset: str, base_weights: str | os.PathLike | None = None,
              say: Callable[[str], None] = print) -> nn.Module:
    """The base UNet a run fine-tunes: ``preset``'s UNet with the weights in ``base_weights``
    (MONAI core's layout, or MONAI Generative's, detected from the keys and said with ``say``),
    or random weights (drawn from torch's global RNG: seed it first) with the output conv
    re-initialised. ``tenvoo-fast sample`` builds its base with this too."""
    if base_weights:
        return unet_from_state(preset, read_state_dict(base_weights, "--base-weights"),
                               f"--base-weights {base_weights}", say)
    model = build_unet(preset)
    # MONAI zero-initialises the last conv (for training from scratch). Frozen at zero, as
    # in adapter fine-tuning of random base weights, it would stop every gradient.
    for module in model.out.modules():
        if isinstance(module, nn.Conv3d):
            module.reset_parameters()
    return model


def unet_from_state(preset: str, state: dict, where: str,
                    say: Callable[[str], None] = print) -> nn.Module:
    """``preset``'s UNet holding ``state`` (read from ``where``, an option and its file): MONAI
    core's layout, or MONAI Generative's (detected from the keys, said with ``say``)."""
    model, what = build_unet(preset), f"the {preset} UNet"
    if old_layout(state, model.state_dict()):
        model, note = load_generative(partial(build_unet, preset), state, where, what)
        say(note)
    elif without_projection(state, model.state_dict()):
        model = load_state(build_unet(preset, include_fc=False), state, where, what)
        say(f"{where}: its attention blocks have no output projection; the UNet is built "
            "with include_fc=False to match")
    else:
        load_state(model, state, where, what)
    return model


def _run(opts, size, amp, device, rank, world_size) -> dict:
    out = Path(opts.out)
    main = rank == 0
    say = print if main else (lambda *args, **kwargs: None)
    identity = run_identity(opts, size, amp, world_size)
    if main:
        prepare_out(out, opts)
    if world_size > 1:
        torch.distributed.barrier()  # rank 0 has checked and cleaned the folder
    state = read_state(out, identity, world_size) if opts.resume else None
    train_set, val_set, data_description = training_volumes(
        size, opts.seed, data=opts.data, num_volumes=opts.num_volumes, spacing=opts.spacing,
        field_of_view=RECIPES[opts.recipe].field_of_view)

    torch.manual_seed(opts.seed)  # the same base weights on every rank and on resume
    model = _build_model(opts, state, say)
    metrics = _describe(opts, model, identity, size, amp, device, world_size,
                        (train_set, val_set, data_description), say)
    if opts.dry_run:
        metrics.update(steps=0, losses=[], val_loss=None, step_time_s=None, volumes_per_s=None,
                       peak_memory_bytes=peak_memory_bytes(device), status="dry run")
        if main:
            write_json_atomic(out / METRICS, metrics)
        say(f"dry run: nothing trained; wrote {out / METRICS}")
        return metrics

    t = _Training.begin(opts, model, state, train_set, amp, device, rank, world_size, say)
    say(f"training: optimizer steps {t.start} -> {t.steps}, batch {opts.batch_size} x accum "
        f"{opts.accum} x {world_size} process(es), Adam lr {opts.lr:g}")
    say("checkpoints: " + describe_interval(opts) + f", and on SIGTERM/SIGINT, into {out}")
    if opts.autotune:
        _autotune(unwrap(t.model), train_set, t.inferer, t.autocast, opts, device, say)
        metrics["autotune"] = autotune.decisions()
    checkpoint = _Checkpointer(t, out, identity, metrics, main, world_size,
                               {"preset": opts.preset, "seed": opts.seed,
                                "base_weights": identity["base_weights"]})
    times, stopped, step = _train(t, opts, out, checkpoint, main, world_size, say)
    if stopped is not None:
        name = signal.Signals(stopped).name
        say(f"{name} at step {step}/{t.steps}: checkpoint saved in {out}; continue with the "
            "same command and --resume")
        raise Interrupted(128 + stopped)
    checkpoint(t.steps, "trained; validating")
    return _report(t, opts, out, identity, metrics, times, val_set, main, world_size, say)


def _describe(opts, model, identity, size, amp, device, world_size, data, say) -> dict:
    """Say what the run trains, on what, and how; the metrics that say it."""
    train_set, val_set, data_description = data
    trainable, total = count_parameters(model), count_parameters(model, trainable_only=False)
    n_layers = len(adapter_layers(model))
    adapter = opts.method in ADAPTER_METHODS
    say(f"tenvoo-fast finetune: {opts.method}" + (f" (rank {opts.rank})" if adapter else "")
        + f" on the {opts.preset} UNet, {'x'.join(map(str, size))} volumes, {device}, "
          f"amp {amp}, {world_size} process(es)"
        + (f", the {opts.recipe} recipe" if opts.recipe != "tenvoo_fast" else ""))
    say(f"data: {data_description}")
    say(f"parameters: {trainable:,} trainable of {total:,} total; {n_layers} adapted layers")
    say(f"backend: {current_backend()} (available: {', '.join(available_backends())})")
    if opts.fold_frozen:
        say(f"--fold-frozen: T(θ0) folded into {len(folded_layers(model))} of {n_layers} adapted "
            "layers' base weights (the others have no frozen copy or a low-precision base)")
    return dict(
        preset=opts.preset, recipe=opts.recipe, size=list(size), method=opts.method,
        rank=identity["rank"],
        targets=identity["targets"], trainable=identity["trainable"], amp=amp, device=str(device),
        world_size=world_size, backend=current_backend(), strategy=current_strategy(),
        weight_policy=current_weight_policy(),
        checkpoint_activations=opts.checkpoint_activations, compile=opts.compile,
        graph=opts.graph, fold_frozen=bool(folded_layers(model)),
        channels_last=opts.channels_last,
        data=data_description,
        num_train=len(train_set), num_val=len(val_set), lr=opts.lr, batch_size=opts.batch_size,
        accum=opts.accum, seed=opts.seed, dry_run=opts.dry_run, trainable_params=trainable,
        total_params=total, adapted_layers=n_layers, versions=versions())


@dataclass
class _Training:
    """What the training loop works with: the model (DDP-wrapped under torchrun), optimizer,
    scaler, the noise generator, the data stream, the objective, and the run's bookkeeping."""
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    noise_rng: torch.Generator
    run: dict
    batches: object
    inferer: object
    autocast: object
    device: torch.device
    start: int
    steps: int
    launches: dict | None = None        # --count-launches: the counted step's report
    saved_bytes: int | None = None      # what the first micro-batch saved for backward
    static: StaticStep | None = None    # --graph: the step over static buffers
    graph_failure_said: bool = False
    #: step -> how many micro-batches it takes (the recipe's)
    micro_batches: Callable[[int], int] | None = None
    recipe: Recipe = RECIPES["tenvoo_fast"]

    @classmethod
    def begin(cls, opts, model, state, train_set, amp, device, rank, world_size, say):
        """Put the model on ``device`` and set up training, restoring the checkpoint's state
        when resuming."""
        from monai.inferers import DiffusionInferer
        from monai.networks.schedulers import DDPMScheduler

        model.to(device)
        if opts.channels_last:
            # cuDNN's 3-D convs run channels-last; without this they convert layouts around
            # every conv whose neighbours (the adapters' outputs) are already channels-last.
            model.to(memory_format=torch.channels_last_3d)
        if world_size > 1:
            # Buffers (frozen adapter copies) never change, so they need no per-step broadcast.
            model = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None,
                broadcast_buffers=False)
        if opts.compile:
            # The training forward and backward compiled (inductor); everything that reads
            # or writes weights goes through unwrap(), so names and files do not change.
            model = torch.compile(model)
        # Fused Adam: one call per step for all parameters, instead of ~8 per parameter (an
        # adapter has ~10 small tensors per layer; README, "Launches").
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad],
                                     lr=opts.lr, fused=True,
                                     capturable=opts.graph and device.type == "cuda")
        scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
        # Noise and timesteps come from their own generator (distinct per rank); the data order
        # from the sampler's seed and epoch and the position in the epoch. Both are
        # checkpointed, so a resumed run draws exactly what the uninterrupted one would have.
        noise_rng = torch.Generator(device).manual_seed(mix_seed(opts.seed, rank))
        run = dict(step=0, losses=[], lr_history=[[1, opts.lr]])
        if state is not None:
            run = restore(state, rank, optimizer, scaler, noise_rng, opts.lr, say)
        start = run["step"]
        sampler = PositionedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True,
                                    seed=opts.seed)
        loader = DataLoader(train_set, batch_size=opts.batch_size, sampler=sampler,
                            num_workers=opts.workers, persistent_workers=opts.workers > 0,
                            pin_memory=device.type == "cuda", worker_init_fn=ignore_sigint,
                            generator=torch.Generator().manual_seed(mix_seed(opts.seed, rank, 1)))
        recipe = RECIPES[opts.recipe]
        per_epoch = steps_per_epoch(len(loader), opts.accum, recipe)
        steps = math.ceil(opts.epochs * per_epoch - 1e-9) if opts.epochs else opts.steps
        steps = max(steps, start)  # a resumed run never goes back
        autocast = partial(torch.autocast, device.type, dtype=AMP_DTYPES[amp],
                           enabled=AMP_DTYPES[amp] is not None)
        inferer = DiffusionInferer(DDPMScheduler(**SCHEDULER))
        # --graph: eager until the last warm-up step, which captures (its time stays out of
        # the median step time, as the warm-up's does); with --count-launches the counted step
        # runs eagerly first (counting a replay would see one call).
        static = (StaticStep(model, inferer, optimizer, autocast, opts.accum, device,
                             warmup=WARMUP_STEPS + 1 if opts.count_launches else WARMUP_STEPS - 1)
                  if opts.graph else None)
        return cls(model, optimizer, scaler, noise_rng, run,
                   endless_batches(loader, consumed=batches_before(start, len(loader),
                                                                   opts.accum, recipe)),
                   inferer, autocast, device, start, steps, static=static,
                   micro_batches=partial(micro_batches, batches_per_epoch=len(loader),
                                         accum=opts.accum, recipe=recipe), recipe=recipe)


class _Checkpointer:
    """``checkpoint(step, status)``: save step ``step`` as one checkpoint (all ranks take part:
    their RNG states are gathered) and write the metrics beside it."""

    def __init__(self, t: _Training, out: Path, identity: dict, metrics: dict, main: bool,
                 world_size: int, base_origin: dict):
        self.t, self.out, self.identity, self.metrics = t, out, identity, metrics
        self.main, self.world_size, self.base_origin = main, world_size, base_origin

    def __call__(self, step: int, status: str) -> None:
        t = self.t
        check_finite_parameters(t.model, step, self.out)
        rng = rng_states(t.noise_rng)
        ranks = [rng]
        if self.world_size > 1:
            ranks = [None] * self.world_size
            torch.distributed.all_gather_object(ranks, rng)
        if self.main:
            t.run.update(step=step, rng=ranks)
            save_checkpoint(self.out, t.model, t.optimizer, t.scaler, t.run, self.identity,
                            self.base_origin)
            self.metrics.update(steps=step, losses=t.run["losses"], status=status,
                                lr_history=t.run["lr_history"])
            write_json_atomic(self.out / METRICS, self.metrics)


def _train(t: _Training, opts, out: Path, checkpoint, main: bool, world_size: int, say):
    """The optimizer steps from ``t.start`` to ``t.steps``, checkpointing when due; returns
    (step times, the signal that stopped the run or None, the last step)."""
    device, steps = t.device, t.steps
    times = []
    stopper = Stopper(opts, device, world_size)
    profiler = (step_profiler(out, device, steps - t.start, say) if opts.profile and main
                else None)
    bar = progress_bar(t.start, steps, enabled=main and sys.stderr.isatty())
    stopped, step = None, t.start
    # The step counted by --count-launches: the first after the warm-up (the last if fewer);
    # counting slows it, so its time is left out of the median.
    counted = min(t.start + WARMUP_STEPS + 1, steps) if opts.count_launches and main else None
    try:
        with stopper, profiler or nullcontext():
            for step in range(t.start + 1, steps + 1):
                synchronize(device)
                began = time.perf_counter()
                try:
                    # The first step measures what a micro-batch keeps for backward.
                    saved = (SavedBytes(held_by(unwrap(t.model))) if step == t.start + 1
                             else None)
                    with (counting(unwrap(t.model), t.optimizer) if step == counted
                          else nullcontext()) as report:
                        if t.static is not None:
                            loss, volumes = t.static(t.batches, t.noise_rng, saved,
                                                     eager=step == counted)
                        else:
                            loss, volumes = optimizer_step(
                                t.model, t.batches, t.inferer, t.optimizer, t.scaler,
                                t.autocast, t.micro_batches(step), device, world_size,
                                t.noise_rng, saved,
                                mean=t.recipe.accumulated_loss == "mean")
                    if saved is not None:
                        t.saved_bytes = saved.bytes
                except NonFiniteLoss as e:
                    raise RunError(non_finite_message(e, step, t.model, out)) from None
                synchronize(device)
                elapsed = time.perf_counter() - began
                captured = t.static is not None and t.static.captured_last_call
                if step == counted:
                    t.launches = report
                    say(f"step {step} counted: " + launch_summary(report))
                elif not (captured and step > t.start + WARMUP_STEPS):
                    times.append(elapsed)       # a capture's time is not a step's
                if captured:
                    say(f"step {step}: captured as a CUDA graph" if device.type == "cuda"
                        else f"step {step}: static step set up (captured on a GPU)")
                if t.static is not None and t.static.failure and not t.graph_failure_said:
                    t.graph_failure_said = True
                    say(f"--graph: capturing the step failed ({t.static.failure}); the run "
                        "goes on eagerly")
                t.run["losses"].append(loss)
                memory = peak_memory_bytes(device)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.4f}", vol_s=f"{volumes / elapsed:.2f}",
                                    mem=gib(memory))
                    bar.update()
                elif step % opts.log_every == 0 or step == steps:
                    say(f"step {step}/{steps}  loss {loss:.4f}  {volumes / elapsed:.2f} vol/s  "
                        f"peak memory {gib(memory)}")
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
    return times, stopped, step


def _report(t: _Training, opts, out: Path, identity: dict, metrics: dict, times, val_set,
            main: bool, world_size: int, say) -> dict:
    """Validate, then write and print the run's metrics."""
    device = t.device
    step_time = statistics.median(times[WARMUP_STEPS:]) if len(times) > WARMUP_STEPS else None
    volumes_per_step = opts.batch_size * opts.accum * world_size
    val_loss = (validation_loss(unwrap(t.model), val_set, t.inferer, t.autocast, device,
                                opts.seed, t.recipe.validation_timesteps)
                if main else None)
    metrics.update(val_loss=val_loss, step_time_s=step_time, lr_history=t.run["lr_history"],
                   volumes_per_s=volumes_per_step / step_time if step_time else None,
                   peak_memory_bytes=peak_memory_bytes(device),
                   execution=execution_plan(t.model), status="finished")
    if t.launches is not None:
        metrics["launches"] = t.launches
    metrics["saved_for_backward_bytes"] = t.saved_bytes
    if t.static is not None:
        metrics["graph_captures"] = t.static.captures
        metrics["graph_failure"] = t.static.failure
    say("validation loss: " + (
        f"{val_loss:.4f} ({len(val_set)} volume(s) x {VAL_TIMESTEPS} timesteps)"
        if val_loss is not None else "n/a (no validation volume)"))
    say(f"median step time (excluding {WARMUP_STEPS} warm-up steps): "
        + (f"{step_time * 1000:.1f} ms, {volumes_per_step / step_time:.2f} volumes/s"
           if step_time else "n/a (too few steps)")
        + f"; peak memory {gib(metrics['peak_memory_bytes'])}"
        + (" (allocated)" if device.type == "cuda" else " (RSS)"))
    if main:
        write_json_atomic(out / METRICS, metrics)
        say(f"wrote {out / METRICS}, {out / weights_name(identity)} and the checkpoint of step "
            f"{t.steps} ({out / run_checkpoint.MANIFEST})")
    return metrics


def _build_model(opts, state: dict | None, say: Callable[[str], None]) -> nn.Module:
    """The preset's UNet with base weights, adapters (or baseline trainables) and, when
    resuming, the trained weights of the checkpoint ``state`` came from."""
    model = base_unet(opts.preset, opts.base_weights, say)
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
    if opts.fold_frozen and opts.method not in BASELINES:
        # After loading a checkpoint's adapter (a folded model refuses to load one): a resumed
        # run folds the same W and T(θ0) into the same bits.
        fold_frozen(model)
    if opts.checkpoint_activations:
        checkpoint_blocks(model)
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
    mode = "error" if opts.strict_base else "warn"
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
