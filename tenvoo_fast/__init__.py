"""tenvoo_fast: tensor-network adapters (TenVOO, QuanTA) and baselines for 3D conv nets.

Layers: ops (``reference``, the backends) -> modules (drop-in adapted layers) -> model API
(``inject``, ``merge_and_unload``, ``save_adapter``/``load_adapter``). The math lives in
``networks``; backend choice in ``backends``.
"""
from . import autotune, presets
from ._version import __version__
from .backends import available_backends, current_backend, set_backend, use_backend
from .checkpoint import (BaseMismatchWarning, base_fingerprint, load_adapter, read_adapter_base,
                         read_adapter_metadata, save_adapter)
from .config import AdapterConfig
from .errors import AdapterError
from .strategy import current_strategy, use_strategy
from .model import (adapter_layers, count_parameters, execution_plan, inject,
                    merge_and_unload)
from .modules import (AdapterLayer, LoHaConv3d, LoHaLinear, LoKrConv3d, LoKrLinear, LoRAConv3d,
                      LoRALinear, QuanTALinear, TenVOOConv3d)
from .reference import ReferenceBackend as _ReferenceBackend
from .recompute import RecomputeBackend as _RecomputeBackend
from .triton_backend import TritonBackend as _TritonBackend
from .native_backend import NativeBackend as _NativeBackend
from .backends import register_backend as _register_backend

_register_backend(_ReferenceBackend())
_register_backend(_RecomputeBackend())
_register_backend(_TritonBackend())
_register_backend(_NativeBackend("cpu"))
_register_backend(_NativeBackend("cuda"))

__all__ = [
    "__version__", "AdapterConfig", "AdapterError", "AdapterLayer", "TenVOOConv3d",
    "QuanTALinear", "LoRAConv3d", "LoHaConv3d", "LoKrConv3d", "LoRALinear", "LoHaLinear",
    "LoKrLinear", "inject", "merge_and_unload", "save_adapter", "load_adapter",
    "read_adapter_metadata", "read_adapter_base", "base_fingerprint", "BaseMismatchWarning",
    "adapter_layers", "execution_plan", "count_parameters",
    "available_backends",
    "current_backend", "use_backend", "set_backend", "use_strategy", "current_strategy",
    "presets", "autotune",
]
