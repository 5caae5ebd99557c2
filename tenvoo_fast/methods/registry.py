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
    """A method users name in an :class:`~tenvoo_fast.AdapterConfig`, and its builders (None:
    the method does not adapt that layer type)."""
    name: str
    conv3d: Optional[Builder]
    linear: Optional[Builder]
    summary: str = ""
    conv2d: Optional[Builder] = None


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
    ``module`` (an ``nn.Conv3d``, ``nn.Conv2d`` or ``nn.Linear``) named ``name``."""
    method = get_method(config.method)
    for kind, builder in ((nn.Conv3d, method.conv3d), (nn.Conv2d, method.conv2d),
                          (nn.Linear, method.linear)):
        if isinstance(module, kind):
            if builder is None:
                able = [n for n in _METHODS if getattr(_METHODS[n], kind.__name__.lower())]
                raise AdapterError(f"{name}: method {method.name!r} cannot adapt a "
                                   f"{kind.__name__} ({', '.join(able)} can); exclude it from "
                                   "target_modules")
            return builder(module, config, name)
    raise AdapterError(
        f"{name}: target pattern matched a {type(module).__name__}, but only nn.Conv3d, "
        "nn.Conv2d and nn.Linear can be adapted; anchor the pattern so it names the layer "
        f"itself (for MONAI's Convolution wrapper, match '{name}.conv' with a pattern ending "
        "in '.conv$')")


def register_baseline(name: str, conv_class, linear_class, summary: str,
                      conv_options: Optional[dict] = None,
                      linear_options: Optional[dict] = None, conv2d_class=None) -> Method:
    """Register a baseline whose layers are built as ``conv_class.from_conv(conv, rank, alpha,
    name=..., **options)``, ``linear_class.from_linear(...)`` and, for a Conv2d,
    ``conv2d_class.from_conv(...)`` (with the conv options); ``*_options`` map each option to
    the config attribute it comes from (e.g. ``{"mode": "lora_mode"}``)."""
    def builder(constructor, options):
        def build_layer(module, config, layer_name):
            extra = {k: getattr(config, attr) for k, attr in (options or {}).items()}
            return constructor(module, config.rank, config.alpha, name=layer_name, **extra)
        return build_layer
    return register(Method(name, builder(conv_class.from_conv, conv_options),
                           builder(linear_class.from_linear, linear_options), summary,
                           None if conv2d_class is None
                           else builder(conv2d_class.from_conv, conv_options)))
