"""The methods registry: a method's name -> how it adapts a Conv3d and a Linear layer.

Each family file (:mod:`.tenvoo`, :mod:`.quanta`, :mod:`.lora`, :mod:`.loha`, :mod:`.lokr`)
registers its methods here, so adding a method touches one file: its network builder, its layer
classes (which declare the execution strategies they support) and one :func:`register` call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

from ..errors import AdapterError

#: builder(module, config, name) -> the adapted layer (config: an AdapterConfig).
Builder = Callable[[object, object, str], object]


@dataclass(frozen=True)
class Method:
    """A method users name in an :class:`~tenvoo_fast.AdapterConfig`, and its two builders."""
    name: str
    conv3d: Optional[Builder]
    linear: Optional[Builder]
    summary: str = ""


_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in _METHODS:
        raise ValueError(f"method {method.name!r} is registered twice")
    _METHODS[method.name] = method
    return method


def method_names() -> tuple[str, ...]:
    """The registered method names, in registration order."""
    return tuple(_METHODS)


def get_method(name: str) -> Method:
    try:
        return _METHODS[name]
    except KeyError:
        raise AdapterError(f"unknown method {name!r}; choose one of {list(_METHODS)}") from None


def build(config, name: str, module):
    """The adapter layer ``config`` (an :class:`~tenvoo_fast.AdapterConfig`) gives the target
    ``module`` (an ``nn.Conv3d`` or ``nn.Linear``) named ``name``."""
    method = get_method(config.method)
    if isinstance(module, nn.Conv3d) and method.conv3d is not None:
        return method.conv3d(module, config, name)
    if isinstance(module, nn.Linear) and method.linear is not None:
        return method.linear(module, config, name)
    if isinstance(module, (nn.Conv3d, nn.Linear)):
        raise AdapterError(f"{name}: method {method.name!r} cannot adapt a "
                           f"{type(module).__name__}; exclude it from target_modules")
    raise AdapterError(
        f"{name}: target pattern matched a {type(module).__name__}, but only nn.Conv3d and "
        f"nn.Linear can be adapted; anchor the pattern so it names the layer itself (for "
        f"MONAI's Convolution wrapper, match '{name}.conv' with a pattern ending in '.conv$')")


def register_baseline(name: str, conv_class, linear_class, summary: str,
                      conv_options: Optional[dict] = None,
                      linear_options: Optional[dict] = None) -> Method:
    """Register a baseline whose layers are built as ``conv_class.from_conv(conv, rank, alpha,
    name=..., **options)`` and ``linear_class.from_linear(...)``; ``*_options`` map each
    option to the config attribute it comes from (e.g. ``{"mode": "lora_mode"}``)."""
    def builder(constructor, options):
        def build_layer(module, config, layer_name):
            extra = {k: getattr(config, attr) for k, attr in (options or {}).items()}
            return constructor(module, config.rank, config.alpha, name=layer_name, **extra)
        return build_layer
    return register(Method(name, builder(conv_class.from_conv, conv_options),
                           builder(linear_class.from_linear, linear_options), summary))
