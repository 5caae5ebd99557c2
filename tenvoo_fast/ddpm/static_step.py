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
cached tables), then it is captured and replayed. When what it was captured over changes
(:meth:`StaticStep.key`: every address the graph reads, the learning rates, the dispatch
choices), e.g. after ``load_adapter``, ``.to()`` or an epoch's short last batch, that step runs
eagerly (warming up whatever changed) and the next one with the same key captures again. A
capture that fails leaves the run eager, with the reason in :attr:`StaticStep.failure`. On the
CPU nothing is captured: the body runs eagerly each step, which is what tests compare bit for
bit with the eager step, and what the sync detector (``LaunchCounter``'s host syncs) watches.
"""
from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from ..dispatch import context as dispatch_context
from ..errors import one_line
from ..model import adapter_layers, unwrap
from .training import SCHEDULER, NonFiniteLoss


class StaticStep:
    """``step(batches, noise_rng, saved=None, eager=False) -> (loss, volumes)``: one optimizer
    step over ``accum`` micro-batches (see the module docstring). ``eager=True`` runs the body
    without replaying (a counted or measured step); ``warmup``: eager calls before the first
    capture. A step whose :meth:`key` differs from the captured one runs eagerly (and warms up
    what changed); the next call with that same key captures it."""

    def __init__(self, model, inferer, optimizer, autocast, accum: int, device: torch.device,
                 warmup: int = 1):
        self.model, self.inferer, self.optimizer = model, inferer, optimizer
        self.autocast, self.accum, self.device, self.warmup = autocast, accum, device, warmup
        self.capture = device.type == "cuda"
        self.calls = 0
        #: How many times the step was captured (on the CPU: would have been).
        self.captures = 0
        #: Whether the last call captured (its time is the capture's, not a step's).
        self.captured_last_call = False
        #: Why capturing failed, if it did (the run then goes on eagerly).
        self.failure = None
        self.graph = None
        self._captured = self._seen = None
        self._buffers: dict = {}        # (micro-batch, shape, dtype) -> (images, noise, timesteps)
        self._now: list = []            # this step's buffers, per micro-batch
        self.loss = torch.zeros((), device=device)
        self.found_inf = torch.zeros((), device=device)
        # Adam skips its step (and does not count it) where found_inf is 1.
        optimizer.found_inf = self.found_inf
        if self.capture:
            # A checkpoint saved without --graph restores capturable=False; fused Adam keeps its
            # step counts on the device either way, and capture requires the flag.
            for group in optimizer.param_groups:
                group["capturable"] = True
        self._stream = torch.cuda.Stream(device) if self.capture else None

    # -- host side ----------------------------------------------------------------------------
    def _fill(self, batches, noise_rng) -> list:
        seen, self._now = [], []
        for m in range(self.accum):
            batch = next(batches)
            seen.append(batch)
            # One buffer per micro-batch and shape: an epoch's short last batch gets its own,
            # and the captured step's buffers stay where the graph reads them.
            key = (m, tuple(batch.shape), batch.dtype)
            if key not in self._buffers:
                self._buffers[key] = (
                    torch.empty(batch.shape, dtype=batch.dtype, device=self.device),
                    torch.empty(batch.shape, dtype=batch.dtype, device=self.device),
                    torch.empty(batch.shape[0], dtype=torch.int64, device=self.device))
            images, noise, timesteps = self._buffers[key]
            self._now.append((images, noise, timesteps))
            images.copy_(batch, non_blocking=True)
            # The eager step's draws, in its order: noise, then timesteps, per micro-batch.
            torch.randn(batch.shape, generator=noise_rng, device=self.device, dtype=batch.dtype,
                        out=noise)
            torch.randint(0, SCHEDULER["num_train_timesteps"], (batch.shape[0],),
                          generator=noise_rng, device=self.device, out=timesteps)
        return seen

    def _slots(self) -> None:
        """Where the model keeps its parameters, buffers and adapter layers (looked up once:
        the model's module structure is fixed once training starts; a tensor replaced in its
        slot, as ``.to()`` does, is seen by :meth:`key`)."""
        model = unwrap(self.model)
        self._param_slots = [(m._parameters, n) for m in model.modules()
                             for n, p in m._parameters.items() if p is not None]
        self._buffer_slots = [(m._buffers, n) for m in model.modules()
                              for n, b in m._buffers.items() if b is not None]
        self._layers = list(adapter_layers(model).values())

    def key(self) -> tuple:
        """Everything a captured graph reads by address, or bakes in, beyond the buffers'
        contents: this step's buffers; every parameter, gradient and buffer of the model and
        the optimizer's state (address and dtype; requires_grad); the adapters' frozen copies
        (version, folded) and cached T(θ0); the scheduler's table; the learning rates; the
        dispatch choices. Plain pointers and flags: it runs before every step."""
        if not hasattr(self, "_param_slots"):
            self._slots()

        def where(t):
            return 0 if t is None else (t.data_ptr(), t.dtype)

        params = [(where(p), where(p.grad), p.requires_grad)
                  for p in (d[n] for d, n in self._param_slots)]
        buffers = [where(d[n]) for d, n in self._buffer_slots]
        state = [where(t) for s in self.optimizer.state.values() for t in s.values()
                 if isinstance(t, torch.Tensor)]
        layers = [(layer.frozen_folded, layer.frozen_cores is not None and
                   tuple(t._version for t in layer.frozen_cores),
                   tuple(where(t) for t in layer.cached_tensors())) for layer in self._layers]
        table = getattr(self.inferer.scheduler, "alphas_cumprod", None)
        ctx = dispatch_context.CONTEXT
        return (tuple(tuple(where(t) for t in b) for b in self._now), tuple(params),
                tuple(buffers), tuple(state), tuple(layers), where(table),
                tuple(g["lr"] for g in self.optimizer.param_groups),
                (ctx.backend, ctx.strategy, ctx.weight_policy), torch.is_grad_enabled())

    # -- the step -----------------------------------------------------------------------------
    def body(self, saved=None) -> None:
        """Forward, backward and optimizer step over this step's buffers; no host sync."""
        self.optimizer.zero_grad(set_to_none=False)
        self.loss.zero_()
        for m, (images, noise, timesteps) in enumerate(self._now):
            # No autocast weight cache: a captured graph must not hold casts made outside it.
            with self.autocast(cache_enabled=False), \
                    (saved if saved is not None and m == 0 else nullcontext()):
                prediction = self.inferer(inputs=images, diffusion_model=self.model,
                                          noise=noise, timesteps=timesteps)
            loss = F.mse_loss(prediction.float(), noise)
            (loss / self.accum).backward()
            self.loss += loss.detach()
        self.loss /= self.accum
        self.found_inf.copy_(torch.logical_not(torch.isfinite(self.loss)))
        self.optimizer.step()

    def _run(self, saved, eager: bool) -> None:
        self.captured_last_call = False
        if not eager and self.calls > self.warmup and self.failure is None:
            key = self.key()
            if key == self._captured:
                self._replay()
                return
            if key == self._seen:               # the state an eager step ran on and left
                self._capture(key)
                if self.failure is None:
                    self._replay()
                    return
        self._eager(saved)
        self._seen = self.key() if self.failure is None else None

    def _eager(self, saved) -> None:
        if not self.capture:
            self.body(saved)
            return
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self.body(saved)
        torch.cuda.current_stream(self.device).wait_stream(stream)

    def _replay(self) -> None:
        if self.capture:
            self.graph.replay()
        else:
            self.body()

    def _capture(self, key) -> None:
        self.captured_last_call = True
        self.captures += 1
        self._captured = key
        if not self.capture:
            return
        self.graph = None
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the DataLoader's pin-memory thread may call CUDA meanwhile.
            with torch.cuda.graph(graph, stream=self._stream, capture_error_mode="thread_local"):
                self.body()
        except RuntimeError as e:       # e.g. an operation that cannot be captured
            self.failure = one_line(e)
            self._captured = None
            torch.cuda.synchronize(self.device)
            return
        self.graph = graph

    def __call__(self, batches, noise_rng, saved=None, eager: bool = False):
        self.calls += 1
        seen = self._fill(batches, noise_rng)
        self._run(saved, eager)
        value = self.loss.item()                # read after the step, outside it
        if not math.isfinite(value):
            raise NonFiniteLoss(value, all(bool(torch.isfinite(b).all()) for b in seen))
        return value, sum(b.shape[0] for b in seen)
