"""Launchers for :mod:`.implicit_conv`'s kernels: the forward conv, its input gradient and its
weight gradient reduced into the last contraction step's operand gradients.

The generation operands are the last step's (B, M, K) and (B, K, N) matrices
(:func:`tenvoo_fast.contraction.last_step.operands`);
:class:`tenvoo_fast.contraction.generation.Generation` says which of them holds the input
channels (P) and gives the per-channel and per-tap offset vectors. ``geo`` is the conv's
geometry (``stride``, ``padding``, ``dilation``: :class:`tenvoo_fast.ops.ConvGeometry`).
"""
from __future__ import annotations

import torch
from triton import cdiv

from . import implicit_conv as k
from .launching import launch, sm_count


def _geometry(x_shape, y_shape, taps, geo):
    nb, cin, *dhw = x_shape
    cout, odhw = y_shape[1], y_shape[2:]
    consts = dict(zip(("KD", "KH", "KW"), taps))
    consts.update(zip(("SD", "SH", "SW"), geo.stride))
    consts.update(zip(("PD", "PH", "PW"), geo.padding))
    consts.update(zip(("DD", "DH", "DW"), geo.dilation))
    return [nb, cin, cout, *dhw, *odhw], consts


def _launch(kernel, grid, *args, **consts):
    launch(kernel, grid, *args, num_warps=k.NUM_WARPS, **consts)


def _generation_args(P, Q, P0, Q0):
    return [P, Q, P0 if P0 is not None else P, Q0 if Q0 is not None else Q]


def _upcast(t) -> bool:
    """Whether the kernels must multiply 16-bit operands as fp32 (the interpreter's bf16 dot
    is wrong; on a GPU the tensor cores take them as they are)."""
    return t.device.type != "cuda" and t.dtype == torch.bfloat16


def forward(x, gen, P, Q, P0, Q0, base, bias, scale: float, geo, out_spatial, out_format):
    """conv3d(x, base + scale*(T(θ) - T(θ0))) + bias in x's dtype, W generated per tile."""
    nb, cin = x.shape[:2]
    cout = base.shape[0]
    y = torch.empty((nb, cout, *out_spatial), dtype=x.dtype, device=x.device,
                    memory_format=out_format)
    dims, consts = _geometry(x.shape, y.shape, base.shape[2:], geo)
    offs = gen.offsets(x.device)
    grid = (cdiv(nb * y.shape[2:].numel(), k.BLOCK_M), cdiv(cout, k.BLOCK_N))
    _launch(k.conv_fwd_kernel, grid, x, *_generation_args(P, Q, P0, Q0),
            base.contiguous(), bias if bias is not None else y, y, *offs, gen.p_k, gen.q_k,
            gen.bond, float(scale), *dims, *x.stride(), *y.stride(),
            HAS_FROZEN=P0 is not None, HAS_BIAS=bias is not None, UPCAST=_upcast(x),
            BLOCK_M=k.BLOCK_M,
            BLOCK_N=k.BLOCK_N, BLOCK_C=k.BLOCK_C, BLOCK_K=k.BLOCK_K, **consts)
    return y


def input_grad(dy, x_shape, gen, P, Q, P0, Q0, base, scale: float, geo, x_format):
    """dL/dx of :func:`forward` (without its bias), in dy's dtype."""
    nb, cin = x_shape[:2]
    dx = torch.empty(x_shape, dtype=dy.dtype, device=dy.device, memory_format=x_format)
    dims, consts = _geometry(x_shape, dy.shape, base.shape[2:], geo)
    grid = (cdiv(nb * dx.shape[2:].numel(), k.BLOCK_M), cdiv(cin, k.BLOCK_N))
    _launch(k.conv_dgrad_kernel, grid, dy, *_generation_args(P, Q, P0, Q0),
            base.contiguous(), dx, *gen.offsets(dy.device), gen.p_k, gen.q_k, gen.bond,
            float(scale), *dims, *dy.stride(), *dx.stride(), HAS_FROZEN=P0 is not None,
            UPCAST=_upcast(dy), BLOCK_M=k.BLOCK_M, BLOCK_N=k.BLOCK_N, BLOCK_C=k.BLOCK_C, BLOCK_K=k.BLOCK_K,
            **consts)
    return dx


def operand_grads(x, dy, gen, P, Q, scale: float, geo, taps):
    """(dL/dP, dL/dQ) in fp32, from the weight gradient's tiles (never dL/dW itself)."""
    nb, cin = x.shape[:2]
    cout = dy.shape[1]
    dims, consts = _geometry(x.shape, dy.shape, taps, geo)
    dP, dQ = torch.zeros_like(P), torch.zeros_like(Q)
    taps = consts["KD"] * consts["KH"] * consts["KW"]
    tiles = taps * cdiv(cin, k.BLOCK_C) * cdiv(cout, k.BLOCK_N)
    voxels = nb * dy.shape[2:].numel()
    if voxels == 0:
        return dP, dQ
    chunks = cdiv(voxels, k.BLOCK_V)
    # Split the voxel sum until the GPU has a few waves of programs (atomics add the splits).
    splits = (1 if x.device.type != "cuda"
              else max(1, min(chunks, cdiv(4 * sm_count(x.device), tiles))))
    per_split = cdiv(chunks, splits) * k.BLOCK_V
    grid = (taps * cdiv(cin, k.BLOCK_C), cdiv(cout, k.BLOCK_N), cdiv(voxels, per_split))
    _launch(k.conv_wgrad_kernel, grid, x, dy, P, Q, dP, dQ, *gen.offsets(x.device), gen.p_k,
            gen.q_k, gen.bond, float(scale), per_split, *dims, *x.stride(), *dy.stride(),
            UPCAST=_upcast(x), BLOCK_CI=k.BLOCK_C, BLOCK_CO=k.BLOCK_N, BLOCK_V=k.BLOCK_V,
            BLOCK_K=k.BLOCK_K, **consts)
    return dP, dQ
