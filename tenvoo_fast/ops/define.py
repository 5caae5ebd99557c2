"""How every adapter op is defined: ``torch.library.custom_op``, with its Python body kept.

The body is kept (:data:`BODIES`) so that a measurement can run an op's body in place of the
opaque op and see the operator calls it makes (:mod:`tenvoo_fast.measure.launches`): under a
``TorchDispatchMode`` a custom op is one call and its insides are invisible. Eager calls run
the body through a plain ``autograd.Function`` (:mod:`.autograd`): the custom-op dispatch costs
more host time than the adapter's own work at small sizes; ``torch.compile`` sees the op.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable

import torch

#: Qualified op name ("tenvoo_fast::merged_conv3d") -> the Python function the op runs.
BODIES: dict[str, Callable] = {}
#: The op object (what ``custom_op`` returned) -> its body.
BODY_OF: dict = {}


def custom_op(name: str, **kwargs):
    """``torch.library.custom_op(name, **kwargs)`` that also records the body in :data:`BODIES`."""
    def define(fn):
        BODIES[name] = fn
        schema = torch.library.infer_schema(fn, mutates_args=kwargs["mutates_args"])

        @functools.wraps(fn)
        def run(*args, **kw):
            return _unaliased(fn(*args, **kw))
        op = torch.library.custom_op(name, schema=schema, **kwargs)(run)
        BODY_OF[op] = fn
        return op
    return define


def _unaliased(out):
    """A body's list of outputs with those that share storage with an earlier one cloned: a
    custom op's outputs may not alias each other, while the eager path (the body called
    directly) keeps the views (the cores' gradients, one buffer)."""
    if not isinstance(out, list):
        return out
    seen, fixed = set(), []
    for t in out:
        if isinstance(t, torch.Tensor) and t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                t = t.clone()
            seen.add(ptr)
        fixed.append(t)
    return fixed


def exact_math(device_type: str):
    """The context every op body computes in: autocast off and no autograd recording. Only
    what is on is switched off (entering ``torch.autocast`` costs host time on every call)."""
    if device_type != "meta" and torch.is_autocast_enabled(device_type):
        return _autocast_off_no_grad(device_type)
    return torch.no_grad() if torch.is_grad_enabled() else contextlib.nullcontext()


@contextlib.contextmanager
def _autocast_off_no_grad(device_type: str):
    with torch.autocast(device_type, enabled=False), torch.no_grad():
        yield
