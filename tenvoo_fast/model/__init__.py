"""The model-level API: a configuration as plain data (:mod:`.config`), injecting adapters into
a model and merging them back out (:mod:`.inject`), the memory check before injection
(:mod:`.memory`), adapter files (:mod:`.adapter_file`, and the published TenVOO code's
checkpoints: :mod:`.published_checkpoint`) and ready-made configurations (:mod:`.presets`)."""
from . import presets
from .adapter_file import (BaseMismatchWarning, base_fingerprint, load_adapter, load_published,
                           read_adapter_base, read_adapter_metadata, save_adapter)
from .published_checkpoint import IncompleteAdapterWarning
from .config import AdapterConfig
from .fold import fold_frozen, folded_layers
from .inject import (adapter_layers, adapter_memory, count_parameters, execution_plan,
                     get_config, inject, mark_trainable, merge_and_unload, unwrap)
from .memory import available_memory

__all__ = ["AdapterConfig", "inject", "merge_and_unload", "mark_trainable", "adapter_layers",
           "adapter_memory", "available_memory", "execution_plan", "count_parameters",
           "get_config", "unwrap", "save_adapter", "load_adapter", "read_adapter_metadata",
           "read_adapter_base", "base_fingerprint", "BaseMismatchWarning", "presets",
           "load_published", "IncompleteAdapterWarning",
           "fold_frozen", "folded_layers"]
