"""The adapter methods as data: each family's tensor network, its layers, and the registry
that maps a method's name to them (:mod:`.registry`).

Families: :mod:`.tenvoo` (TenVOO-L/Q, Conv3d), :mod:`.quanta` (QuanTA, Linear), and the
baselines :mod:`.lora`, :mod:`.loha`, :mod:`.lokr`; :mod:`.channels` holds the channel-factor
table TenVOO and QuanTA share.
"""
from ..contraction.network import Core, Init, TensorNetwork
from .registry import Method, build, get_method, method_names, register
# Imported in the order the methods are listed to users (each import registers its methods).
from .tenvoo import TENVOO_EQUATIONS, TENVOO_WEIGHT_OUTPUT, TenVOOConv3d, tenvoo  # noqa: I001
from .quanta import QUANTA_ACTIVATION_EQUATION, QUANTA_WEIGHT_EQUATION, QuanTALinear, quanta
from .lora import LoRAConv2d, LoRAConv3d, LoRALinear, lora
from .loha import LoHaConv2d, LoHaConv3d, LoHaLinear, loha
from .lokr import (LoKrConv2d, LoKrConv3d, LoKrLinear, lokr,
                   lycoris_factorization)

__all__ = ["Core", "Init", "TensorNetwork", "Method", "register", "get_method", "method_names",
           "build",
           "tenvoo", "quanta", "lora", "loha", "lokr", "lycoris_factorization",
           "TenVOOConv3d", "QuanTALinear", "LoRAConv3d", "LoRAConv2d", "LoRALinear",
           "LoHaConv3d", "LoHaConv2d", "LoHaLinear", "LoKrConv3d", "LoKrConv2d", "LoKrLinear", "TENVOO_EQUATIONS", "TENVOO_WEIGHT_OUTPUT",
           "QUANTA_WEIGHT_EQUATION", "QUANTA_ACTIVATION_EQUATION"]
