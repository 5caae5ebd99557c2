"""Adapted ``nn.Linear`` layers: QuanTA and the LoRA, LoHa and LoKr baselines."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .. import networks
from ..errors import AdapterError
from ..factorization import resolve_factors
from .adapter_layer import AdapterLayer


def _check_linear(linear, cls_name: str, name: str) -> None:
    if not isinstance(linear, nn.Linear):
        raise AdapterError(f"{name}: {cls_name}.from_linear needs an nn.Linear, got "
                           f"{type(linear).__name__}; adapt Conv3d layers with the *Conv3d classes")
    if isinstance(linear, AdapterLayer):
        raise AdapterError(f"{name}: this layer is already adapted ({type(linear).__name__}); "
                           "adapt the original layer, or merge_and_unload first")


class AdaptedLinear(AdapterLayer, nn.Linear):
    """Base of the adapted Linear layers: same shape, weight and bias as the original."""

    def _adopt(self, linear: nn.Linear) -> None:
        nn.Linear.__init__(self, linear.in_features, linear.out_features,
                           bias=linear.bias is not None, device="meta", dtype=linear.weight.dtype)
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._dispatch_forward(x, "linear")

    def merged_module(self) -> nn.Linear:
        """A plain ``nn.Linear`` whose weight is the effective weight (formed in fp32)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device="meta", dtype=self.weight.dtype)
        lin.weight = nn.Parameter(self.merged_weight())
        if self.bias is not None:
            lin.bias = nn.Parameter(self.bias.detach().clone())
        return lin

    def extra_repr(self) -> str:
        return f"{nn.Linear.extra_repr(self)}, adapter={self.network.method}, {self.network.meta}"


class QuanTALinear(AdaptedLinear):
    """Linear adapted with QuanTA: ``y = x (W - Q(θ0) + Q(θ))ᵀ + b``; ``.gates`` in spec order."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int,
                    factors: Optional[Sequence[Sequence[int]]] = None, init: str = "frozen-copy",
                    name: Optional[str] = None) -> "QuanTALinear":
        """Wrap ``linear``; ``factors=((n1, n2, n3), (m1, m2, m3))`` overrides the table."""
        name = name or cls.__name__
        _check_linear(linear, cls.__name__, name)
        fin, fout = resolve_factors(factors, linear.in_features, linear.out_features, layer=name)
        return cls._build(linear, networks.quanta(fin, fout, rank, init=init, layer=name),
                          name, frozen_copy=(init == "frozen-copy"))

    @property
    def gates(self) -> nn.ParameterList:
        return self.cores


class LoRALinear(AdaptedLinear):
    """LoRA on a Linear: ΔW = s * up @ down; down (r, in), up (out, r)."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: Optional[float] = None,
                    name: Optional[str] = None) -> "LoRALinear":
        name = name or cls.__name__
        _check_linear(linear, cls.__name__, name)
        return cls._build(linear, networks.lora(
            linear.out_features, linear.in_features, (), rank, alpha, layer=name), name)

    @property
    def down(self) -> nn.Parameter:
        return self.cores[0]

    @property
    def up(self) -> nn.Parameter:
        return self.cores[1]


class LoHaLinear(AdaptedLinear):
    """LoHa on a Linear: ΔW = s * (w1a @ w1b) ⊙ (w2a @ w2b)."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: Optional[float] = None,
                    name: Optional[str] = None) -> "LoHaLinear":
        name = name or cls.__name__
        _check_linear(linear, cls.__name__, name)
        return cls._build(linear, networks.loha(
            linear.out_features, linear.in_features, (), rank, alpha, layer=name), name)


class LoKrLinear(AdaptedLinear):
    """LoKr on a Linear: ΔW = s * kron(w1, w2)."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: Optional[float] = None,
                    factor: int = -1, full_w2: Optional[bool] = None,
                    name: Optional[str] = None) -> "LoKrLinear":
        name = name or cls.__name__
        _check_linear(linear, cls.__name__, name)
        return cls._build(linear, networks.lokr(
            linear.out_features, linear.in_features, (), rank, alpha, factor=factor,
            full_w2=full_w2, layer=name), name)
