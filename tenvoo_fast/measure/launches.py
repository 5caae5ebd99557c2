"""Launch accounting: what a training step asks of the host, counted per step and per layer.

On a GPU an adapted layer's step is bound by the host issuing small operator calls, not by
flops, and the number of calls does not depend on the device or the volume size: it can be
counted on a CPU, deterministically, and budgeted in tests. :class:`LaunchCounter` is a
``TorchDispatchMode`` that sorts every ATen call into

- **launches**: calls that start a device kernel (copies included), plus Triton launches;
- **copies**: ``copy_``, ``clone``, ``_to_copy`` and kin (a subset of launches);
- **views**: calls that only make a new view of existing memory (no kernel, but host time);
- **allocations**: fresh output tensors;
- **syncs**: calls whose result the host must wait for (``item()``, data-dependent shapes,
  device-to-host copies).

It runs the body of every ``tenvoo_fast`` custom op in place of the opaque op (the dispatch
mode would otherwise see one call), so the counts include what the ops do inside; calls that
ATen kernels make internally are below any dispatch mode and are not seen; composite ATen ops
(``einsum``, ``conv3d``) are decomposed as autograd would, so their parts are counted. Triton launches are
counted through :data:`triton_kernels.launching.OBSERVERS`; the torch calls Triton's interpreter
makes to emulate a kernel are not counted.

Counts are kept per *scope*: an adapted layer's forward and backward (autograd nodes of the
layer's own subgraph, tagged as the forward builds them) go to the layer's name, everything
else to ``"model"``, and :meth:`LaunchCounter.region` names others (``"optimizer"``).
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import asdict, dataclass, fields
from typing import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..ops.define import BODIES

aten = torch.ops.aten

#: ATen calls that only allocate (no kernel runs).
_ALLOCATING = {"empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like",
               "resize_", "set_"}
#: ATen calls that copy memory.
_COPYING = {"copy_", "clone", "_to_copy", "_copy_from", "_copy_from_and_resize",
            "lift_fresh_copy", "_foreach_copy_", "_foreach_copy"}
_SYNCING = {"_local_scalar_dense", "item", "nonzero", "masked_select", "unique",
            "_unique2", "is_nonzero", "equal"}


@dataclass
class Counts:
    """What one scope (or a whole step) asked of the host."""
    launches: int = 0
    triton: int = 0
    copies: int = 0
    views: int = 0
    allocations: int = 0
    syncs: int = 0

    def __add__(self, other: "Counts") -> "Counts":
        return Counts(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def __sub__(self, other: "Counts") -> "Counts":
        return Counts(*(getattr(self, f.name) - getattr(other, f.name) for f in fields(self)))

    def scaled(self, k: float) -> dict:
        return {f.name: getattr(self, f.name) * k for f in fields(self)}

    def as_dict(self) -> dict:
        return asdict(self)


def classify(func, args=()) -> str:
    """"view", "alloc", "sync", "copy" or "launch" for one ATen overload (``args``: the call's,
    for ops whose shape depends on the data only for some inputs)."""
    name = func._schema.name.split("::")[-1]
    tags = set(getattr(func, "tags", ()))
    if name in _SYNCING or torch.Tag.data_dependent_output in tags:
        return "sync"
    if torch.Tag.dynamic_output_shape in tags and not _integer_indexing(name, args):
        return "sync"
    if func.is_view or name in ("_unsafe_view", "alias", "detach", "detach_", "lift_fresh"):
        return "view"
    if name in _ALLOCATING:
        return "alloc"
    if name in _COPYING:
        return "copy"
    return "launch"


def _integer_indexing(name: str, args) -> bool:
    """``t[idx]`` with integer index tensors: one gather kernel, whose output shape is the
    indices' (no host wait); a boolean mask's is data-dependent (a sync)."""
    if name != "index" or len(args) < 2:
        return False
    return all(i is None or (isinstance(i, torch.Tensor) and not i.is_floating_point()
                             and i.dtype not in (torch.bool, torch.uint8)) for i in args[1])


def _kernels(func, args) -> int:
    """Kernels one call starts: one, except ``_foreach_copy_`` between tensors of different
    strides, which CUDA runs as one copy per pair (its fused route needs equal sizes, strides
    and dtypes)."""
    if func._schema.name != "aten::_foreach_copy_" or len(args) < 2:
        return 1
    dst, src = args[0], args[1]
    fused = all(d.shape == s.shape and d.stride() == s.stride() and s.dtype == src[0].dtype
                for d, s in zip(dst, src))
    return 1 if fused else len(dst)


def _fresh_outputs(func, out) -> int:
    """How many tensors a (non-view) call returned that it allocated."""
    returns = func._schema.returns
    if any(r.alias_info is not None for r in returns):
        return 0
    if isinstance(out, torch.Tensor):
        return 1
    if isinstance(out, (list, tuple)):
        return sum(_fresh_outputs(func, o) if isinstance(o, (list, tuple))
                   else isinstance(o, torch.Tensor) for o in out)
    return 0


def _device_to_host(func, args, kwargs, out) -> bool:
    """A copy that lands on the CPU from another device: the host waits for it."""
    name = func._schema.name.split("::")[-1]
    if name not in _COPYING:
        return False
    src = next((a for a in args if isinstance(a, torch.Tensor)), None)
    dst = args[0] if name == "copy_" else out
    if name == "copy_" and len(args) > 1:
        src = args[1]
    return (isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor)
            and src.device.type != "cpu" and dst.device.type == "cpu")


class LaunchCounter(TorchDispatchMode):
    """Counts the host's work by scope while active (``with LaunchCounter() as c: ...``)."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, Counts] = defaultdict(Counts)
        #: scope -> operator name -> kernel-launching calls (where the launches come from)
        self.by_op: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self._scopes = ["model"]
        self._muted = 0
        self._handles: list = []

    # -- scopes --------------------------------------------------------------------------
    @property
    def scope(self) -> str:
        return self._scopes[-1]

    @contextlib.contextmanager
    def region(self, name: str):
        """Count what runs inside under ``name``."""
        self._scopes.append(name)
        try:
            yield
        finally:
            self._scopes.pop()

    def attribute(self, layers: dict[str, torch.nn.Module]) -> None:
        """Count each of ``layers``' forward and backward under its name (until
        :meth:`detach`): module hooks for the forward, hooks on the autograd nodes its forward
        creates for the backward."""
        for name, layer in layers.items():
            self._handles.append(layer.register_forward_pre_hook(self._enter(name)))
            self._handles.append(layer.register_forward_hook(self._leave_forward(name)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _enter(self, name):
        def hook(module, args):
            self._scopes.append(name)
        return hook

    def _leave_forward(self, name):
        def hook(module, args, output):
            self._scopes.pop()
            inputs = {a.grad_fn for a in args if isinstance(a, torch.Tensor)}
            outputs = output if isinstance(output, (tuple, list)) else (output,)
            for node in _subgraph([o.grad_fn for o in outputs if isinstance(o, torch.Tensor)],
                                  inputs):
                node.register_prehook(self._node_enter(name))
                node.register_hook(self._node_leave)
        return hook

    def _node_enter(self, name):
        def prehook(grad_outputs):
            self._scopes.append(name)
        return prehook

    def _node_leave(self, grad_inputs, grad_outputs):
        self._scopes.pop()

    # -- Triton ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _triton_launch(self, kernel):
        self.counts[self.scope].launches += 1
        self.counts[self.scope].triton += 1
        self.by_op[self.scope][f"triton:{getattr(kernel, '__name__', kernel)}"] += 1
        self._muted += 1
        try:
            yield
        finally:
            self._muted -= 1

    def __enter__(self):
        try:
            from ..triton_kernels import launching
        except ImportError:     # pragma: no cover - the package always ships triton_kernels
            launching = None
        self._launching = launching
        if launching is not None:
            launching.OBSERVERS.append(self._triton_launch)
        return super().__enter__()

    def __exit__(self, *exc):
        if self._launching is not None and self._triton_launch in self._launching.OBSERVERS:
            self._launching.OBSERVERS.remove(self._triton_launch)
        return super().__exit__(*exc)

    # -- ATen -----------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        body = BODIES.get(func._schema.name)
        if body is not None and not self._muted:
            with self:
                return body(*args, **kwargs)
        if not self._muted and _composite(func):
            # Below autograd (inside an op's body) a composite op such as einsum reaches the
            # mode whole; decompose it as autograd would, to see what it runs.
            with self:
                return func.decompose(*args, **kwargs)
        out = func(*args, **kwargs)
        if not self._muted:
            self._count(func, args, kwargs, out)
        return out

    def _count(self, func, args, kwargs, out) -> None:
        c = self.counts[self.scope]
        kind = classify(func, args)
        if kind == "view":
            c.views += 1
            return
        c.allocations += _fresh_outputs(func, out)
        if kind == "sync" or _device_to_host(func, args, kwargs, out):
            c.syncs += 1
            if kind == "sync":
                return
        if kind == "alloc":
            return
        n = _kernels(func, args)
        c.launches += n
        self.by_op[self.scope][func._schema.name.split("::")[-1]] += n
        if kind == "copy":
            c.copies += n

    # -- results --------------------------------------------------------------------------
    def total(self, scopes: Iterable[str] | None = None) -> Counts:
        keys = list(self.counts) if scopes is None else scopes
        out = Counts()
        for k in keys:
            out = out + self.counts.get(k, Counts())
        return out

    def top_ops(self, n: int = 12, scopes: Iterable[str] | None = None) -> dict[str, int]:
        """The ``n`` operators that launched most (in ``scopes``, default all)."""
        totals: dict[str, int] = defaultdict(int)
        for scope in (list(self.by_op) if scopes is None else scopes):
            for name, k in self.by_op.get(scope, {}).items():
                totals[name] += k
        return dict(sorted(totals.items(), key=lambda kv: -kv[1])[:n])

    def report(self, layers: Iterable[str]) -> dict:
        """Plain data for a step counted with ``layers`` attributed: the whole step, the
        layers together and on average, the optimizer, and the top operators."""
        layers = list(layers)
        inside = self.total(layers)
        return dict(
            step=self.total().as_dict(), layers=len(layers), in_layers=inside.as_dict(),
            per_layer=inside.scaled(1 / len(layers)) if layers else None,
            optimizer=self.counts.get("optimizer", Counts()).as_dict(),
            top_ops=self.top_ops(), top_ops_in_layers=self.top_ops(scopes=layers))


def _composite(func) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(
        func.name(), torch._C.DispatchKey.CompositeImplicitAutograd)


def _subgraph(roots, stop) -> list:
    """The autograd nodes reachable from ``roots`` without passing through ``stop``."""
    seen, todo, out = set(), [r for r in roots if r is not None], []
    while todo:
        node = todo.pop()
        if node in seen or node in stop:
            continue
        seen.add(node)
        out.append(node)
        todo += [n for n, _ in node.next_functions if n is not None]
    return out


def count_step(step, layers: dict[str, torch.nn.Module] | None = None) -> LaunchCounter:
    """Run ``step()`` once under a :class:`LaunchCounter` attributing ``layers``; the counter."""
    counter = LaunchCounter()
    if layers:
        counter.attribute(layers)
    try:
        with counter:
            step()
    finally:
        counter.detach()
    return counter


def layer_step_counts(layer: torch.nn.Module, x: torch.Tensor) -> Counts:
    """What one training step (forward, ``sum().backward()``) of ``layer`` on ``x`` costs,
    counted after one uncounted warm-up step (which fills caches: T(θ0), compiled plans)."""
    def step():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).sum().backward()
    step()
    return count_step(step, {"layer": layer}).counts["layer"]


def extra_step_counts(layer: torch.nn.Module, plain: torch.nn.Module, x: torch.Tensor) -> Counts:
    """What an adapted ``layer``'s training step costs beyond the ``plain`` (trainable) layer
    it adapts: the adapter's own launches, copies, views, allocations and host syncs."""
    return layer_step_counts(layer, x) - layer_step_counts(plain, x)
