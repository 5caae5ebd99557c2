"""Adapted ``nn.Conv3d`` layers: TenVOO-L/Q and the LoRA/LoCon, LoHa and LoKr baselines."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import networks
from ..errors import AdapterError
from ..factorization import resolve_factors
from .adapter_layer import AdapterLayer


def _check_conv(conv, cls_name: str, name: str) -> None:
    if not isinstance(conv, nn.Conv3d):
        raise AdapterError(f"{name}: {cls_name}.from_conv needs an nn.Conv3d, got "
                           f"{type(conv).__name__}; adapt Linear layers with the *Linear classes")
    if isinstance(conv, AdapterLayer):
        raise AdapterError(f"{name}: this layer is already adapted ({type(conv).__name__}); "
                           "adapt the original layer, or merge_and_unload first")
    if conv.groups != 1:
        raise AdapterError(f"{name}: grouped convolution (groups={conv.groups}) is not supported: "
                           "the adapter networks model a dense [Cout, Cin, kD, kH, kW] weight; "
                           "exclude this layer from target_modules")
    if conv.transposed:  # pragma: no cover - nn.Conv3d is never transposed
        raise AdapterError(f"{name}: transposed convolutions are not supported")


class AdaptedConv3d(AdapterLayer, nn.Conv3d):
    """Base of the adapted Conv3d layers: same hyper-parameters, weight and bias as the original."""

    def _adopt(self, conv: nn.Conv3d) -> None:
        nn.Conv3d.__init__(self, conv.in_channels, conv.out_channels, conv.kernel_size,
                           stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                           groups=conv.groups, bias=conv.bias is not None,
                           padding_mode=conv.padding_mode, device="meta", dtype=conv.weight.dtype)
        self.weight = conv.weight
        self.bias = conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._dispatch_forward(x, "conv3d")

    def merged_module(self) -> nn.Conv3d:
        """A plain ``nn.Conv3d`` whose weight is the effective weight (formed in fp32)."""
        conv = nn.Conv3d(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                         padding=self.padding, dilation=self.dilation, groups=self.groups,
                         bias=self.bias is not None, padding_mode=self.padding_mode,
                         device="meta", dtype=self.weight.dtype)
        conv.weight = nn.Parameter(self.merged_weight())
        if self.bias is not None:
            conv.bias = nn.Parameter(self.bias.detach().clone())
        return conv

    def extra_repr(self) -> str:
        meta = {k: v for k, v in self.network.meta.items() if k not in ("kernel_size",)}
        return f"{nn.Conv3d.extra_repr(self)}, adapter={self.network.method}, {meta}"


class TenVOOConv3d(AdaptedConv3d):
    """Conv3d adapted with TenVOO-L or TenVOO-Q: ``y = conv3d(x, W - T(θ0) + T(θ)) + b``.

    ``.cores`` holds the ten cores in the spec's (checkpoint) order.
    """

    @classmethod
    def from_conv(cls, conv: nn.Conv3d, rank: int, variant: str = "L",
                  factors: Optional[Sequence[Sequence[int]]] = None, init: str = "frozen-copy",
                  name: Optional[str] = None) -> "TenVOOConv3d":
        """Wrap ``conv``; ``factors=((i1, i2, i3), (o1, o2, o3))`` overrides the table."""
        name = name or cls.__name__
        _check_conv(conv, cls.__name__, name)
        fin, fout = resolve_factors(factors, conv.in_channels, conv.out_channels, layer=name)
        net = networks.tenvoo(variant, fin, fout, conv.kernel_size, rank, init=init, layer=name)
        return cls._build(conv, net, name, frozen_copy=(init == "frozen-copy"))


class LoRAConv3d(AdaptedConv3d):
    """LoRA / LoCon on a Conv3d: ΔW = s * up ×_r down.

    ``mode="merged"`` runs ``conv(x, W + ΔW)``; ``mode="bypass"`` runs
    ``conv(x, W) + s * up(down(x))``, as peft's LoRA Conv3d does.
    """

    @classmethod
    def from_conv(cls, conv: nn.Conv3d, rank: int, alpha: Optional[float] = None,
                  mode: str = "merged", name: Optional[str] = None) -> "LoRAConv3d":
        name = name or cls.__name__
        _check_conv(conv, cls.__name__, name)
        if mode not in ("merged", "bypass"):
            raise AdapterError(f"{name}: mode must be 'merged' or 'bypass', got {mode!r}")
        net = networks.lora(conv.out_channels, conv.in_channels, conv.kernel_size, rank, alpha,
                            layer=name)
        self = cls._build(conv, net, name)
        self.mode = mode
        return self

    @property
    def down(self) -> nn.Parameter:
        return self.cores[0]

    @property
    def up(self) -> nn.Parameter:
        return self.cores[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "merged":
            return super().forward(x)
        x = self._check_input(x)
        dt = self.compute_dtype(x)
        base = self._conv_forward(x, self.weight.to(dt), None if self.bias is None else self.bias.to(dt))
        h = self._conv_forward(x, self.down.to(dt), None)
        return base + self.network.scale * F.conv3d(h, self.up.to(dt))


class LoHaConv3d(AdaptedConv3d):
    """LoHa on a Conv3d: ΔW = s * (w1a @ w1b) ⊙ (w2a @ w2b); cores (w1a, w1b, w2a, w2b)."""

    @classmethod
    def from_conv(cls, conv: nn.Conv3d, rank: int, alpha: Optional[float] = None,
                  name: Optional[str] = None) -> "LoHaConv3d":
        name = name or cls.__name__
        _check_conv(conv, cls.__name__, name)
        net = networks.loha(conv.out_channels, conv.in_channels, conv.kernel_size, rank, alpha,
                            layer=name)
        return cls._build(conv, net, name)


class LoKrConv3d(AdaptedConv3d):
    """LoKr on a Conv3d: ΔW = s * kron(w1, w2); cores (w1, w2) or (w1, w2a, w2b)."""

    @classmethod
    def from_conv(cls, conv: nn.Conv3d, rank: int, alpha: Optional[float] = None,
                  factor: int = -1, full_w2: Optional[bool] = None,
                  name: Optional[str] = None) -> "LoKrConv3d":
        name = name or cls.__name__
        _check_conv(conv, cls.__name__, name)
        net = networks.lokr(conv.out_channels, conv.in_channels, conv.kernel_size, rank, alpha,
                            factor=factor, full_w2=full_w2, layer=name)
        return cls._build(conv, net, name)
