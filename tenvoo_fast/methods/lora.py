"""LoRA / LoCon (adapters.md §5): ΔW = s · up ×_r down on Conv3d, Conv2d and Linear layers."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from .. import functional
from ..contraction.network import ZEROS, Core, TensorNetwork
from ..errors import AdapterError
from ..nn.conv2d import AdaptedConv2d
from ..nn.conv3d import AdaptedConv3d
from ..nn.linear import AdaptedLinear
from .common import TAP_LETTERS, alpha_scale, check_rank, kaiming_uniform_a5
from .registry import register_baseline

MODES = ("merged", "bypass")


def lora(cout: int, cin: int, taps: Sequence[int], rank: int, alpha=None, *,
         layer: str = "LoRA") -> TensorNetwork:
    """LoRA / LoCon: ΔW = s * up ×_r down; down (r, Cin, *k) Kaiming-uniform, up (Cout, r, 1..)
    zeros; ``taps`` is () for a Linear, (kH, kW) for a Conv2d, (kD, kH, kW) for a Conv3d."""
    r = check_rank(rank, layer)
    k = tuple(taps)
    kl = TAP_LETTERS[:len(k)]
    fan_in = cin * math.prod(k)
    down = Core((r, cin, *k), "rI" + kl, kaiming_uniform_a5(fan_in))
    up = Core((cout, r, *(1,) * len(k)), "Or" + "uvw"[:len(k)], ZEROS)
    return TensorNetwork("lora", (down, up), "OI" + kl, (cout, cin, *k), alpha_scale(alpha, r),
                         meta=dict(rank=r, alpha=alpha))


class _DownUp:
    """LoRA's two cores by name."""

    @property
    def down(self) -> nn.Parameter:
        return self.cores[0]

    @property
    def up(self) -> nn.Parameter:
        return self.cores[1]


class _LoRAConv(_DownUp):
    """LoRA's conv layers: merged or peft's bypass form."""

    @classmethod
    def from_conv(cls, conv: nn.Module, rank: int, alpha: Optional[float] = None,
                  mode: str = "merged", name: Optional[str] = None):
        if mode not in MODES:
            raise AdapterError(f"{name or cls.__name__}: mode must be 'merged' or 'bypass', got "
                               f"{mode!r}")
        self = cls._baseline(conv, rank, alpha, name)
        self.mode = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "merged":
            return super().forward(x)
        return functional.lora_bypass_conv(self, x)


class LoRAConv3d(_LoRAConv, AdaptedConv3d):
    """LoRA / LoCon on a Conv3d: ΔW = s * up ×_r down.

    ``mode="merged"`` runs ``conv(x, W + ΔW)``; ``mode="bypass"`` runs
    ``conv(x, W) + s * up(down(x))``, as peft's LoRA Conv3d does.
    """
    network_of = staticmethod(lora)


class LoRAConv2d(_LoRAConv, AdaptedConv2d):
    """LoRA / LoCon on a Conv2d (the reference runs it), modes as :class:`LoRAConv3d`."""
    network_of = staticmethod(lora)


class LoRALinear(_DownUp, AdaptedLinear):
    """LoRA on a Linear: ΔW = s * up @ down; down (r, in), up (out, r).
    ``LoRALinear.from_linear(linear, rank, alpha=None, name=None)``."""
    network_of = staticmethod(lora)


register_baseline("lora", LoRAConv3d, LoRALinear,
                  "LoRA / LoCon on Conv3d, Conv2d and Linear layers",
                  conv_options={"mode": "lora_mode"}, conv2d_class=LoRAConv2d)
