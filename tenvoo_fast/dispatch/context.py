"""The one execution context: per thread, the backend and strategy asked for, and a measured
choice being applied (:mod:`.autotune`). Everything else about dispatch is decided from it."""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Optional


class _Context(threading.local):
    backend: str = "auto"
    strategy: str = "auto"
    #: A forced strategy a layer cannot run: raise (True) or run merged (False).
    strict: bool = True
    #: A measured strategy for the layer running now (autotune), applied under ``auto``.
    tuned: Optional[str] = None
    #: The merged strategy's effective weight between forward and backward: "recompute" or
    #: "keep" (see :func:`tenvoo_fast.dispatch.use_weight_policy`).
    weight_policy: str = "recompute"
    #: What a launch costs in ``auto``'s GPU cost model: the host's time ("host": an eager
    #: step) or a captured graph node's replay ("replay": ``--graph``).
    launch_cost: str = "host"


CONTEXT = _Context()


@contextlib.contextmanager
def _set(**values) -> Iterator[None]:
    previous = {k: getattr(CONTEXT, k) for k in values}
    for k, v in values.items():
        setattr(CONTEXT, k, v)
    try:
        yield
    finally:
        for k, v in previous.items():
            setattr(CONTEXT, k, v)


def current_backend() -> str:
    return CONTEXT.backend


def current_strategy() -> str:
    return CONTEXT.strategy


def set_backend_name(name: str) -> None:
    CONTEXT.backend = name


def backend_scope(name: str):
    return _set(backend=name)


def strategy_scope(name: str, strict: bool):
    return _set(strategy=name, strict=strict)


def current_weight_policy() -> str:
    return CONTEXT.weight_policy


def set_weight_policy_name(name: str) -> None:
    CONTEXT.weight_policy = name


def weight_policy_scope(name: str):
    return _set(weight_policy=name)


def current_launch_cost() -> str:
    return CONTEXT.launch_cost


def launch_cost_scope(name: str):
    return _set(launch_cost=name)


def tuned(choice: Optional[str]):
    """While set, ``auto`` uses ``choice`` (a measured strategy) for layers that can run it."""
    return _set(tuned=choice)
