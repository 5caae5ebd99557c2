"""What adapted ``nn.Conv3d`` and ``nn.Conv2d`` layers share: the checks, adopting the original
layer, and the plain layer a merge gives back."""
from __future__ import annotations

from typing import Optional

from torch import nn

from ..errors import AdapterError
from .adapter_layer import AdapterLayer, check_adaptable


def check_conv(conv, kind: type, cls_name: str, name: str) -> None:
    """Refuse what a ``kind`` (Conv3d / Conv2d) adapter cannot wrap, naming the layer and the
    fix."""
    check_adaptable(conv, kind, cls_name, name)
    if conv.groups != 1:
        raise AdapterError(f"{name}: grouped convolution (groups={conv.groups}) is not supported: "
                           "the adapter networks model a dense [Cout, Cin, *kernel] weight; "
                           "exclude this layer from target_modules")


def meta_conv_like(conv: nn.Module) -> nn.Module:
    """A plain ``nn.Conv3d`` / ``nn.Conv2d`` with ``conv``'s hyper-parameters and dtype on the
    meta device (no memory)."""
    kind = nn.Conv3d if isinstance(conv, nn.Conv3d) else nn.Conv2d
    return kind(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                bias=conv.bias is not None, padding_mode=conv.padding_mode, device="meta",
                dtype=conv.weight.dtype)


class AdaptedConv(AdapterLayer):
    """Mixin of the adapted conv bases: ``conv_class`` is the torch layer they replace."""

    conv_class: type

    @classmethod
    def check_wrappable(cls, conv, name: str) -> None:
        check_conv(conv, cls.conv_class, cls.__name__, name)

    @classmethod
    def from_conv(cls, conv: nn.Module, rank: int, alpha: Optional[float] = None,
                  name: Optional[str] = None, **options):
        """Wrap ``conv`` with this baseline's network (scale ``alpha / rank``; ``options``: the
        family's own, such as LoKr's ``factor``); ``name`` names the layer in errors."""
        return cls._baseline(conv, rank, alpha, name, **options)

    @staticmethod
    def dims(conv: nn.Module) -> tuple:
        """(out channels, in channels, taps (kernel size)): what a baseline's network needs."""
        return conv.out_channels, conv.in_channels, conv.kernel_size

    def _adopt(self, conv: nn.Module) -> None:
        self.conv_class.__init__(
            self, conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
            padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
            bias=conv.bias is not None, padding_mode=conv.padding_mode, device="meta",
            dtype=conv.weight.dtype)
        self.weight = conv.weight
        self.bias = conv.bias

    def plain_module(self) -> nn.Module:
        return meta_conv_like(self)

    def extra_repr(self) -> str:
        meta = {k: v for k, v in self.network.meta.items() if k not in ("kernel_size",)}
        return f"{self.conv_class.extra_repr(self)}, adapter={self.network.method}, {meta}"
