"""An adapter's update ΔW as data: a tensor network.

Every adapter's ΔW is a list of cores (stored shape, einsum letters, initialisation) contracted
by one einsum whose output is laid out exactly like the layer's weight (``[Cout, Cin, kD, kH,
kW]`` or ``[out, in]``), times a scale. The families in :mod:`tenvoo_fast.methods` build these;
everything that executes an adapter reads one, and none re-states the math.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class Init:
    """How a core is initialised: ``uniform`` on [-value, value], ``normal`` with std value, or ``zeros``."""
    kind: str
    value: float = 0.0


@dataclass(frozen=True)
class Core:
    """One core: the shape it is stored (and checkpointed) with, and its einsum letters.

    ``view`` is the shape the contraction reads it as, when that differs from the stored shape
    (a free reshape, e.g. LoHa's ``(r, Cin*k)`` factor read as ``(r, Cin, kD, kH, kW)``).
    """
    shape: tuple[int, ...]
    indices: str
    init: Init
    view: Optional[tuple[int, ...]] = None

    @property
    def contraction_shape(self) -> tuple[int, ...]:
        return self.view if self.view is not None else self.shape

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class TensorNetwork:
    """ΔW = scale * einsum(equation, *cores).reshape(weight_shape)."""
    method: str
    cores: tuple[Core, ...]
    output: str
    weight_shape: tuple[int, ...]
    scale: float = 1.0
    #: Extra, method-specific facts (factors, rank, ...) for reprs, checkpoints and kernels.
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def __hash__(self) -> int:
        # Hashed on every forward (the strategy's cost cache is keyed on the network): the
        # generated hash would walk every core each time, so it is computed once.
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash((self.method, self.cores, self.output, self.weight_shape, self.scale))
            object.__setattr__(self, "_hash", h)
        return h

    def __getstate__(self) -> dict:
        # Without the caches: a string's hash differs between processes.
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __setstate__(self, state: dict) -> None:
        for k, v in state.items():
            object.__setattr__(self, k, v)

    @property
    def equation(self) -> str:
        return ",".join(c.indices for c in self.cores) + "->" + self.output

    @property
    def contraction_shapes(self) -> tuple[tuple[int, ...], ...]:
        """The cores' shapes as the contraction reads them (cached)."""
        shapes = self.__dict__.get("_contraction_shapes")
        if shapes is None:
            shapes = tuple(c.contraction_shape for c in self.cores)
            object.__setattr__(self, "_contraction_shapes", shapes)
        return shapes

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        return tuple(c.shape for c in self.cores)

    @property
    def num_params(self) -> int:
        return sum(c.numel for c in self.cores)

    def views(self, tensors) -> list:
        """Stored-shape core ``tensors`` reshaped as the contraction reads them (the tensors
        themselves where the shapes agree: a no-op view would still cost an autograd node)."""
        return [t if c.view is None else t.reshape(c.view) for t, c in zip(tensors, self.cores)]


ZEROS = Init("zeros")
