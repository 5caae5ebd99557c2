"""The ``factorized`` strategy's ops: the adapter applied to the activations beside the frozen
base layer, so that no weight-sized tensor and no dL/dW exist.

QuanTA on a Linear (:func:`factorized_linear`): the three gates applied to x viewed as
(..., n1, n2, n3), the published activation form.

TenVOO on a Conv3d (:func:`factorized_conv3d`): ``conv3d(x, ΔW) = V · conv3d(U · x, K)`` with
the network's input, tap and output blocks (:mod:`tenvoo_fast.contraction.partition`), so the
adapter runs on the activations beside the frozen base conv and no weight-sized tensor, and no
dL/dW pass, exists at all. The frozen copy's term is subtracted telescoped,
``A(x; θ) - A(x; θ0) = ΔV·conv(U·x, K) + V0·(conv(U·x, ΔK) + conv(ΔU·x, K0))`` with Δ the
maps' differences: the cancellation happens on the rank-sized maps, not on activation-sized
terms (near initialisation the fp32 error is below the merged path's; README, "Numerics"),
and at initialisation, where every Δ is zero, the layer returns its base conv's output
exactly. The adapter term is computed in fp32 (fp64 for fp64 layers); the base conv in the
input's dtype. Backward recomputes the rank-sized maps from the saved input instead of keeping
them, and turns the blocks' gradients into every core's through their own reverse sweeps.

Only the 1x1x1 maps touch activation-sized tensors (Cin or Cout channels per voxel); the rest
is rank-sized. ``impl`` picks who runs those maps (:func:`tenvoo_fast.kernels.activation_maps`):
torch (which converts x to fp32 and forms the adapter term as a tensor), or the fused Triton
kernels, which read x, dy and the base conv's output once each in their own dtype and layout,
project onto θ's map and its difference in one pass, add the telescoped term into the base
output in place, and reduce the U and V blocks' gradients without an fp32 copy of x or dy. The
rank-sized conv with K runs in torch (cuDNN), without TF32.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import kernels
from ..contraction import sweep
from ..contraction.partition import partition
from ..contraction.prereduce import reduced_cores, stored_grads
from ..contraction.reference import contraction_dtype, ieee_fp32
from .autograd import register_recompute_autograd
from .define import custom_op, exact_math
from .geometry import (ConvGeometry, check_linear_args, register_cores_conv_fake, input_grad_like,
                       memory_format)


def _block(equation, cores, idx):
    """(steps, nodes, result) of one block's contraction (kept for its reverse sweep)."""
    ops = [cores[i] for i in idx]
    if len(ops) == 1:    # a single core: its einsum is a permutation (or a sum)
        return None, None, torch.einsum(equation, ops[0])
    return sweep.contract(equation, ops)


def _block_grads(equation, cores, idx, state, grad):
    steps, nodes, _ = state
    if steps is None:
        term, out = equation.split("->")
        return [sweep.grad_operand(grad, out, grad.new_ones(()), "", term, cores[idx[0]].shape)]
    return sweep.operand_grads(steps, nodes, len(idx), grad)


def _maps(part, cores, cin, cout, taps):
    """U as an (R_U, Cin) matrix, K as an (R_V, R_U, kD, kH, kW) kernel, V as a (Cout, R_V)
    matrix, and the block states for the reverse sweep."""
    su = _block(part.u_equation, cores, part.u_cores)
    sk = _block(part.k_equation, cores, part.k_cores)
    sv = _block(part.v_equation, cores, part.v_cores)
    u = su[2].reshape(cin, part.rank_u).t()
    k = sk[2].reshape(part.rank_u, -1, part.rank_v).permute(2, 0, 1).reshape(
        part.rank_v, part.rank_u, *taps)
    v = sv[2].reshape(cout, part.rank_v)
    return (u, k, v), (su, sk, sv)


def _setup(cores, frozen, equation, letters, base):
    """(plan, partition, reduced cores, θ's maps and block states, θ0's maps or Nones; θ0's
    are not contracted when ``frozen`` is empty)."""
    p, _, reduced = reduced_cores(cores, equation)
    part = partition(p.equation, tuple(tuple(c.shape) for c in reduced), *letters.split(","))
    cout, cin, *taps = base.shape
    maps, states = _maps(part, reduced, cin, cout, taps)
    maps0 = (None, None, None)
    if frozen:
        maps0 = _maps(part, reduced_cores(frozen, equation)[2], cin, cout, taps)[0]
    return p, part, reduced, maps, states, maps0


def _differences(maps, maps0):
    """(ΔU, ΔK, ΔV) = θ's maps minus θ0's: exactly zero at initialisation."""
    return tuple(m - m0 for m, m0 in zip(maps, maps0))


@custom_op("tenvoo_fast::factorized_conv3d", mutates_args=())
def factorized_conv3d(x: Tensor, base: Tensor, cores: list[Tensor], frozen: list[Tensor],
                      bias: Optional[Tensor], equation: str, letters: str, scale: float,
                      conv: list[int], impl: str) -> Tensor:
    """``conv3d(x, W, bias) + scale * (A(x; θ) - A(x; θ0))`` with ``A = V·conv(U·x, K)`` (see the
    module docstring); ``letters`` = "out,in,tap" letters (e.g. ``"ABC,abc,xyz"``), ``conv`` =
    stride + padding + dilation (9 ints); ``frozen``: the frozen cores (empty: no frozen copy);
    ``impl`` runs the activation-sized maps."""
    with exact_math(x.device.type):
        *_, (u, k, v), _, (u0, k0, v0) = _setup(cores, frozen, equation, letters, base)
        run = kernels.activation_maps(impl)
        geo = ConvGeometry.unpack(conv)
        stride, padding, dilation = geo.stride, geo.padding, geo.dilation
        layout = memory_format(x)
        # The base conv under the caller's settings (as the frozen layer would run it).
        y = F.conv3d(x, base.to(x.dtype), None if bias is None else bias.to(x.dtype), stride,
                     padding, dilation)
        if not frozen:
            z1 = run.project(x, u, memory_format=layout)[0]
            with ieee_fp32():
                z2 = F.conv3d(z1, k, None, stride, padding, dilation)
            return run.add_expanded(y, z2, v, scale=scale).contiguous(memory_format=layout)
        # Telescoped: A(θ) - A(θ0) = ΔV·conv(U·x, K) + V0·(conv(U·x, ΔK) + conv(ΔU·x, K0)),
        # every term as small as the update, instead of two large terms that cancel.
        du, dk, dv = _differences((u, k, v), (u0, k0, v0))
        z1, dz1 = run.project(x, u, du, memory_format=layout)
        with ieee_fp32():
            z2 = F.conv3d(z1, k, None, stride, padding, dilation)
            d2 = F.conv3d(z1, dk, None, stride, padding, dilation)
            d2 += F.conv3d(dz1, k0, None, stride, padding, dilation)
        return run.add_expanded(y, z2, dv, d2, -v0, scale).contiguous(memory_format=layout)


register_cores_conv_fake(factorized_conv3d)


@custom_op("tenvoo_fast::factorized_conv3d_backward", mutates_args=())
def factorized_conv3d_backward(grad_out: Tensor, x: Tensor, base: Tensor, cores: list[Tensor],
                               frozen: list[Tensor], bias: Optional[Tensor], need_x: bool,
                               need_bias: bool, equation: str, letters: str, scale: float,
                               conv: list[int], impl: str) -> list[Tensor]:
    """[grad_x, grad_bias, *grad_cores] of :func:`factorized_conv3d`, recomputing z1 = U·x and
    z2 = conv(z1, K) from the saved input. The blocks' gradients (dV = g ⊗ z2, dK from the
    small conv's weight gradient, dU = x ⊗ dz1) give every core's by each block's reverse
    sweep; the input gradient is the base conv's plus Uᵀ·dz1 (minus θ0's), added in place."""
    with exact_math(x.device.type):
        frozen_x = bool(frozen) and need_x
        p, part, reduced, (u, k, v), states, (u0, k0, v0) = _setup(
            cores, frozen if frozen_x else [], equation, letters, base)
        run = kernels.activation_maps(impl)
        geo = ConvGeometry.unpack(conv)
        stride, padding, dilation = geo.stride, geo.padding, geo.dilation
        layout = memory_format(x)
        g = grad_out.to(x.dtype)
        # x and dy each feed a projection and an outer product: converted once (torch maps).
        xa, ga = run.operand(x, u.dtype), run.operand(g, u.dtype)
        z1 = run.project(xa, u, memory_format=layout)[0]
        with ieee_fp32():
            z2 = F.conv3d(z1, k, None, stride, padding, dilation)
        if frozen_x:
            du, dk, dv = _differences((u, k, v), (u0, k0, v0))
        gz2, dgz2 = run.project(ga, v.t(), dv.t() if frozen_x else None, scale,
                                memory_format=layout)

        def small_conv_backward(grad, weight, need_weight):
            with ieee_fp32():
                return torch.ops.aten.convolution_backward(
                    grad, z1, weight, None, stride, padding, dilation, False, [0, 0, 0], 1,
                    [True, need_weight, False])

        gz1, gk, _ = small_conv_backward(gz2, k, True)
        block_grads = [
            run.outer(xa, gz1).reshape(states[0][2].shape),
            gk.reshape(part.rank_v, part.rank_u, -1).permute(1, 2, 0).reshape(states[1][2].shape),
            run.outer(ga, z2, scale).reshape(states[2][2].shape)]
        grads = [None] * len(reduced)
        for (eq, idx), st, gb in zip(((part.u_equation, part.u_cores),
                                      (part.k_equation, part.k_cores),
                                      (part.v_equation, part.v_cores)), states, block_grads):
            for i, gi in zip(idx, _block_grads(eq, reduced, idx, st, gb)):
                grads[i] = gi
        core_grads = stored_grads(p, grads, cores)
        gx = x.new_empty(0)  # (separate empties: a custom op's outputs may not alias)
        if need_x:
            gx = torch.ops.aten.convolution_backward(
                g, x, base.to(x.dtype), None, stride, padding, dilation, False, [0, 0, 0], 1,
                [True, False, False])[0]
            if frozen_x:
                # Telescoped as the forward: Uᵀ·convᵀ(Vᵀg, K) - U0ᵀ·convᵀ(V0ᵀg, K0) =
                # ΔUᵀ·gz1 + U0ᵀ·(convᵀ(Vᵀg, ΔK) + convᵀ(ΔVᵀg, K0)).
                e = small_conv_backward(gz2, dk, False)[0]
                e += small_conv_backward(dgz2, k0, False)[0]
                gx = run.add_expanded(gx, gz1, du.t(), e, -u0.t())
            else:
                gx = run.add_expanded(gx, gz1, u.t())
            gx = gx.contiguous(memory_format=layout)
        gb = g.sum((0, 2, 3, 4)).to(bias.dtype) if need_bias else x.new_empty(0)
        return [gx, gb] + core_grads


register_recompute_autograd(factorized_conv3d, factorized_conv3d_backward, input_grad_like)


# -- QuanTA on Linear: the gates applied to the activations ----------------------------------
def _token_equation(equation: str) -> str:
    """``"...abc,...->...ghi"`` with the ellipsis replaced by one token letter."""
    letter = next(c for c in "tTuvwxyzjklmnopqrs" if c not in equation)
    return equation.replace("...", letter)


def _factorized_x(x: Tensor, eq: str, cores: list[Tensor]) -> Tensor:
    """x as (tokens, *input axes) in the contraction dtype."""
    terms = eq.split("->")[0].split(",")
    sizes = {l: n for t, c in zip(terms[1:], cores) for l, n in zip(t, c.shape)}
    return x.reshape(-1, *[sizes[l] for l in terms[0][1:]]).to(contraction_dtype(cores))


def _apply_gates(x3: Tensor, cores: list[Tensor], eq: str) -> Tensor:
    return sweep.contract(eq, [x3, *cores])[2].reshape(x3.shape[0], -1)


@lru_cache(maxsize=None)
def _chain(eq: str) -> tuple[tuple[str, str, str], ...]:
    """The activation equation as gates applied one at a time to x: per gate, the letters of
    its input h, of the gate and of its output (the last one the equation's output)."""
    lhs, out = eq.split("->")
    x, *gates = lhs.split(",")
    steps, cur = [], x
    for k, g in enumerate(gates):
        later = set("".join(gates[k + 1:])) | set(out)
        nxt = out if k == len(gates) - 1 else "".join(
            l for l in dict.fromkeys(cur + g) if l in later)
        if (not set(g) & set(cur) or not set(nxt) <= set(cur) | set(g)
                or not set(cur) <= set(nxt) | set(g)):
            raise ValueError(f"{eq}: gate {k} ({g}) does not act on the result of the gates "
                             "before it; the factorized Linear needs a chain of gates")
        steps.append((cur, g, nxt))
        cur = nxt
    return tuple(steps)


def _apply(step, h, gate):
    hin, g, hout = step
    return torch.einsum(f"{hin},{g}->{hout}", h, gate)


def _telescoped(chain, x3, cores, frozen):
    """A(x; θ) - A(x; θ0) along the chain without subtracting two large terms:
    D_1 = ΔG_1·x, D_k = ΔG_k·h_{k-1} + G0_k·D_{k-1} (h: θ's partial results, ΔG = θ - θ0,
    exactly zero at initialisation)."""
    h, d = x3, None
    for step, c, c0 in zip(chain, cores, frozen):
        term = _apply(step, h, c - c0)
        d = term if d is None else term + _apply(step, d, c0)
        h = _apply(step, h, c)
    return d


def _telescoped_backward(chain, x3, cores, frozen, g_out, need_x):
    """(dL/dx of A(x; θ) - A(x; θ0), telescoped as the forward in reverse; every gate's
    gradient) from ``g_out`` = dL/dA, with θ's partial results recomputed."""
    hs = [x3]
    for step, c in zip(chain[:-1], cores[:-1]):
        hs.append(_apply(step, hs[-1], c))
    e = g_out.reshape(_shape_of(chain[-1][2], x3, cores, chain))
    core_grads = [None] * len(cores)
    d = None                                    # dL/dh of the difference, back to x
    for k in range(len(chain) - 1, -1, -1):
        hin, g, hout = chain[k]
        core_grads[k] = torch.einsum(f"{hout},{hin}->{g}", e, hs[k])
        if need_x:
            term = torch.einsum(f"{hout},{g}->{hin}", e, cores[k] - frozen[k])
            d = term if d is None else term + torch.einsum(f"{hout},{g}->{hin}", d, frozen[k])
        if k:
            e = torch.einsum(f"{hout},{g}->{hin}", e, cores[k])
    return d, core_grads


def _shape_of(letters, x3, cores, chain):
    sizes = dict(zip(chain[0][0], x3.shape))
    for (_, g, _), c in zip(chain, cores):
        sizes.update(zip(g, c.shape))
    return [sizes[l] for l in letters]


@custom_op("tenvoo_fast::factorized_linear", mutates_args=())
def factorized_linear(x: Tensor, base: Tensor, cores: list[Tensor], frozen: list[Tensor],
                      bias: Optional[Tensor], equation: str, scale: float) -> Tensor:
    """``linear(x, W) + scale * (A(x; θ) - A(x; θ0))`` with A the adapter applied to the
    activations (``equation``, e.g. QuanTA's ``...abc,efbc,diaf,ghde->...ghi``); ``frozen``
    empty means no frozen copy. Equal to the merged ``linear(x, W - Q(θ0) + Q(θ))`` in exact
    arithmetic; the base GEMM runs in x's dtype and the adapter term in fp32 (fp64), so the
    frozen-copy layer reproduces the base layer exactly at initialisation."""
    with exact_math(x.device.type):
        eq = _token_equation(equation)
        x3 = _factorized_x(x, eq, cores)
        if frozen:
            delta = _telescoped(_chain(eq), x3, cores, frozen).reshape(x3.shape[0], -1)
        else:
            delta = _apply_gates(x3, cores, eq)
        y = F.linear(x, base.to(x.dtype), None if bias is None else bias.to(x.dtype))
        y = y.reshape(-1, base.shape[0]).to(delta.dtype) + scale * delta
        return y.to(x.dtype).reshape(*x.shape[:-1], base.shape[0])


@factorized_linear.register_fake
def _(x, base, cores, frozen, bias, equation, scale):
    check_linear_args(x, base, cores, frozen, bias, (0, len(cores)))
    return x.new_empty((*x.shape[:-1], base.shape[0]))


@custom_op("tenvoo_fast::factorized_linear_backward", mutates_args=())
def factorized_linear_backward(grad_out: Tensor, x: Tensor, base: Tensor, cores: list[Tensor],
                               frozen: list[Tensor], bias: Optional[Tensor], need_x: bool,
                               need_bias: bool, equation: str, scale: float) -> list[Tensor]:
    """[grad_x, grad_bias, *grad_cores] of :func:`factorized_linear`, recomputing the adapter's
    partial products (only x and the cores were saved)."""
    with exact_math(x.device.type):
        eq = _token_equation(equation)
        x3 = _factorized_x(x, eq, cores)
        g = grad_out.reshape(-1, base.shape[0])
        g_adapter = g.to(x3.dtype) * scale

        if frozen:
            gx_adapter, core_grads = _telescoped_backward(_chain(eq), x3, cores, frozen,
                                                          g_adapter, need_x)
        else:
            steps, nodes, out = sweep.contract(eq, [x3, *cores])
            gx_adapter, *core_grads = sweep.operand_grads(steps, nodes, len(cores) + 1,
                                                          g_adapter.reshape(out.shape))
        gx = x.new_empty(0)  # (separate empties: a custom op's outputs may not alias)
        if need_x:
            gx = (g.matmul(base.to(x.dtype)).to(x3.dtype) + gx_adapter.reshape(g.shape[0], -1))
            gx = gx.to(x.dtype).reshape(x.shape)
        gb = g.sum(0).to(bias.dtype) if need_bias else x.new_empty(0)
        return [gx, gb] + [cg.to(c.dtype).contiguous() for cg, c in zip(core_grads, cores)]


def _same_as_input(x: Tensor) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


register_recompute_autograd(factorized_linear, factorized_linear_backward, _same_as_input)
