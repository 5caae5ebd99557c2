"""Who runs the ops' heavy steps: the one small implementation registry.

An op takes ``impl`` (``"torch"``, ``"triton"`` or ``"native"``) and asks here for the module
that runs each heavy step; every module of one step has the same functions and formulas:

- the weight-sized contraction step (``build``, ``grads``): :mod:`.torch_last_step`, the Triton
  launchers (:mod:`tenvoo_fast.triton_kernels.launch_last_step`) or the csrc kernels
  (:mod:`.native`);
- the factorized conv's activation-sized maps (``operand``, ``project``, ``add_expanded``,
  ``outer``): :mod:`.torch_activation_maps` (also for ``native``, which has none of its own)
  or the fused Triton kernels (:mod:`tenvoo_fast.triton_kernels.launch_factorized`);
- the whole contraction in a few launches (``fused_for``, ``forward``, ``build``, ``core_grads``):
  Triton only (:mod:`tenvoo_fast.triton_kernels.launch_tree`);
- the implicit-GEMM conv (``forward``, ``input_grad``, ``operand_grads``): Triton only
  (:mod:`tenvoo_fast.triton_kernels.launch_conv`).

Triton and the native extension are imported on first use: neither is needed to import
tenvoo_fast.
"""
from __future__ import annotations

import importlib
from functools import lru_cache

IMPLS = ("torch", "triton", "native")

#: step -> impl -> the module (in tenvoo_fast) that runs it; ``native`` has no activation maps
#: of its own and uses torch's.
MODULES = {
    "last_step": {"torch": ".kernels.torch_last_step", "native": ".kernels.native",
                  "triton": ".triton_kernels.launch_last_step"},
    "activation_maps": {"torch": ".kernels.torch_activation_maps",
                        "native": ".kernels.torch_activation_maps",
                        "triton": ".triton_kernels.launch_factorized"},
    "implicit_conv": {"triton": ".triton_kernels.launch_conv"},
    "tree": {"triton": ".triton_kernels.launch_tree"},
}


@lru_cache(maxsize=None)
def implementation(step: str, impl: str):
    """The module that runs ``step`` for ``impl`` (imported on first use, then cached)."""
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}: one of {list(IMPLS)}")
    path = MODULES[step].get(impl)
    if path is None:
        raise ValueError(f"{step} has no {impl!r} kernels, only {list(MODULES[step])}")
    return importlib.import_module(path, package="tenvoo_fast")


def last_step(impl: str):
    """The weight-sized contraction step: ``build``, ``grads``."""
    return implementation("last_step", impl)


def activation_maps(impl: str):
    """The factorized conv's activation-sized 1x1x1 maps: ``operand``, ``project``,
    ``add_expanded``, ``outer``."""
    return implementation("activation_maps", impl)


def implicit_conv(impl: str):
    """The implicit-GEMM conv: ``forward``, ``input_grad``, ``operand_grads``."""
    return implementation("implicit_conv", impl)


def tree(impl: str):
    """The whole contraction in a few launches: ``fused_for``, ``forward``, ``build``,
    ``core_grads``."""
    return implementation("tree", impl)
