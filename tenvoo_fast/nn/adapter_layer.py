"""What every adapted layer shares: its cores, the frozen copy, ΔW and the effective weight.

An adapted layer *is* the layer it replaces (a subclass of ``nn.Conv3d``, ``nn.Conv2d`` or
``nn.Linear``): it
keeps the original weight and bias Parameter objects, so ``state_dict`` keys, attributes such as
``in_channels`` and optimisers that already hold the bias keep working. The math comes from a
:class:`~tenvoo_fast.contraction.network.TensorNetwork`; the execution from
:mod:`tenvoo_fast.functional`, which asks :mod:`tenvoo_fast.dispatch` how to run it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import functional
from ..contraction import reference
from ..contraction.network import TensorNetwork
from ..dispatch.backends import get_backend
from ..errors import AdapterError


class BufferList(nn.Module):
    """Frozen tensors saved in ``state_dict`` and moved by ``.to()``, addressed by index."""

    def __init__(self, tensors):
        super().__init__()
        for i, t in enumerate(tensors):
            self.register_buffer(str(i), t)

    def __len__(self):
        return len(self._buffers)

    def __iter__(self):
        return iter(self._buffers[str(i)] for i in range(len(self)))

    def __getitem__(self, i: int) -> torch.Tensor:
        return self._buffers[str(i)]


def init_core(core, shape, device, dtype) -> torch.Tensor:
    t = torch.empty(shape, device=device, dtype=dtype)
    if core.init.kind == "uniform":
        return t.uniform_(-core.init.value, core.init.value)
    if core.init.kind == "normal":
        return t.normal_(0.0, core.init.value)
    if core.init.kind == "zeros":
        return t.zero_()
    raise AssertionError(core.init)  # pragma: no cover


def master_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype cores and frozen copies keep for a layer of ``dtype``: fp64 for fp64, else fp32
    (never the bf16/fp16 of a low-precision model, whose rounding would swamp small updates)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _keeping_master(fn):
    """``fn`` (a ``Module._apply`` conversion) for cores and frozen copies: where it would cast
    them below fp32, the original tensor is moved as ``fn`` moves it but stays fp32 instead
    (cast from the original, so no precision is lost on the way). Memory formats pass them by:
    ``model.to(memory_format=torch.channels_last_3d)`` is meant for activations and conv
    weights, and torch refuses it for the 4-D cores (they stay contiguous, as kernels read
    them)."""
    def convert(t):
        out = fn(t.reshape(-1)).view(t.shape) if t.dim() in (4, 5) else fn(t)
        if out.is_floating_point() and out.element_size() < 4 and t.element_size() >= 4:
            return t.to(device=out.device, dtype=torch.float32)
        return out
    return convert


def autocast_on(device_type: str) -> bool:
    """``torch.is_autocast_enabled`` that answers False for the meta device (which it refuses)."""
    return device_type != "meta" and torch.is_autocast_enabled(device_type)


def plain_tensor(x: torch.Tensor) -> torch.Tensor:
    """MONAI ``MetaTensor`` -> plain tensor (its metadata is irrelevant to a conv/linear)."""
    as_tensor = getattr(x, "as_tensor", None)
    return as_tensor() if as_tensor is not None and type(x) is not torch.Tensor else x


def check_adaptable(module, kind: type, cls_name: str, name: str) -> None:
    """Refuse a ``module`` that is not a plain ``kind`` (``nn.Conv3d`` / ``nn.Conv2d`` /
    ``nn.Linear``), naming the layer and the fix."""
    if not isinstance(module, kind):
        got = type(module).__name__
        fix = {"Conv3d": "adapt Conv3d layers with the *Conv3d classes",
               "Linear": "adapt Linear layers with the *Linear classes",
               "Conv2d": "adapt Conv2d layers with LoRAConv2d, LoHaConv2d or LoKrConv2d"}.get(
                   got, "tenvoo_fast adapts Conv3d, Conv2d and Linear layers")
        raise AdapterError(
            f"{name}: {cls_name}.{'from_linear' if kind is nn.Linear else 'from_conv'} needs an "
            f"nn.{kind.__name__}, got {got}; {fix}")
    if isinstance(module, AdapterLayer):
        raise AdapterError(f"{name}: this layer is already adapted ({type(module).__name__}); "
                           "adapt the original layer, or merge_and_unload first")


#: The state_dict key (beside ``weight``) that says a layer's saved weight is W - T(θ0): a
#: tensor, so it survives plain dict copies and safetensors files.
FOLDED_KEY = "weight_is_folded"


def _mark_folded(module, state_dict, prefix, local_metadata) -> None:
    """state_dict hook: a folded layer's state says its weight is W - T(θ0)."""
    if getattr(module, "frozen_folded", False):
        state_dict[prefix + FOLDED_KEY] = torch.ones((), dtype=torch.bool)


def _check_folded(module, state_dict, prefix, local_metadata, strict, missing, unexpected,
                  errors) -> None:
    """load_state_dict pre-hook: a weight saved folded loads only into a folded layer, and an
    unfolded one only into an unfolded layer; a folded layer takes no other frozen copy
    without the weight folded with it (else the model would be silently wrong)."""
    saved = state_dict.pop(prefix + FOLDED_KEY, None) is not None
    folded = getattr(module, "frozen_folded", False)
    where = prefix[:-1] or module.adapter_name
    if prefix + "weight" in state_dict and saved != folded:
        raise AdapterError(
            f"{where}: the state_dict's weight is {'W - T(θ0) (folded)' if saved else 'W'}, "
            f"but this layer {'is not' if saved else 'is'} folded; fold (tenvoo_fast."
            "fold_frozen) the model the state_dict came from and this one alike, or load the "
            "adapter file with load_adapter into an unfolded model")
    if folded and not saved and any(k.startswith(prefix + "frozen_cores.") for k in state_dict):
        raise AdapterError(
            f"{where}: this layer's T(θ0) is folded into its weight, so its frozen copy cannot "
            "be replaced on its own; load the adapter into an unfolded model, then fold")


class AdapterLayer:
    """Mixin for adapted ``nn.Conv3d`` / ``nn.Conv2d`` / ``nn.Linear`` layers; see the module
    docstring."""

    network: TensorNetwork
    adapter_name: str
    frozen_cores: Optional[BufferList]
    #: The execution strategies this layer's family implements (:mod:`tenvoo_fast.dispatch`).
    strategies: tuple[str, ...] = ("merged",)
    #: The adapter applied to activations, for families with a factorized Linear form.
    activation_equation: Optional[str] = None

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def _adapt(cls, layer, name: Optional[str], network_for, frozen_copy: bool = False):
        """A new adapter of class ``cls`` around ``layer`` (checked first), its network
        ``network_for(name)`` (``name`` defaults to the class name)."""
        name = name or cls.__name__
        cls.check_wrappable(layer, name)
        return cls._build(layer, network_for(name), name, frozen_copy)

    @classmethod
    def _baseline(cls, layer, rank: int, alpha, name: Optional[str], **options):
        """A baseline's adapter (LoRA, LoHa, LoKr), whose network is the class's
        ``network(out, in, taps, rank, alpha, **options)``."""
        return cls._adapt(layer, name, lambda n: cls.network_of(*cls.dims(layer), rank, alpha,
                                                                layer=n, **options))

    @classmethod
    def _build(cls, layer, network: TensorNetwork, name: str, frozen_copy: bool = False):
        """A new adapter of class ``cls`` around ``layer`` (which it adopts, not copies)."""
        self = cls.__new__(cls)
        self._adopt(layer)
        self._init_adapter(network, frozen_copy=frozen_copy, name=name)
        return self

    def _init_adapter(self, network: TensorNetwork, *, frozen_copy: bool, name: str) -> None:
        self.network = network
        self.adapter_name = name
        w = self.weight
        if not w.is_floating_point():
            raise AdapterError(f"{name}: base weight has dtype {w.dtype}; adapters need a "
                               "floating-point layer")
        # Cores are master weights: fp32, or fp64 for an fp64 layer (see _apply for .to()).
        dtype = master_dtype(w.dtype)
        tensors = [init_core(c, c.shape, w.device, dtype) for c in network.cores]
        self.cores = nn.ParameterList([nn.Parameter(t) for t in tensors])
        self.frozen_cores = BufferList([t.detach().clone() for t in tensors]) if frozen_copy else None
        self._frozen_delta = None
        self._frozen_delta_key = None
        #: T(θ0) is folded into ``weight`` (:meth:`fold_frozen`): the weight holds W - T(θ0).
        self.frozen_folded = False
        self._register_state_dict_hook(_mark_folded)
        self._register_load_state_dict_pre_hook(_check_folded, with_module=True)
        w.requires_grad_(False)

    def _apply(self, fn, recurse=True):
        """``.to()``, ``.half()``, ``.bfloat16()``, ``to_empty()``...: the base weight and bias
        follow ``fn``; the cores (and their gradients) and frozen copies move with it but stay
        master weights, fp32 (fp64 under ``.double()``), never bf16/fp16. The cores keep their
        Parameter objects (as torch does, unless its overwrite-on-conversion flag is set), so
        optimisers that hold them keep working."""
        if getattr(self, "frozen_folded", False):
            probe = fn(self.weight.detach().new_empty(0))
            if probe.is_floating_point() and probe.element_size() < 4:
                raise AdapterError(
                    f"{self.adapter_name}: the frozen copy is folded into this layer's fp32 "
                    f"weight, and casting it to {probe.dtype} would destroy the base weight "
                    "(W - T(θ0) is a small difference of large terms); keep the model fp32 "
                    "and train under autocast, or cast an unfolded model (modules converted "
                    "before this one are; model.float() converts them back)")
        if recurse:
            masters = [m for m in (self.cores, self.frozen_cores) if m is not None]
            for module in self.children():
                if any(module is m for m in masters):
                    module._apply(_keeping_master(fn))
                else:
                    module._apply(fn)
        return super()._apply(fn, recurse=False)

    def core_list(self) -> list:
        """The cores as a list, in order (what ``list(self.cores)`` gives, without the
        ParameterList's per-item lookups: this runs on every forward)."""
        return list(self.cores._parameters.values())

    # -- the math -----------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """T(θ): the trainable network in the layer weight's layout, fp32 (fp64 for fp64 cores)."""
        return reference.delta_weight(self.network, list(self.cores))

    def frozen_delta_weight(self, backend=None) -> Optional[torch.Tensor]:
        """T(θ0) in fp32 (fp64), or None when the layer keeps no frozen copy.

        Built by the same kernels as the backend's T(θ) (default: the reference), so that the
        two cancel exactly at initialisation. Cached: recomputed only when the frozen cores
        change (load, ``.to()``) or another backend asks, never per step.
        """
        if self.frozen_cores is None or self.frozen_folded:
            return None
        backend = backend or get_backend("reference")
        frozen = list(self.frozen_cores._buffers.values())
        dtype = reference.contraction_dtype((self.weight, *frozen))   # frozen: as the cores
        if torch.compiler.is_compiling():
            # Built in the graph (a cache keyed on data pointers cannot be traced); always right.
            return functional.delta_weight(self.network, [t.to(dtype) for t in frozen], backend)
        key = (backend.name, dtype) + tuple((t.data_ptr(), t._version, t.device) for t in frozen)
        if self._frozen_delta_key != key:
            # Outside inference mode even when called inside it: a cached inference tensor
            # could not be saved for backward (or updated) by later training forwards.
            with torch.inference_mode(False), torch.no_grad():
                self._frozen_delta = functional.delta_weight(
                    self.network, [t.to(dtype) for t in frozen], backend)
            self._frozen_delta_key = key
        return self._frozen_delta

    @torch.no_grad()
    def _fold_frozen(self) -> bool:
        """Fold T(θ0) into the base weight tensor, in place, W <- round(W - T(θ0)) (T(θ0) and
        the difference in fp64), and stop keeping T(θ0): one weight-size fp32 tensor less. Only
        for an fp32/fp64 base (a bf16/fp16 one would lose W: returns False and keeps the
        copy), and only once. Not exact: W - T(θ0) is a large number whose rounding (up to half
        an ulp of T(θ0)) the unfolded layer, which adds the exact zero ``T(θ0) - T(θ0)`` at
        initialisation, does not make. The frozen cores stay (adapter files need them). Use
        :func:`tenvoo_fast.fold_frozen` (the model's base fingerprint, shared weights)."""
        w = self.weight
        if self.frozen_cores is None or self.frozen_folded or w.dtype not in (torch.float32,
                                                                              torch.float64):
            return False
        frozen = [t.to(torch.float64) for t in self.frozen_cores]
        folded = w.to(torch.float64) - reference.delta_weight(self.network, frozen).to(w.device)
        w.copy_(folded.reshape(w.shape))
        self.frozen_folded = True
        self._frozen_delta = self._frozen_delta_key = None
        return True

    def cached_tensors(self) -> list[torch.Tensor]:
        """Tensors the layer keeps between steps beside its parameters and buffers (the cached
        T(θ0)): resident memory, not memory a step saves for backward."""
        return [] if self._frozen_delta is None else [self._frozen_delta]

    def effective_weight(self) -> torch.Tensor:
        """``W - T(θ0) + T(θ)`` in fp32 (fp64), differentiable w.r.t. the cores."""
        return reference.effective_weight(self.weight, self.network, list(self.cores),
                                          frozen_delta=self.frozen_delta_weight())

    # -- execution ----------------------------------------------------------------------------
    def compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype the conv/linear runs in: autocast's if active, else the base weight's."""
        if autocast_on(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return self.weight.dtype

    def check_input(self, x: torch.Tensor) -> torch.Tensor:
        x = plain_tensor(x)
        w = self.weight
        if x.device != w.device:
            raise AdapterError(f"{self.adapter_name}: input is on {x.device} but the layer is on "
                               f"{w.device}; move one of them (e.g. model.to({x.device}))")
        if x.dtype != w.dtype and not autocast_on(x.device.type):
            raise AdapterError(f"{self.adapter_name}: input dtype {x.dtype} does not match the "
                               f"layer's {w.dtype}; cast the input or the model, or run under "
                               "torch.autocast")
        return x

    # -- merging ------------------------------------------------------------------------------
    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The effective weight, formed in fp32 and cast last to the base weight's dtype."""
        return self.effective_weight().to(self.weight.dtype)

    def merged_module(self) -> nn.Module:
        """A plain ``nn.Conv3d`` / ``nn.Conv2d`` / ``nn.Linear`` whose weight is the effective
        weight (formed in fp32) and whose bias is a copy of this layer's."""
        module = self.plain_module()
        module.weight = nn.Parameter(self.merged_weight())
        if self.bias is not None:
            module.bias = nn.Parameter(self.bias.detach().clone())
        return module
