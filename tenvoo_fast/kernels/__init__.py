"""Who runs the ops' heavy steps: the one small implementation registry.

An op takes ``impl`` (``"torch"``, ``"triton"`` or ``"native"``) and asks here for the module
that runs each heavy step; every module of one step has the same functions and formulas:

- the weight-sized contraction step (``build``, ``grads``): :mod:`.torch_last_step`, the Triton
  launchers (:mod:`tenvoo_fast.triton_kernels.launch_last_step`) or the csrc kernels
  (:mod:`.native`);
- the factorized conv's activation-sized maps (``operand``, ``project``, ``add_expanded``,
  ``outer``): :mod:`.torch_activation_maps` (also for ``native``, which has none of its own)
  or the fused Triton kernels (:mod:`tenvoo_fast.triton_kernels.launch_factorized`);
- the implicit-GEMM conv (``forward``, ``input_grad``, ``operand_grads``): Triton only
  (:mod:`tenvoo_fast.triton_kernels.launch_conv`).

Triton and the native extension are imported on first use: neither is needed to import
tenvoo_fast.
"""
from __future__ import annotations

IMPLS = ("torch", "triton", "native")


def _check(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}: one of {list(IMPLS)}")


def last_step(impl: str):
    """The module that runs the weight-sized contraction step for ``impl``."""
    _check(impl)
    if impl == "triton":
        from ..triton_kernels import launch_last_step
        return launch_last_step
    if impl == "native":
        from . import native
        return native
    from . import torch_last_step
    return torch_last_step


def activation_maps(impl: str):
    """The module that runs the factorized conv's activation-sized 1x1x1 maps for ``impl``."""
    _check(impl)
    if impl == "triton":
        from ..triton_kernels import launch_factorized
        return launch_factorized
    from . import torch_activation_maps
    return torch_activation_maps


def implicit_conv(impl: str):
    """The module that runs the implicit-GEMM conv (Triton only)."""
    _check(impl)
    if impl != "triton":
        raise ValueError(f"the implicit-GEMM conv has Triton kernels only, not {impl!r}")
    from ..triton_kernels import launch_conv
    return launch_conv
