"""The activation-sized 1x1x1 maps of the factorized Conv3d in torch (``impl="torch"``).

:mod:`tenvoo_fast.ops.factorized` runs ``A(x) = V·conv(U·x, K)`` through these primitives, the
only steps that touch tensors with Cin or Cout channels per voxel: these torch versions (any
device, fp32 or fp64), or the fused Triton kernels of
:mod:`tenvoo_fast.triton_kernels.launch_factorized` (same signatures, same formulas), which read
each big tensor once in its own dtype instead of converting it and never write the adapter term
on its own (:func:`tenvoo_fast.kernels.activation_maps` picks).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def operand(t: Tensor, dtype: torch.dtype) -> Tensor:
    """A big tensor as these maps take it: converted once to the contraction dtype (a caller
    that uses it twice converts it once; the Triton launchers take it as it is)."""
    return t.to(dtype)


def _pointwise(t: Tensor, mat: Tensor) -> Tensor:
    """sum_c t[n, c, ...]·mat[r, c], as a 1x1x1 convolution."""
    return F.conv3d(t, mat.reshape(*mat.shape, 1, 1, 1))


def project(a: Tensor, mat: Tensor, mat0: Tensor | None = None, scale: float = 1.0,
            memory_format=torch.contiguous_format):
    """``(Z, Z0)``: ``Z = scale·(mat·a)`` over a's channels in mat's dtype (Z0 with ``mat0``,
    else None)."""
    a = a.to(mat.dtype)
    z = _pointwise(a, mat)
    z0 = _pointwise(a, mat0) if mat0 is not None else None
    if scale != 1.0:
        z, z0 = z * scale, (z0 * scale if z0 is not None else None)
    return (z.contiguous(memory_format=memory_format),
            z0.contiguous(memory_format=memory_format) if z0 is not None else None)


def add_expanded(y: Tensor, z: Tensor, mat: Tensor, z0: Tensor | None = None,
            mat0: Tensor | None = None, scale: float = 1.0) -> Tensor:
    """``y + scale·(mat·z - mat0·z0)`` computed in z's dtype and rounded once to y's dtype
    (a new tensor here; the Triton kernel writes it into y's storage)."""
    delta = _pointwise(z, mat)
    if mat0 is not None:
        delta = delta - _pointwise(z0, mat0)
    return (y.to(delta.dtype) + scale * delta).to(y.dtype)


def outer(a: Tensor, z: Tensor, scale: float = 1.0) -> Tensor:
    """``scale·sum_voxels a[n, c, ...]·z[n, r, ...]`` as a (channels, rank) matrix."""
    out = torch.einsum("nc...,nr...->cr", a.to(z.dtype), z)
    return out * scale if scale != 1.0 else out
