"""The ``torch.library`` surface: every adapter op, defined once with a validating fake kernel
and the one recompute autograd (:mod:`.autograd`), one module per strategy.

- :mod:`.merged`: ``build_delta``, ``weight_grad_to_cores``, ``merged_conv3d``, ``merged_linear``;
- :mod:`.factorized`: ``factorized_conv3d``, ``factorized_linear``;
- :mod:`.implicit_gemm`: ``implicit_conv3d``;
- :mod:`.geometry`: the one Conv3d geometry type and the ops' output shapes and layouts.

Importing this package registers the ops under ``torch.ops.tenvoo_fast``; ``impl`` arguments
name who runs their heavy steps (:mod:`tenvoo_fast.kernels`).
"""
from . import factorized, implicit_gemm, merged  # noqa: F401  (registers the ops)
from .geometry import ConvGeometry

__all__ = ["ConvGeometry", "merged", "factorized", "implicit_gemm"]
