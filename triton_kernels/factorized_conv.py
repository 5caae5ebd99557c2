"""The activation-sized passes of the fused factorized Conv3d (strategy ``"factorized"`` on the
``triton`` backend; the math is in :mod:`tenvoo_fast.ops.factorized`).

``A(x) = V·conv(U·x, K)`` touches activation-sized tensors (Cin or Cout channels per voxel) only
in its 1x1x1 maps; everything between them is rank-sized. These kernels do exactly those passes,
each reading the big tensor once in its own dtype and layout, and never writing an fp32 copy of
it or an output-sized ΔW·x:

- :func:`project_kernel`: ``Z = s·(A·Mᵀ)`` per voxel, a big tensor A down to rank channels
  (``U·x`` in forward, ``Vᵀ·dy`` in backward), for two matrices in one pass over A (θ's map
  and the difference ΔU or ΔV of the telescoped form).
- :func:`expand_kernel`: ``Y += s·(Z·Mᵀ - Z0·M0ᵀ)`` in place, rank channels up into a big
  tensor (into the base conv's output in forward, its input gradient in backward; the caller
  passes the telescoped terms, e.g. M = ΔV and M0 = -V0): the base output is read and written
  once and the adapter term never exists on its own.
- :func:`outer_kernel`: ``s·Σ_voxels Aᵀ·Z``, a big tensor against a rank-sized one (the U and V
  blocks' gradients), one fp32 partial per voxel split, summed by the launcher (deterministic).

Numerics (adapters.md §3): big tensors are converted to fp32 on load and every dot is fp32 with
IEEE precision (no TF32); the two terms are contracted by the same instructions into separate
accumulators and subtracted before the scale is applied, so with the differences exactly zero
at initialisation the layer returns its base conv's output exactly (floating-point contraction
is off). Tensors may have any
strides (NCDHW or channels-last); voxels are flattened over (batch, D, H, W).
"""
import triton
import triton.language as tl

from .voxels import unflatten_voxel, voxel_offset

#: Tiles: voxels (M), big-tensor channels reduced over (C) or written (N), the voxel chunk of
#: the outer product's reduction (V) and the rank chunk of the expansion's loop (R). The
#: projection's and outer product's rank tile is the rank rounded up to a power of two between
#: 16 (the dot's minimum) and :data:`MAX_BLOCK_R`, so that up to that rank they read their big
#: tensor once (:func:`rank_tiles`). Sized so that no kernel spills registers at 8 warps on
#: sm_90 (cuobjdump's resource usage; ``check-kernels`` prints it). One configuration per rank
#: tile (the interpreter cannot autotune; check-kernels compiles each for sm_80/sm_90).
BLOCK_M, BLOCK_C, BLOCK_N, BLOCK_V, BLOCK_R = 64, 16, 64, 64, 32
MAX_BLOCK_R = 128
NUM_WARPS = 8


def rank_tiles(rank: int) -> dict:
    """Tiles of the projection and outer product for ``rank`` channels: the rank tile, and
    voxel tiles halved at the largest rank tile (two fp32 accumulators of 64x128 spill)."""
    block_r = min(MAX_BLOCK_R, max(16, triton.next_power_of_2(rank)))
    voxels = BLOCK_M if block_r <= 64 else BLOCK_M // 2
    return dict(BLOCK_R=block_r, BLOCK_M=voxels, BLOCK_V=voxels)


@triton.jit
def _rows(A, rm, mask_m, rc, mask_c, S1, S2, S3, san, sac, sa1, sa2, sa3):
    """The (BLOCK_M, BLOCK_C) tile of big tensor A at flat voxels ``rm``, channels ``rc``, fp32."""
    n, i1, i2, i3 = unflatten_voxel(rm, S1, S2, S3)
    off = voxel_offset(n, i1, i2, i3, san, sa1, sa2, sa3)
    return tl.load(A + off[:, None] + rc[None, :].to(tl.int64) * sac,
                   mask=mask_m[:, None] & mask_c[None, :], other=0.0).to(tl.float32)


@triton.jit
def project_kernel(
        A, Mat, Mat0, Z, Z0, scale, NV, C, R, S1, S2, S3,
        san, sac, sa1, sa2, sa3, szn, szc, sz1, sz2, sz3,
        HAS_FROZEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
        BLOCK_R: tl.constexpr):
    """Z[v, r] = scale·sum_c A[v, c]·Mat[r, c] (and Z0 with Mat0); Mat is (R, C) contiguous."""
    pid_m, pid_r = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rm < NV
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rr < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    acc0 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        rc = c0 + tl.arange(0, BLOCK_C)
        mask_c = rc < C
        a = _rows(A, rm, mask_m, rc, mask_c, S1, S2, S3, san, sac, sa1, sa2, sa3)
        m_off = rr[None, :].to(tl.int64) * C + rc[:, None]
        m_mask = mask_c[:, None] & mask_r[None, :]
        acc = tl.dot(a, tl.load(Mat + m_off, mask=m_mask, other=0.0), acc,
                     input_precision="ieee")
        if HAS_FROZEN:
            acc0 = tl.dot(a, tl.load(Mat0 + m_off, mask=m_mask, other=0.0), acc0,
                          input_precision="ieee")
    n, i1, i2, i3 = unflatten_voxel(rm, S1, S2, S3)
    z_off = voxel_offset(n, i1, i2, i3, szn, sz1, sz2, sz3)[:, None] + rr[None, :].to(tl.int64) * szc
    mask = mask_m[:, None] & mask_r[None, :]
    tl.store(Z + z_off, acc * scale, mask=mask)
    if HAS_FROZEN:
        tl.store(Z0 + z_off, acc0 * scale, mask=mask)


@triton.jit
def _expand(Z, Mat, rm, mask_m, rn, mask_n, N, R, S1, S2, S3, szn, szc, sz1, sz2, sz3,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """sum_r Z[v, r]·Mat[n, r] as a (BLOCK_M, BLOCK_N) fp32 tile; Mat is (N, R) contiguous."""
    n, i1, i2, i3 = unflatten_voxel(rm, S1, S2, S3)
    z_row = voxel_offset(n, i1, i2, i3, szn, sz1, sz2, sz3)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        mask_r = rr < R
        z = tl.load(Z + z_row[:, None] + rr[None, :].to(tl.int64) * szc,
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        m = tl.load(Mat + rn[None, :].to(tl.int64) * R + rr[:, None],
                    mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(z, m, acc, input_precision="ieee")
    return acc


@triton.jit
def expand_kernel(
        Z, Z0, Mat, Mat0, Y, scale, NV, N, R, S1, S2, S3,
        szn, szc, sz1, sz2, sz3, s0n, s0c, s01, s02, s03, syn, syc, sy1, sy2, sy3,
        HAS_FROZEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_R: tl.constexpr):
    """Y[v, n] = Y[v, n] + scale·(sum_r Z[v, r]·Mat[n, r] - sum_r Z0[v, r]·Mat0[n, r]), in
    fp32 and stored in Y's dtype, in place (the same formula as the pure-torch path)."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rm < NV
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = rn < N
    delta = _expand(Z, Mat, rm, mask_m, rn, mask_n, N, R, S1, S2, S3, szn, szc, sz1, sz2, sz3,
                    BLOCK_M, BLOCK_N, BLOCK_R)
    if HAS_FROZEN:
        delta = delta - _expand(Z0, Mat0, rm, mask_m, rn, mask_n, N, R, S1, S2, S3, s0n, s0c,
                                s01, s02, s03, BLOCK_M, BLOCK_N, BLOCK_R)
    n, i1, i2, i3 = unflatten_voxel(rm, S1, S2, S3)
    y_off = voxel_offset(n, i1, i2, i3, syn, sy1, sy2, sy3)[:, None] + rn[None, :].to(tl.int64) * syc
    mask = mask_m[:, None] & mask_n[None, :]
    y = tl.load(Y + y_off, mask=mask, other=0.0)
    tl.store(Y + y_off, (y.to(tl.float32) + scale * delta).to(y.dtype), mask=mask)


@triton.jit
def outer_kernel(
        A, Z, out, scale, per_split, NV, C, R, S1, S2, S3,
        san, sac, sa1, sa2, sa3, szn, szc, sz1, sz2, sz3,
        BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    """out[split, c, r] = scale·sum_{v in split} A[v, c]·Z[v, r] (out is (splits, C, R))."""
    pid_c, pid_r, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = rc < C
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rr < R
    acc = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
    start = pid_s * per_split
    for v0 in range(start, tl.minimum(start + per_split, NV), BLOCK_V):
        rv = v0 + tl.arange(0, BLOCK_V)
        mask_v = rv < NV
        a = _rows(A, rv, mask_v, rc, mask_c, S1, S2, S3, san, sac, sa1, sa2, sa3)
        n, i1, i2, i3 = unflatten_voxel(rv, S1, S2, S3)
        z_row = voxel_offset(n, i1, i2, i3, szn, sz1, sz2, sz3)
        z = tl.load(Z + z_row[:, None] + rr[None, :].to(tl.int64) * szc,
                    mask=mask_v[:, None] & mask_r[None, :], other=0.0)
        acc = tl.dot(tl.trans(a), z, acc, input_precision="ieee")
    off = (pid_s.to(tl.int64) * C + rc[:, None]) * R + rr[None, :]
    tl.store(out + off, acc * scale, mask=mask_c[:, None] & mask_r[None, :])
