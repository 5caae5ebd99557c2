"""Drop-in adapted layers: what every adapted ``nn.Conv3d`` / ``nn.Conv2d`` / ``nn.Linear``
shares (cores, frozen copy, ΔW, effective weight, dtype and device handling). Their forwards call
:mod:`tenvoo_fast.functional`; each family's layer class (``TenVOOConv3d``, ``QuanTALinear``,
``LoRAConv3d``...) lives with its network in :mod:`tenvoo_fast.methods`."""
from .adapter_layer import AdapterLayer
from .conv2d import AdaptedConv2d
from .conv3d import AdaptedConv3d
from .linear import AdaptedLinear

__all__ = ["AdapterLayer", "AdaptedConv3d", "AdaptedConv2d", "AdaptedLinear"]
