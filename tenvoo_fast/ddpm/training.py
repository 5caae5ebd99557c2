"""The pieces of the training loop: the data stream (resumable mid-epoch), one optimizer step
of the paper's DDPM objective, the validation loss, when to checkpoint (intervals and signals),
and what a non-finite loss means."""
from __future__ import annotations

import math
import signal
import statistics
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

from ..model import unwrap
from .run_state import last_good

#: The paper's noise schedule.
SCHEDULER = dict(num_train_timesteps=1000, schedule="scaled_linear_beta", beta_start=0.0005,
                 beta_end=0.0195)


#: Validation: each volume at this many evenly spaced timesteps, with noise fixed by the seed.
VAL_TIMESTEPS = 8


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


def non_finite_message(e: NonFiniteLoss, step: int, model, out: Path) -> str:
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
            f"optimizer step and saved nothing; {last_good(out)}; {fix}")


class PositionedSampler(DistributedSampler):
    """A DistributedSampler that can start an epoch part-way (after ``skip`` indices), so a
    resumed run continues the data order exactly where the checkpoint left it."""

    skip = 0

    def __iter__(self):
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0
        return iter(indices[skip:])


def ignore_sigint(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C to the main process, which checkpoints and then stops
    them (a worker that died of it would take the batch in flight with it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Stopper:
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


def describe_interval(opts) -> str:
    parts = []
    if opts.save_every:
        parts.append(f"every {opts.save_every} steps")
    if opts.save_every_minutes:
        parts.append(f"every {opts.save_every_minutes:g} minutes")
    return (" and ".join(parts) if parts else "none during training") + ", at the end"


def endless_batches(loader: DataLoader, consumed: int):
    """Batches from ``loader`` forever, reshuffled each epoch (deterministically by epoch),
    starting after the first ``consumed`` batches."""
    epoch, offset = divmod(consumed, len(loader))
    while True:
        loader.sampler.set_epoch(epoch)
        loader.sampler.skip = offset * loader.batch_size
        offset = 0
        yield from loader
        epoch += 1


def optimizer_step(model, batches, inferer, optimizer, scaler, autocast, accum, device,
                   world_size, noise_rng, saved=None, mean: bool = True) -> tuple[float, int]:
    """One optimizer step over ``accum`` micro-batches: MSE between predicted and true noise at
    uniformly drawn timesteps, backpropagated divided by ``accum`` (``mean``) or as it is (the
    published recipe's sum). Returns the loss (mean over micro-batches and processes) and the
    number of volumes seen; raises :class:`NonFiniteLoss` before the optimizer step when the
    loss is not finite. ``saved``: a :class:`~tenvoo_fast.measure.SavedBytes` that measures
    the first micro-batch's forward (what it keeps for its backward)."""
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
            with autocast(), (saved if saved is not None and micro == 0 else nullcontext()):
                prediction = inferer(inputs=images, diffusion_model=model, noise=noise,
                                     timesteps=timesteps)
            loss = F.mse_loss(prediction.float(), noise)
            scaler.scale(loss / accum if mean else loss).backward()
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
def validation_loss(model, val_set, inferer, autocast, device, seed,
                    spacing: str = "even") -> float | None:
    """Mean noise-prediction MSE over the validation volumes at ``VAL_TIMESTEPS`` timesteps,
    evenly spaced (``spacing="even"``) or drawn uniformly (``"random"``, the published recipe's), with
    noise and timesteps fixed by ``seed`` so runs compare; None without validation volumes."""
    if len(val_set) == 0:
        return None
    generator = torch.Generator().manual_seed(seed)
    n = SCHEDULER["num_train_timesteps"]
    if spacing == "random":
        timesteps = torch.randint(0, n, (VAL_TIMESTEPS,), generator=generator).tolist()
    else:
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


def progress_bar(start: int, steps: int, enabled: bool):
    """A tqdm bar on a terminal; None otherwise (then steps are logged as lines)."""
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=steps, initial=start, desc="finetune", unit="step")
