"""Drop-in adapted layers."""
from .adapter_layer import AdapterLayer
from .conv3d import AdaptedConv3d, LoHaConv3d, LoKrConv3d, LoRAConv3d, TenVOOConv3d
from .linear import AdaptedLinear, LoHaLinear, LoKrLinear, LoRALinear, QuanTALinear

__all__ = ["AdapterLayer", "AdaptedConv3d", "AdaptedLinear", "TenVOOConv3d", "LoRAConv3d",
           "LoHaConv3d", "LoKrConv3d", "QuanTALinear", "LoRALinear", "LoHaLinear", "LoKrLinear"]
