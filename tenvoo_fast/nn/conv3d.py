"""The base of every adapted ``nn.Conv3d`` (each family's layer lives in :mod:`tenvoo_fast.methods`)."""
from __future__ import annotations

import torch
from torch import nn

from .. import functional
from .adapted_conv import AdaptedConv


class AdaptedConv3d(AdaptedConv, nn.Conv3d):
    """Base of the adapted Conv3d layers: same hyper-parameters, weight and bias as the original;
    every backend runs them."""

    conv_class = nn.Conv3d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.adapted_conv3d(self, x)
