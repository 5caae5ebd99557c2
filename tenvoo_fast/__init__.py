"""tenvoo_fast: tensor-network adapters (TenVOO, QuanTA) and baselines for 3D conv nets.

From the bottom up: the tensor-network algebra (:mod:`.contraction`), the ``torch.library`` ops
(:mod:`.ops`) and who runs their heavy steps (:mod:`.kernels`, :mod:`.triton_kernels`), the one
dispatch decision (:mod:`.dispatch`), the layers' forwards (:mod:`.functional`), the adapted
layers (:mod:`.nn`, each family's in :mod:`.methods`) and the model API (:mod:`.model`). The
3D DDPM fine-tuning program is :mod:`.ddpm` (install extra ``ddpm``). Importing this package
needs only torch, opt_einsum and safetensors.
"""
from . import methods
from .convert import convert, export_peft
from ._version import __version__
from .dispatch import (autotune, available_backends, current_backend, current_strategy,
                       current_weight_policy, set_backend, set_weight_policy, use_backend,
                       use_launch_cost, use_strategy, use_weight_policy)
from .errors import AdapterError
from .methods import (LoHaConv2d, LoHaConv3d, LoHaLinear, LoKrConv2d, LoKrConv3d, LoKrLinear,
                      LoRAConv2d, LoRAConv3d, LoRALinear, QuanTALinear, TenVOOConv3d)
from .model import (AdapterConfig, BaseMismatchWarning, adapter_layers, base_fingerprint,
                    count_parameters, execution_plan, fold_frozen, folded_layers, inject,
                    load_adapter, merge_and_unload, presets, read_adapter_base,
                    read_adapter_metadata, save_adapter)
from .nn import AdapterLayer

#: The network builders under their earlier module name (``tf.networks.tenvoo(...)``).
networks = methods

__all__ = [
    "__version__", "convert", "export_peft", "AdapterConfig", "AdapterError", "AdapterLayer", "TenVOOConv3d",
    "QuanTALinear", "LoRAConv3d", "LoHaConv3d", "LoKrConv3d", "LoRAConv2d", "LoHaConv2d",
    "LoKrConv2d", "LoRALinear", "LoHaLinear",
    "LoKrLinear", "inject", "merge_and_unload", "save_adapter", "load_adapter",
    "read_adapter_metadata", "read_adapter_base", "base_fingerprint", "BaseMismatchWarning",
    "adapter_layers", "execution_plan", "count_parameters", "fold_frozen", "folded_layers",
    "available_backends",
    "current_backend", "use_backend", "set_backend", "use_strategy", "current_strategy",
    "use_weight_policy", "set_weight_policy", "current_weight_policy", "use_launch_cost", "presets", "autotune",
    "methods",
]
