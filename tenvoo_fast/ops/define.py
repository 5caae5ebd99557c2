"""How every adapter op is defined: ``torch.library.custom_op``, with its Python body kept.

The body is kept (:data:`BODIES`) so that a measurement can run an op's body in place of the
opaque op and see the operator calls it makes (:mod:`tenvoo_fast.measure.launches`): under a
``TorchDispatchMode`` a custom op is one call and its insides are invisible. Eager calls run
the body through a plain ``autograd.Function`` (:mod:`.autograd`): the custom-op dispatch costs
more host time than the adapter's own work at small sizes; ``torch.compile`` sees the op.
"""
from __future__ import annotations

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
        op = torch.library.custom_op(name, **kwargs)(fn)
        BODY_OF[op] = fn
        return op
    return define
