"""The base of every adapted ``nn.Conv3d`` (each family's layer lives in :mod:`tenvoo_fast.methods`)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import functional
from ..errors import AdapterError
from .adapter_layer import AdapterLayer, check_adaptable


def check_conv(conv, cls_name: str, name: str) -> None:
    """Refuse what a Conv3d adapter cannot wrap, naming the layer and the fix."""
    check_adaptable(conv, nn.Conv3d, cls_name, name)
    if conv.groups != 1:
        raise AdapterError(f"{name}: grouped convolution (groups={conv.groups}) is not supported: "
                           "the adapter networks model a dense [Cout, Cin, kD, kH, kW] weight; "
                           "exclude this layer from target_modules")
    if conv.transposed:  # pragma: no cover - nn.Conv3d is never transposed
        raise AdapterError(f"{name}: transposed convolutions are not supported")


def meta_conv3d_like(conv: nn.Conv3d) -> nn.Conv3d:
    """A plain ``nn.Conv3d`` with ``conv``'s hyper-parameters and dtype on the meta device (no
    memory)."""
    return nn.Conv3d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                     padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                     bias=conv.bias is not None, padding_mode=conv.padding_mode, device="meta",
                     dtype=conv.weight.dtype)


class AdaptedConv3d(AdapterLayer, nn.Conv3d):
    """Base of the adapted Conv3d layers: same hyper-parameters, weight and bias as the original."""

    @classmethod
    def check_wrappable(cls, conv, name: str) -> None:
        check_conv(conv, cls.__name__, name)

    @classmethod
    def from_conv(cls, conv: nn.Conv3d, rank: int, alpha: Optional[float] = None,
                  name: Optional[str] = None, **options):
        """Wrap ``conv`` with this baseline's network (scale ``alpha / rank``; ``options``: the
        family's own, such as LoKr's ``factor``); ``name`` names the layer in errors."""
        return cls._baseline(conv, rank, alpha, name, **options)

    @staticmethod
    def dims(conv: nn.Conv3d) -> tuple:
        """(out channels, in channels, taps (kernel size)): what a baseline's network needs."""
        return conv.out_channels, conv.in_channels, conv.kernel_size

    def _adopt(self, conv: nn.Conv3d) -> None:
        nn.Conv3d.__init__(self, conv.in_channels, conv.out_channels, conv.kernel_size,
                           stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                           groups=conv.groups, bias=conv.bias is not None,
                           padding_mode=conv.padding_mode, device="meta", dtype=conv.weight.dtype)
        self.weight = conv.weight
        self.bias = conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.adapted_conv3d(self, x)

    def plain_module(self) -> nn.Conv3d:
        return meta_conv3d_like(self)

    def extra_repr(self) -> str:
        meta = {k: v for k, v in self.network.meta.items() if k not in ("kernel_size",)}
        return f"{nn.Conv3d.extra_repr(self)}, adapter={self.network.method}, {meta}"
