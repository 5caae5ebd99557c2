"""The weight-sized step of an adapter's contraction, fused (the merged strategy, Triton).

Every pairwise contraction of a tensor network is small except the last, whose output is the
weight, and the first step of the reverse sweep, whose input is dL/dW. Both are batched GEMMs
``T[b, m, n] = sum_k L[b, m, k] R[b, k, n]`` whose (b, m, n) land in the weight at
``off_b[b] + off_m[m] + off_n[n]`` (the weight's letters come from both operands, interleaved).

- :func:`build_kernel` writes ``scale*T`` (fp32), or ``W + (scale*T - T0)`` cast to the conv's
  compute dtype, straight into the weight's layout: one pass, no fp32 weight-sized temporary.
- :func:`grads_kernel` reads dL/dW (in whatever dtype the framework produced it) and contracts
  it into dL/dL and dL/dR in fp32, both in one launch (its first programs make dL/dL's tiles,
  the others dL/dR's).

Operands and operand gradients are strided ``(B, M, K)`` / ``(B, K, N)`` views (a stride 0
broadcasts a batch), so they are read and written where a contraction program keeps them.

Numerics (adapters.md §3): fp32 operands and accumulation, ``tl.dot`` in IEEE fp32 (no TF32),
the bond dimension K padded by masking to at least 16 (the hardware's minimum for a dot),
floating-point contraction (FMA fusion) off, so that ``scale*T - T0`` is exactly zero at
initialisation, as in the pure-torch kernels.
"""
import triton
import triton.language as tl

#: Tile sizes: M/N tiles of the weight and the K chunk. One configuration per kernel (the
#: interpreter cannot autotune, and the ahead-of-time check compiles exactly these).
BLOCK_M, BLOCK_N, BLOCK_K = 32, 64, 16
NUM_WARPS = 4


@triton.jit
def build_kernel(left, right, off_b, off_m, off_n, base, frozen, out, M, N, K, scale,
                 l_b, l_m, l_k, r_b, r_k, r_n,
                 EFFECTIVE: tl.constexpr, HAS_FROZEN: tl.constexpr, HAS_SCALE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[off] = scale*T (EFFECTIVE=False) or base[off] + (scale*T - frozen[off])."""
    pid_m, pid_n, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_m, mask_n = rm < M, rn < N
    lp = left + b.to(tl.int64) * l_b + rm[:, None].to(tl.int64) * l_m
    rp = right + b.to(tl.int64) * r_b + rn[None, :].to(tl.int64) * r_n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(lp + kk[None, :] * l_k, mask=mask_m[:, None] & (kk[None, :] < K), other=0.0)
        w = tl.load(rp + kk[:, None].to(tl.int64) * r_k, mask=(kk[:, None] < K) & mask_n[None, :],
                    other=0.0)
        acc = tl.dot(a, w, acc, input_precision="ieee")
    if HAS_SCALE:
        acc = acc * scale
    om = tl.load(off_m + rm, mask=mask_m, other=0)
    on = tl.load(off_n + rn, mask=mask_n, other=0)
    offs = tl.load(off_b + b) + om[:, None] + on[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if EFFECTIVE:
        if HAS_FROZEN:
            acc = acc - tl.load(frozen + offs, mask=mask, other=0.0)
        acc = acc + tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out + offs, acc.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _grad_left_tile(grad, right, off_b, off_m, off_n, grad_left, M, N, K, scale, pid_m, pid_k, b,
                    r_b, r_k, r_n, g_b, g_m, g_k, HAS_SCALE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """grad_left[b, m, k] = scale * sum_n G[off(b, m, n)] * R[b, k, n] on one tile."""
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_m, mask_k = rm < M, rk < K
    om = tl.load(off_m + rm, mask=mask_m, other=0)
    gb = grad + tl.load(off_b + b)
    rp = right + b.to(tl.int64) * r_b + rk[None, :].to(tl.int64) * r_k
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        mask_n = rn < N
        on = tl.load(off_n + rn, mask=mask_n, other=0)
        g = tl.load(gb + om[:, None] + on[None, :], mask=mask_m[:, None] & mask_n[None, :],
                    other=0.0).to(tl.float32)
        r = tl.load(rp + rn[:, None].to(tl.int64) * r_n, mask=mask_n[:, None] & mask_k[None, :],
                    other=0.0)
        acc = tl.dot(g, r, acc, input_precision="ieee")
    if HAS_SCALE:
        acc = acc * scale
    dst = (grad_left + b.to(tl.int64) * g_b + rm[:, None].to(tl.int64) * g_m
           + rk[None, :].to(tl.int64) * g_k)
    tl.store(dst, acc, mask=mask_m[:, None] & mask_k[None, :])


@triton.jit
def _grad_right_tile(grad, left, off_b, off_m, off_n, grad_right, M, N, K, scale, pid_k, pid_n,
                     b, l_b, l_m, l_k, g_b, g_k, g_n, HAS_SCALE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """grad_right[b, k, n] = scale * sum_m L[b, m, k] * G[off(b, m, n)] on one tile."""
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_k, mask_n = rk < K, rn < N
    on = tl.load(off_n + rn, mask=mask_n, other=0)
    gb = grad + tl.load(off_b + b)
    lp = left + b.to(tl.int64) * l_b + rk[None, :].to(tl.int64) * l_k
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        mask_m = rm < M
        om = tl.load(off_m + rm, mask=mask_m, other=0)
        g = tl.load(gb + om[:, None] + on[None, :], mask=mask_m[:, None] & mask_n[None, :],
                    other=0.0).to(tl.float32)
        a = tl.load(lp + rm[:, None].to(tl.int64) * l_m, mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0)
        acc = tl.dot(tl.trans(a), g, acc, input_precision="ieee")
    if HAS_SCALE:
        acc = acc * scale
    dst = (grad_right + b.to(tl.int64) * g_b + rk[:, None].to(tl.int64) * g_k
           + rn[None, :].to(tl.int64) * g_n)
    tl.store(dst, acc, mask=mask_k[:, None] & mask_n[None, :])


@triton.jit
def grads_kernel(grad, left, right, off_b, off_m, off_n, grad_left, grad_right, M, N, K, scale,
                 l_b, l_m, l_k, r_b, r_k, r_n, gl_b, gl_m, gl_k, gr_b, gr_k, gr_n,
                 HAS_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """Both operands' gradients; grid (cdiv(M,BM)*cdiv(K,BK) + cdiv(K,BK)*cdiv(N,BN), 1, B):
    the first programs make dL/dL's tiles, the rest dL/dR's."""
    pid, b = tl.program_id(0), tl.program_id(2)
    tiles_k = tl.cdiv(K, BLOCK_K)
    n_left = tl.cdiv(M, BLOCK_M) * tiles_k
    if pid < n_left:
        _grad_left_tile(grad, right, off_b, off_m, off_n, grad_left, M, N, K, scale,
                        pid // tiles_k, pid % tiles_k, b, r_b, r_k, r_n, gl_b, gl_m, gl_k,
                        HAS_SCALE, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        q = pid - n_left
        tiles_n = tl.cdiv(N, BLOCK_N)
        _grad_right_tile(grad, left, off_b, off_m, off_n, grad_right, M, N, K, scale,
                         q // tiles_n, q % tiles_n, b, l_b, l_m, l_k, gr_b, gr_k, gr_n,
                         HAS_SCALE, BLOCK_M, BLOCK_N, BLOCK_K)
