"""Voxel indexing shared by the conv kernels: a flat voxel index over (batch, D, H, W) and the
offset of a voxel in a 5-D tensor of any strides (NCDHW or channels-last)."""
import triton
import triton.language as tl


@triton.jit
def unflatten_voxel(v, S1, S2, S3):
    """Flat voxel index over (batch, S1, S2, S3) -> (n, i1, i2, i3)."""
    i3 = v % S3
    t = v // S3
    i2 = t % S2
    t = t // S2
    return t // S1, t % S1, i2, i3


@triton.jit
def voxel_offset(n, i, j, k, sn, si, sj, sk):
    """The int64 offset of voxel (n, i, j, k) of a (batch, channel, D, H, W) tensor."""
    return (n.to(tl.int64) * sn + i.to(tl.int64) * si + j.to(tl.int64) * sj
            + k.to(tl.int64) * sk)
