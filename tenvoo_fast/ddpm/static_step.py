"""``--graph``: the optimizer step over static buffers, captured once as a CUDA graph and replayed.

A step of an adapted UNet is bound by the host issuing thousands of small kernels; replaying a
captured graph issues them all in one call. Capture needs a step whose every tensor lives at a
fixed address and whose host never waits for the device, so :class:`StaticStep` runs the same
step as :func:`~tenvoo_fast.ddpm.training.optimizer_step` over buffers it owns:

- the host fills the micro-batches, noise and timesteps into static buffers (the noise from the
  run's generator, in the eager step's order, so the draws are the same);
- the body (forward, backward and the fused Adam step of every micro-batch) reads only those
  buffers, zeroes the gradients in place (they stay allocated: the graph writes into them), and
  sums the loss into a device scalar;
- a non-finite loss turns the optimizer step into a no-op on the device (Adam's ``found_inf``)
  instead of a host check; the host reads the loss after the step and raises as the eager
  step does, with the parameters untouched.

On CUDA the first calls run the body eagerly (warm-up: optimizer state, Triton compilation,
cached tables), then it is captured and replayed; it is captured again when what it was
captured over changes (:meth:`StaticStep.key`: parameter and buffer addresses, dtypes and
devices, the frozen copies, the learning rates, the batch shape, the dispatch choices), e.g.
after ``load_adapter`` or ``.to()``. On the CPU nothing is captured: the body runs eagerly each
step, which is what tests compare bit for bit with the eager step, and what the sync detector
(``LaunchCounter``'s host syncs) watches.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from ..dispatch import context as dispatch_context
from ..model import adapter_layers, unwrap
from .training import SCHEDULER, NonFiniteLoss


class StaticStep:
    """``step(batches, noise_rng, saved=None, eager=False) -> (loss, volumes)``: one optimizer
    step over ``accum`` micro-batches (see the module docstring). ``eager=True`` runs the body
    without replaying (a counted or measured step); ``warmup``: eager calls before the first
    capture."""

    def __init__(self, model, inferer, optimizer, autocast, accum: int, device: torch.device,
                 warmup: int = 1):
        self.model, self.inferer, self.optimizer = model, inferer, optimizer
        self.autocast, self.accum, self.device, self.warmup = autocast, accum, device, warmup
        self.capture = device.type == "cuda"
        self.calls = 0
        #: How many times the step was captured (on the CPU: would have been).
        self.captures = 0
        self.graph = None
        self._key = None
        self.images = self.noise = self.timesteps = None
        self.loss = torch.zeros((), device=device)
        self.found_inf = torch.zeros((), device=device)
        # Adam skips its step (and does not count it) where found_inf is 1.
        optimizer.found_inf = self.found_inf
        self._stream = torch.cuda.Stream(device) if self.capture else None

    # -- host side ----------------------------------------------------------------------------
    def _fill(self, batches, noise_rng) -> list:
        seen = []
        for m in range(self.accum):
            batch = next(batches)
            seen.append(batch)
            if (self.images is None or self.images.shape[1:] != batch.shape
                    or self.images.dtype != batch.dtype):
                self._allocate(batch)
            self.images[m].copy_(batch, non_blocking=True)
            # The eager step's draws, in its order: noise, then timesteps, per micro-batch.
            torch.randn(batch.shape, generator=noise_rng, device=self.device,
                        dtype=self.images.dtype, out=self.noise[m])
            torch.randint(0, SCHEDULER["num_train_timesteps"], (batch.shape[0],),
                          generator=noise_rng, device=self.device, out=self.timesteps[m])
        return seen

    def _allocate(self, batch: torch.Tensor) -> None:
        shape = (self.accum, *batch.shape)
        self.images = torch.empty(shape, dtype=batch.dtype, device=self.device)
        self.noise = torch.empty(shape, dtype=batch.dtype, device=self.device)
        self.timesteps = torch.empty((self.accum, batch.shape[0]), dtype=torch.int64,
                                     device=self.device)

    def key(self) -> tuple:
        """What a captured graph depends on beyond the buffers' contents."""
        model = unwrap(self.model)
        tensors = [*model.parameters(), *model.buffers()]
        frozen = tuple((name, layer.frozen_cores is not None and
                        tuple(t._version for t in layer.frozen_cores))
                       for name, layer in adapter_layers(model).items())
        ctx = dispatch_context.CONTEXT
        return (tuple((t.data_ptr(), t.dtype, t.device, tuple(t.shape)) for t in tensors),
                frozen, tuple(g["lr"] for g in self.optimizer.param_groups),
                tuple(self.images.shape), self.images.dtype, (ctx.backend, ctx.strategy, ctx.weight_policy),
                torch.is_grad_enabled())

    # -- the step -----------------------------------------------------------------------------
    def body(self, saved=None) -> None:
        """Forward, backward and optimizer step over the static buffers; no host sync."""
        self.optimizer.zero_grad(set_to_none=False)
        self.loss.zero_()
        for m in range(self.accum):
            noise = self.noise[m]
            # No autocast weight cache: a captured graph must not hold casts made outside it.
            with self.autocast(cache_enabled=False), \
                    (saved if saved is not None and m == 0 else nullcontext()):
                prediction = self.inferer(inputs=self.images[m], diffusion_model=self.model,
                                          noise=noise, timesteps=self.timesteps[m])
            loss = F.mse_loss(prediction.float(), noise)
            (loss / self.accum).backward()
            self.loss += loss.detach()
        self.loss /= self.accum
        self.found_inf.copy_(torch.logical_not(torch.isfinite(self.loss)))
        self.optimizer.step()

    def _run(self, saved, eager: bool) -> None:
        replay = self.calls > self.warmup and not eager
        if replay:
            key = self.key()
            if key != self._key:
                if self.capture:
                    self._capture()
                self._key, self.captures = key, self.captures + 1
        if replay and self.capture:
            self.graph.replay()
        elif self.capture:
            self._on_side_stream(lambda: self.body(saved))
        else:
            self.body(saved)

    def _on_side_stream(self, fn) -> None:
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)

    def _capture(self) -> None:
        self.graph = None
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the DataLoader's pin-memory thread may call CUDA while this captures.
        with torch.cuda.graph(graph, stream=self._stream, capture_error_mode="thread_local"):
            self.body()
        self.graph = graph

    def __call__(self, batches, noise_rng, saved=None, eager: bool = False):
        self.calls += 1
        seen = self._fill(batches, noise_rng)
        self._run(saved, eager)
        value = self.loss.item()                # read after the step, outside it
        if value != value or value in (float("inf"), float("-inf")):
            raise NonFiniteLoss(value, all(bool(torch.isfinite(b).all()) for b in seen))
        return value, sum(b.shape[0] for b in seen)
