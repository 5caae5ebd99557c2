"""Launchers for :mod:`.factorized_conv`'s kernels: the activation-sized 1x1x1 maps of the fused
factorized Conv3d. Big tensors are (batch, channels, D, H, W) with any strides; rank-sized
outputs are fp32 in the big tensor's memory format; the maps are small contiguous fp32 matrices.
"""
from __future__ import annotations

import torch
from triton import cdiv

from . import factorized_conv as k
from .launching import launch, sm_count


def _launch(kernel, grid, *args, **consts):
    launch(kernel, grid, *args, num_warps=k.NUM_WARPS, **consts)


def operand(t, dtype):
    """A big tensor as the kernels take it: as it is (they convert tiles on load)."""
    return t


def _check(big, *mats):
    """The kernels index voxels with int32 and multiply fp32 maps: say so instead of
    computing garbage."""
    if big.shape[0] * big.shape[2:].numel() >= 2**31:
        raise ValueError(f"{tuple(big.shape)}: 2^31 voxels or more (batch x D x H x W); split the "
                         "batch")
    if any(m is not None and m.dtype != torch.float32 for m in mats):
        raise TypeError("the fused factorized kernels take fp32 maps")


def _dims(t):
    """[voxels over batch and space, D, H, W] and the five strides of a 5-D tensor."""
    return [t.shape[0] * t.shape[2:].numel(), *t.shape[2:]], list(t.stride())


def project(a, mat, mat0=None, scale: float = 1.0, memory_format=torch.contiguous_format):
    """``(Z, Z0)``: ``Z[n, r, ...] = scale·sum_c a[n, c, ...]·mat[r, c]`` in fp32 (and Z0 with
    ``mat0``, else None); one read of ``a``."""
    rank, chans = mat.shape
    _check(a, mat, mat0)
    shape = (a.shape[0], rank, *a.shape[2:])
    z = torch.empty(shape, dtype=torch.float32, device=a.device, memory_format=memory_format)
    z0 = torch.empty_like(z) if mat0 is not None else None
    (nv, *spatial), sa = _dims(a)
    if nv == 0:
        return z, z0
    tiles = k.rank_tiles(rank)
    grid = (cdiv(nv, tiles["BLOCK_M"]), cdiv(rank, tiles["BLOCK_R"]))
    _launch(k.project_kernel, grid, a, mat.contiguous(),
            (mat0 if mat0 is not None else mat).contiguous(), z, z0 if z0 is not None else z,
            float(scale), nv, chans, rank, *spatial, *sa, *z.stride(),
            HAS_FROZEN=mat0 is not None, BLOCK_M=tiles["BLOCK_M"], BLOCK_C=k.BLOCK_C,
            BLOCK_R=tiles["BLOCK_R"])
    return z, z0


def add_expanded(y, z, mat, z0=None, mat0=None, scale: float = 1.0):
    """``y + scale·(z·matᵀ - z0·mat0ᵀ)`` per voxel, in fp32, rounded once to y's dtype and
    written into y's storage (``mat``: (channels of y, rank)); returns y."""
    chans, rank = mat.shape
    _check(y, mat, mat0)
    (nv, *spatial), sy = _dims(y)
    if nv == 0:
        return y
    frozen = mat0 is not None
    grid = (cdiv(nv, k.BLOCK_M), cdiv(chans, k.BLOCK_N))
    _launch(k.expand_kernel, grid, z, z0 if frozen else z, mat.contiguous(),
            (mat0 if frozen else mat).contiguous(), y, float(scale), nv, chans, rank, *spatial,
            *z.stride(), *(z0 if frozen else z).stride(), *sy, HAS_FROZEN=frozen, BLOCK_M=k.BLOCK_M, BLOCK_N=k.BLOCK_N,
            BLOCK_R=k.BLOCK_R)
    return y


def outer(a, z, scale: float = 1.0, splits: int | None = None):
    """``scale·sum_voxels a[n, c, ...]·z[n, r, ...]`` as a (channels, rank) fp32 matrix; the
    voxel sum is split (``splits``, default: enough programs to fill a GPU, one on the CPU) and
    the splits' partials are added in a fixed order (deterministic)."""
    chans, rank = a.shape[1], z.shape[1]
    _check(a, z)
    (nv, *spatial), sa = _dims(a)
    if nv == 0:
        return torch.zeros(chans, rank, dtype=torch.float32, device=a.device)
    tiles = k.rank_tiles(rank)
    block_r, block_v = tiles["BLOCK_R"], tiles["BLOCK_V"]
    programs = cdiv(chans, k.BLOCK_C) * cdiv(rank, block_r)
    chunks = cdiv(nv, block_v)
    if splits is None and a.device.type == "cuda":
        splits = max(1, min(chunks, cdiv(4 * sm_count(a.device), programs)))
    per_split = cdiv(chunks, max(1, min(splits or 1, chunks))) * block_v
    splits = cdiv(nv, per_split)
    out = torch.empty(splits, chans, rank, dtype=torch.float32, device=a.device)
    grid = (cdiv(chans, k.BLOCK_C), cdiv(rank, block_r), splits)
    _launch(k.outer_kernel, grid, a, z, out, float(scale), per_split, nv, chans, rank, *spatial,
            *sa, *z.stride(), BLOCK_C=k.BLOCK_C, BLOCK_R=block_r, BLOCK_V=block_v)
    return out.sum(0)
