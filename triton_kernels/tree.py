"""An adapter's whole small contraction tree in one launch: a kernel that runs a program.

A compiled contraction (:mod:`tenvoo_fast.contraction.program`) is a list of strided batched
matmuls and relayouts, most on tensors of a few KB. Launched one by one they cost one host call
each (the cost that dominated a GPU step: README, "Launches"); here one program instance (one
CTA) runs a whole run of small instructions from a table in device memory, with a barrier
between instructions so that each reads what the previous ones wrote. A large instruction
(TenVOO-Q's wide last-step operand) gets a launch of its own over many instances.

Every operand is ``(region, element offset, strides)``; a region is one of the kernel's tensor
arguments (the saved buffer, the backward's scratch, up to :data:`MAX_CORES` cores and as many
core gradients), chosen at run time by its index. Instructions (rows of :data:`ROW` int64):

- ``MATMUL``: ``out[b, m, n] = sum_k a[b, m, k] * b[b, k, n]`` (any strides, 0 for a broadcast
  batch), ``tl.dot`` in IEEE fp32 on padded tiles;
- ``COPY``: ``dst[i] = sum_r src[i, r]`` over up to :data:`MAX_DIMS` dims and up to two summed
  dims: a relayout (no sum), a pre-reduction of a core's redundant axes, or a gradient
  broadcast back over them (stride 0).

Numerics as the other kernels (adapters.md §3): fp32, no TF32, FMA contraction off.
"""
import triton
import triton.language as tl

MAX_CORES = 10
MAX_DIMS = 10
ROW = 48
MATMUL, COPY = 0, 1
#: Field positions in a row.
A, B_, OUT = 5, 10, 15                      # MATMUL: (region, offset, s_batch, s_row, s_col)
SIZES, SRC_STRIDES, DST_STRIDES, SUMS = 8, 18, 28, 38   # COPY: see encode_copy
BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_COPY = 32, 16, 16, 128
NUM_WARPS = 4


@triton.jit
def _address(region, saved, scratch, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9,
             g0, g1, g2, g3, g4, g5, g6, g7, g8, g9):
    """The fp32 pointer of a region: 0 saved, 1 scratch, 2+i core i, 12+i core i's gradient."""
    a = saved.cast(tl.int64)
    a = tl.where(region == 1, scratch.cast(tl.int64), a)
    a = tl.where(region == 2, c0.cast(tl.int64), a)
    a = tl.where(region == 3, c1.cast(tl.int64), a)
    a = tl.where(region == 4, c2.cast(tl.int64), a)
    a = tl.where(region == 5, c3.cast(tl.int64), a)
    a = tl.where(region == 6, c4.cast(tl.int64), a)
    a = tl.where(region == 7, c5.cast(tl.int64), a)
    a = tl.where(region == 8, c6.cast(tl.int64), a)
    a = tl.where(region == 9, c7.cast(tl.int64), a)
    a = tl.where(region == 10, c8.cast(tl.int64), a)
    a = tl.where(region == 11, c9.cast(tl.int64), a)
    a = tl.where(region == 12, g0.cast(tl.int64), a)
    a = tl.where(region == 13, g1.cast(tl.int64), a)
    a = tl.where(region == 14, g2.cast(tl.int64), a)
    a = tl.where(region == 15, g3.cast(tl.int64), a)
    a = tl.where(region == 16, g4.cast(tl.int64), a)
    a = tl.where(region == 17, g5.cast(tl.int64), a)
    a = tl.where(region == 18, g6.cast(tl.int64), a)
    a = tl.where(region == 19, g7.cast(tl.int64), a)
    a = tl.where(region == 20, g8.cast(tl.int64), a)
    a = tl.where(region == 21, g9.cast(tl.int64), a)
    return a.to(tl.pointer_type(tl.float32))


@triton.jit
def _matmul(row, saved, scratch, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9,
            g0, g1, g2, g3, g4, g5, g6, g7, g8, g9,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    nb, M, N, K = tl.load(row + 1), tl.load(row + 2), tl.load(row + 3), tl.load(row + 4)
    pa = _address(tl.load(row + 5), saved, scratch, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9,
                  g0, g1, g2, g3, g4, g5, g6, g7, g8, g9) + tl.load(row + 6)
    sab, sam, sak = tl.load(row + 7), tl.load(row + 8), tl.load(row + 9)
    pb = _address(tl.load(row + 10), saved, scratch, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9,
                  g0, g1, g2, g3, g4, g5, g6, g7, g8, g9) + tl.load(row + 11)
    sbb, sbk, sbn = tl.load(row + 12), tl.load(row + 13), tl.load(row + 14)
    pc = _address(tl.load(row + 15), saved, scratch, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9,
                  g0, g1, g2, g3, g4, g5, g6, g7, g8, g9) + tl.load(row + 16)
    scb, scm, scn = tl.load(row + 17), tl.load(row + 18), tl.load(row + 19)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    for t in range(tl.program_id(0), nb * tiles_m * tiles_n, tl.num_programs(0)):
        b = t // (tiles_m * tiles_n)
        rm = ((t // tiles_n) % tiles_m) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = (t % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m, mask_n = rm < M, rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            mask_k = rk < K
            a = tl.load(pa + b * sab + rm[:, None] * sam + rk[None, :] * sak,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0, cache_modifier=".cg")
            w = tl.load(pb + b * sbb + rk[:, None] * sbk + rn[None, :] * sbn,
                        mask=mask_k[:, None] & mask_n[None, :], other=0.0, cache_modifier=".cg")
            acc = tl.dot(a, w, acc, input_precision="ieee")
        tl.store(pc + b * scb + rm[:, None] * scm + rn[None, :] * scn, acc,
                 mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _copy(row, saved, scratch, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9,
          g0, g1, g2, g3, g4, g5, g6, g7, g8, g9, BLOCK: tl.constexpr):
    ndim, total, summed = tl.load(row + 1), tl.load(row + 2), tl.load(row + 3)
    src = _address(tl.load(row + 4), saved, scratch, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9,
                   g0, g1, g2, g3, g4, g5, g6, g7, g8, g9) + tl.load(row + 5)
    dst = _address(tl.load(row + 6), saved, scratch, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9,
                   g0, g1, g2, g3, g4, g5, g6, g7, g8, g9) + tl.load(row + 7)
    sum0, sum_stride0, sum_stride1 = tl.load(row + 38), tl.load(row + 40), tl.load(row + 41)
    for start in range(tl.program_id(0) * BLOCK, total, tl.num_programs(0) * BLOCK):
        idx = start + tl.arange(0, BLOCK)
        mask = idx < total
        rest = idx
        src_off = tl.zeros((BLOCK,), dtype=tl.int64)
        dst_off = tl.zeros((BLOCK,), dtype=tl.int64)
        for d in range(ndim):
            j = ndim - 1 - d
            size = tl.load(row + 8 + j)
            coord = rest % size
            rest = rest // size
            src_off += coord * tl.load(row + 18 + j)
            dst_off += coord * tl.load(row + 28 + j)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for r in range(summed):
            off = (r % sum0) * sum_stride0 + (r // sum0) * sum_stride1
            acc += tl.load(src + src_off + off, mask=mask, other=0.0, cache_modifier=".cg")
        tl.store(dst + dst_off, acc, mask=mask)


@triton.jit
def tree_kernel(code, start, stop, saved, scratch, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9,
                g0, g1, g2, g3, g4, g5, g6, g7, g8, g9, ROW: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                BLOCK_COPY: tl.constexpr):
    """Run instructions ``start..stop`` of ``code`` in order. Several program instances share
    out the tiles of each instruction: launch more than one only for a single instruction (the
    barrier orders instructions within one instance, not across instances)."""
    for i in range(start, stop):
        row = code + i * ROW
        if tl.load(row) == 0:
            _matmul(row, saved, scratch, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9,
                    g0, g1, g2, g3, g4, g5, g6, g7, g8, g9, BLOCK_M, BLOCK_N, BLOCK_K)
        else:
            _copy(row, saved, scratch, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9,
                  g0, g1, g2, g3, g4, g5, g6, g7, g8, g9, BLOCK_COPY)
        tl.debug_barrier()
