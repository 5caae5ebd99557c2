"""The base of every adapted ``nn.Linear`` (each family's layer lives in :mod:`tenvoo_fast.methods`)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import functional
from .adapter_layer import AdapterLayer, check_adaptable


def meta_linear_like(linear: nn.Linear) -> nn.Linear:
    """A plain ``nn.Linear`` of ``linear``'s shape and dtype on the meta device (no memory)."""
    return nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                     device="meta", dtype=linear.weight.dtype)


class AdaptedLinear(AdapterLayer, nn.Linear):
    """Base of the adapted Linear layers: same shape, weight and bias as the original."""

    @classmethod
    def check_wrappable(cls, linear, name: str) -> None:
        check_adaptable(linear, nn.Linear, cls.__name__, name)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: Optional[float] = None,
                    name: Optional[str] = None, **options):
        """Wrap ``linear`` with this baseline's network (scale ``alpha / rank``; ``options``:
        the family's own, such as LoKr's ``factor``); ``name`` names the layer in errors."""
        return cls._baseline(linear, rank, alpha, name, **options)

    @staticmethod
    def dims(linear: nn.Linear) -> tuple:
        """(out features, in features, no taps): what a baseline's network needs."""
        return linear.out_features, linear.in_features, ()

    def _adopt(self, linear: nn.Linear) -> None:
        nn.Linear.__init__(self, linear.in_features, linear.out_features,
                           bias=linear.bias is not None, device="meta", dtype=linear.weight.dtype)
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.adapted_linear(self, x)

    def plain_module(self) -> nn.Linear:
        return meta_linear_like(self)

    def extra_repr(self) -> str:
        return f"{nn.Linear.extra_repr(self)}, adapter={self.network.method}, {self.network.meta}"
