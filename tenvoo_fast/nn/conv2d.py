"""The base of the adapted ``nn.Conv2d`` layers (LoRA, LoHa, LoKr: the baselines users bring from
2-D models through peft and LyCORIS)."""
from __future__ import annotations

import torch
from torch import nn

from .. import functional
from .adapted_conv import AdaptedConv


class AdaptedConv2d(AdaptedConv, nn.Conv2d):
    """Base of the adapted Conv2d layers: same hyper-parameters, weight and bias as the
    original. They run on the reference backend (autograd through the network's einsum and
    ``conv2d``); the fast kernels are written for Conv3d and Linear layers."""

    conv_class = nn.Conv2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.adapted_conv2d(self, x)
