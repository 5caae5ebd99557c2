"""Factorised execution (strategy ``"factorized"``, fast-path design 3): the adapter applied to
the activations beside the frozen base layer, so that no weight-sized tensor and no dL/dW exist.

QuanTA on a Linear (:func:`factored_linear`): the three gates applied to x viewed as
(..., n1, n2, n3), the published activation form.

TenVOO on a Conv3d (:func:`factored_conv3d`): a TenVOO network splits into three blocks by what its cores touch: the input block U (the
cores holding the input-channel letters), the output block V (output-channel letters) and the
kernel block K (everything else: the kD/kH/kW cores and the cross cores). Contracted
separately they are small: U is (Cin, R_U), V is (Cout, R_V) and K is an R_U -> R_V 3D kernel,
with R_U, R_V the bond dimensions between the blocks (r³ for TenVOO-L and -Q). Then

    conv3d(x, ΔW) = V · conv3d(U · x, K)        (U and V as 1x1x1 convolutions)

exactly (1x1x1 maps commute with the spatial convolution, including its stride, padding and
dilation), so the adapter runs on the activations beside the frozen base conv and no
weight-sized tensor, and no dL/dW pass, exists at all. The frozen copy is applied the same way
and subtracted (``A(x; θ) - A(x; θ0)``), so at initialisation the layer returns its base conv's
output exactly. The adapter term is computed in fp32 (fp64 for fp64 layers); the base conv in
the input's dtype. Backward recomputes the rank-sized maps from the saved input instead of
keeping them, and turns the blocks' gradients into every core's through their own environment
contractions.

Only the 1x1x1 maps touch activation-sized tensors (Cin or Cout channels per voxel); the rest
is rank-sized. Those maps run through :mod:`tenvoo_fast.activation_maps`: in torch on the
``recompute``/``native`` backends (which convert x to fp32 and form the adapter term as a
tensor), or in the fused Triton kernels on the ``triton`` backend
(:mod:`tenvoo_fast.triton_kernels.factored_conv`), which read x, dy and the base conv's output
once each in their own dtype and layout, project onto θ's and θ0's ranks in one pass, add
``scale·(V·z2 - V0·z2_0)`` into the base output in place, and reduce the U and V blocks'
gradients without an fp32 copy of x or dy. The rank-sized conv with K runs in torch (cuDNN),
without TF32.

It pays off where Cin·Cout is large against the blocks' ranks and the voxels are few
(:func:`conv_costs` estimates both strategies for :mod:`tenvoo_fast.strategy`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import activation_maps, environment, simplify
from .networks import QUANTA_ACTIVATION_EQUATION
from .ops import conv_output_like, memory_format, reduced_cores, stored_grads
from .reference import contraction_dtype, ieee_fp32


@dataclass(frozen=True)
class Partition:
    """The reduced network's U, K and V blocks: core positions and einsum equations."""
    u_cores: tuple[int, ...]
    k_cores: tuple[int, ...]
    v_cores: tuple[int, ...]
    u_equation: str      # -> in letters + U bonds
    k_equation: str      # -> U bonds + kernel letters + V bonds
    v_equation: str      # -> out letters + V bonds
    rank_u: int
    rank_v: int


def _letters(equation: str):
    lhs, out = equation.split("->")
    return lhs.split(","), out


@lru_cache(maxsize=None)
def partition(equation: str, shapes: tuple, out_letters: str, in_letters: str,
              kernel_letters: str) -> Partition:
    """Split a (reduced) weight network into its U, K and V blocks; ValueError if the network
    does not factor that way (a core touching both channel sides, or U and V sharing a bond)."""
    terms, _ = _letters(equation)
    sizes = {l: n for t, s in zip(terms, shapes) for l, n in zip(t, s)}
    u = tuple(i for i, t in enumerate(terms) if set(t) & set(in_letters))
    v = tuple(i for i, t in enumerate(terms) if set(t) & set(out_letters))
    if set(u) & set(v):
        raise ValueError(f"{equation}: a core holds both input and output channel letters")
    k = tuple(i for i in range(len(terms)) if i not in u and i not in v)

    def block_letters(block):
        return set("".join(terms[i] for i in block))

    lu, lk, lv = block_letters(u), block_letters(k), block_letters(v)
    if (lu & lv) - set(kernel_letters):
        raise ValueError(f"{equation}: the input and output blocks share bonds "
                         f"{sorted(lu & lv)}; no factorised form")
    if (lu | lv) & set(kernel_letters):
        raise ValueError(f"{equation}: a kernel letter sits in a channel block")
    bonds_u = "".join(sorted((lu & lk) - set(in_letters)))
    bonds_v = "".join(sorted((lv & lk) - set(out_letters)))

    def eq(block, out):
        return ",".join(terms[i] for i in block) + "->" + out

    return Partition(u, k, v, eq(u, in_letters + bonds_u),
                     eq(k, bonds_u + kernel_letters + bonds_v), eq(v, out_letters + bonds_v),
                     math.prod(sizes[l] for l in bonds_u), math.prod(sizes[l] for l in bonds_v))


def network_letters(network) -> tuple[str, str, str]:
    """(out, in, kernel) letters of a TenVOO network's output (``ABCabcxyz``)."""
    out = network.output
    n_out, n_in = len(network.meta["out_factors"]), len(network.meta["in_factors"])
    return out[:n_out], out[n_out:n_out + n_in], out[n_out + n_in:]


def _block(equation, cores, idx):
    """(steps, nodes, result) of one block's contraction (kept for its reverse sweep)."""
    ops = [cores[i] for i in idx]
    if len(ops) == 1:    # a single core: its einsum is a permutation (or a sum)
        return None, None, torch.einsum(equation, ops[0])
    return environment.contract(equation, ops)


def _block_grads(equation, cores, idx, state, grad):
    steps, nodes, _ = state
    if steps is None:
        (term,), out = _letters(equation)
        return [environment._grad_operand(grad, out, grad.new_ones(()), "", term,
                                          cores[idx[0]].shape)]
    return environment.operand_grads(steps, nodes, len(idx), grad)


def _maps(part, cores, cin, cout, kernel_shape):
    """U as an (R_U, Cin) matrix, K as an (R_V, R_U, kD, kH, kW) kernel, V as a (Cout, R_V)
    matrix, and the block states for the reverse sweep."""
    su = _block(part.u_equation, cores, part.u_cores)
    sk = _block(part.k_equation, cores, part.k_cores)
    sv = _block(part.v_equation, cores, part.v_cores)
    u = su[2].reshape(cin, part.rank_u).t()
    k = sk[2].reshape(part.rank_u, -1, part.rank_v).permute(2, 0, 1).reshape(
        part.rank_v, part.rank_u, *kernel_shape)
    v = sv[2].reshape(cout, part.rank_v)
    return (u, k, v), (su, sk, sv)


def _conv_args(conv):
    return conv[0:3], conv[3:6], conv[6:9]


def _setup(cores, frozen, equation, letters, base):
    """(plan, partition, reduced cores, θ's maps and block states, θ0's maps or Nones; θ0's
    are not contracted when ``frozen`` is empty)."""
    p, _, reduced = reduced_cores(cores, equation)
    part = partition(p.equation, tuple(tuple(c.shape) for c in reduced), *letters.split(","))
    cout, cin, *kernel_shape = base.shape
    maps, states = _maps(part, reduced, cin, cout, kernel_shape)
    maps0 = (None, None, None)
    if frozen:
        maps0 = _maps(part, reduced_cores(frozen, equation)[2], cin, cout, kernel_shape)[0]
    return p, part, reduced, maps, states, maps0


def _recompute_autograd(op, backward_op):
    """Autograd for a factorized op ``op(x, base, cores, frozen, bias, *args)`` whose backward
    is the custom op ``backward_op(grad_out, x, base, cores, frozen, bias, need_x, need_bias,
    *args) -> [grad_x, grad_bias, *grad_cores]``: only the inputs are saved, the backward op
    recomputes the rest. Also registers the backward op's fake kernel."""
    def setup_context(ctx, inputs, output):
        x, base, cores, frozen, bias, *args = inputs
        ctx.save_for_backward(x, base, bias, *cores, *frozen)
        ctx.n_cores, ctx.n_frozen, ctx.args = len(cores), len(frozen), args

    def backward(ctx, grad_out):
        x, base, bias, *rest = ctx.saved_tensors
        cores, frozen = rest[:ctx.n_cores], rest[ctx.n_cores:]
        need_x = ctx.needs_input_grad[0]
        need_b = bias is not None and ctx.needs_input_grad[4]
        gx, gb, *grad_cores = backward_op(grad_out, x, base, cores, frozen, bias, need_x, need_b,
                                          *ctx.args)
        return (gx if need_x else None, None, grad_cores, [None] * ctx.n_frozen,
                gb if need_b else None, *[None] * len(ctx.args))

    @backward_op.register_fake
    def _(grad_out, x, base, cores, frozen, bias, need_x, need_bias, *args):
        grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device,
                             memory_format=memory_format(x))
        return ([grad_x if need_x else x.new_empty(0),
                 torch.empty_like(bias) if need_bias else x.new_empty(0)]
                + [torch.empty_like(c) for c in cores])

    op.register_autograd(backward, setup_context=setup_context)


@torch.library.custom_op("tenvoo_fast::factored_conv3d", mutates_args=())
def factored_conv3d(x: Tensor, base: Tensor, cores: list[Tensor], frozen: list[Tensor],
                    bias: Optional[Tensor], equation: str, letters: str, scale: float,
                    conv: list[int], kernel: str) -> Tensor:
    """``conv3d(x, W, bias) + scale * (A(x; θ) - A(x; θ0))`` with ``A = V·conv(U·x, K)`` (see the
    module docstring); ``letters`` = "out,in,kernel" letters (e.g. ``"ABC,abc,xyz"``), ``conv`` =
    stride + padding + dilation (9 ints); ``frozen`` empty: no frozen copy; ``kernel`` runs the
    activation-sized maps (:func:`activation_maps.maps`)."""
    with torch.autocast(x.device.type, enabled=False), torch.no_grad():
        *_, (u, k, v), _, (u0, k0, v0) = _setup(cores, frozen, equation, letters, base)
        run = activation_maps.maps(kernel)
        stride, padding, dilation = _conv_args(conv)
        layout = memory_format(x)
        # The base conv under the caller's settings (as the frozen layer would run it).
        y = F.conv3d(x, base.to(x.dtype), None if bias is None else bias.to(x.dtype), stride,
                     padding, dilation)
        z1, z1_0 = run.project(x, u, u0, memory_format=layout)
        with ieee_fp32():
            z2 = F.conv3d(z1, k, None, stride, padding, dilation)
            z2_0 = F.conv3d(z1_0, k0, None, stride, padding, dilation) if frozen else None
        return run.add_expanded(y, z2, v, z2_0, v0, scale).contiguous(memory_format=layout)


@factored_conv3d.register_fake
def _(x, base, cores, frozen, bias, equation, letters, scale, conv, kernel):
    return conv_output_like(x, base, conv)


@torch.library.custom_op("tenvoo_fast::factored_conv3d_backward", mutates_args=())
def factored_conv3d_backward(grad_out: Tensor, x: Tensor, base: Tensor, cores: list[Tensor],
                             frozen: list[Tensor], bias: Optional[Tensor], need_x: bool,
                             need_bias: bool, equation: str, letters: str, scale: float,
                             conv: list[int], kernel: str) -> list[Tensor]:
    """[grad_x, grad_bias, *grad_cores] of :func:`factored_conv3d`, recomputing z1 = U·x and
    z2 = conv(z1, K) from the saved input. The blocks' gradients (dV = g ⊗ z2, dK from the
    small conv's weight gradient, dU = x ⊗ dz1) give every core's by each block's reverse
    sweep; the input gradient is the base conv's plus Uᵀ·dz1 (minus θ0's), added in place."""
    with torch.autocast(x.device.type, enabled=False), torch.no_grad():
        frozen_x = bool(frozen) and need_x
        p, part, reduced, (u, k, v), states, (u0, k0, v0) = _setup(
            cores, frozen if frozen_x else [], equation, letters, base)
        run = activation_maps.maps(kernel)
        stride, padding, dilation = _conv_args(conv)
        layout = memory_format(x)
        g = grad_out.to(x.dtype)
        # x and dy each feed a projection and an outer product: converted once (torch maps).
        xa, ga = run.operand(x, u.dtype), run.operand(g, u.dtype)
        z1 = run.project(xa, u, memory_format=layout)[0]
        with ieee_fp32():
            z2 = F.conv3d(z1, k, None, stride, padding, dilation)
        gz2, gz2_0 = run.project(ga, v.t(), v0.t() if frozen_x else None, scale,
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
            gz1_0 = small_conv_backward(gz2_0, k0, False)[0] if frozen_x else None
            gx = run.add_expanded(gx, gz1, u.t(), gz1_0, u0.t() if frozen_x else None)
            gx = gx.contiguous(memory_format=layout)
        gb = g.sum((0, 2, 3, 4)).to(bias.dtype) if need_bias else x.new_empty(0)
        return [gx, gb] + core_grads


_recompute_autograd(factored_conv3d, factored_conv3d_backward)


# -- QuanTA on Linear: the gates applied to the activations ----------------------------------
def _token_equation(equation: str) -> str:
    """``"...abc,...->...ghi"`` with the ellipsis replaced by one token letter."""
    letter = next(c for c in "tTuvwxyzjklmnopqrs" if c not in equation)
    return equation.replace("...", letter)


def _factored_x(x: Tensor, eq: str, cores: list[Tensor]) -> Tensor:
    """x as (tokens, *input axes) in the contraction dtype."""
    terms = eq.split("->")[0].split(",")
    sizes = {l: n for t, c in zip(terms[1:], cores) for l, n in zip(t, c.shape)}
    return x.reshape(-1, *[sizes[l] for l in terms[0][1:]]).to(contraction_dtype(cores))


def _apply_gates(x3: Tensor, cores: list[Tensor], eq: str) -> Tensor:
    return environment.contract(eq, [x3, *cores])[2].reshape(x3.shape[0], -1)


@torch.library.custom_op("tenvoo_fast::factored_linear", mutates_args=())
def factored_linear(x: Tensor, base: Tensor, cores: list[Tensor], frozen: list[Tensor],
                    bias: Optional[Tensor], equation: str, scale: float) -> Tensor:
    """``linear(x, W) + scale * (A(x; θ) - A(x; θ0))`` with A the adapter applied to the
    activations (``equation``, e.g. QuanTA's ``...abc,efbc,diaf,ghde->...ghi``); ``frozen``
    empty means no frozen copy. Equal to the merged ``linear(x, W - Q(θ0) + Q(θ))`` in exact
    arithmetic; the base GEMM runs in x's dtype and the adapter term in fp32 (fp64), so the
    frozen-copy layer reproduces the base layer exactly at initialisation."""
    with torch.autocast(x.device.type, enabled=False), torch.no_grad():
        eq = _token_equation(equation)
        x3 = _factored_x(x, eq, cores)
        delta = _apply_gates(x3, cores, eq)
        if frozen:
            delta = delta - _apply_gates(x3, frozen, eq)
        y = F.linear(x, base.to(x.dtype), None if bias is None else bias.to(x.dtype))
        y = y.reshape(-1, base.shape[0]).to(delta.dtype) + scale * delta
        return y.to(x.dtype).reshape(*x.shape[:-1], base.shape[0])


@factored_linear.register_fake
def _(x, base, cores, frozen, bias, equation, scale):
    return x.new_empty((*x.shape[:-1], base.shape[0]))


@torch.library.custom_op("tenvoo_fast::factored_linear_backward", mutates_args=())
def factored_linear_backward(grad_out: Tensor, x: Tensor, base: Tensor, cores: list[Tensor],
                             frozen: list[Tensor], bias: Optional[Tensor], need_x: bool,
                             need_bias: bool, equation: str, scale: float) -> list[Tensor]:
    """[grad_x, grad_bias, *grad_cores] of :func:`factored_linear`, recomputing the adapter's
    partial products (only x and the cores were saved)."""
    with torch.autocast(x.device.type, enabled=False), torch.no_grad():
        eq = _token_equation(equation)
        x3 = _factored_x(x, eq, cores)
        g = grad_out.reshape(-1, base.shape[0])
        g_adapter = g.to(x3.dtype) * scale

        def grads(gates):
            steps, nodes, out = environment.contract(eq, [x3, *gates])
            return environment.operand_grads(steps, nodes, len(gates) + 1,
                                             g_adapter.reshape(out.shape))

        gx_adapter, *core_grads = grads(cores)
        gx = x.new_empty(0)  # (separate empties: a custom op's outputs may not alias)
        if need_x:
            if frozen:
                gx_adapter = gx_adapter - grads(frozen)[0]
            gx = (g.matmul(base.to(x.dtype)).to(x3.dtype) + gx_adapter.reshape(g.shape[0], -1))
            gx = gx.to(x.dtype).reshape(x.shape)
        gb = g.sum(0).to(bias.dtype) if need_bias else x.new_empty(0)
        return [gx, gb] + [cg.to(c.dtype).contiguous() for cg, c in zip(core_grads, cores)]


_recompute_autograd(factored_linear, factored_linear_backward)


# -- cost models --------------------------------------------------------------------------------
@lru_cache(maxsize=1024)
def linear_costs(network, tokens: int) -> dict[str, int]:
    """Estimated extra flops of one fwd+bwd over the frozen layer's, per strategy.

    merged: the build twice (forward, and again in backward), the reverse sweep (about two
    builds) and the dL/dW GEMM (2·tokens·in·out). factorized: the adapter on the activations
    for θ and θ0 in forward, then in backward both again plus their reverse sweeps (about
    seven applications in all; the base GEMMs are the frozen layer's own).
    """
    shapes = tuple(tuple(c.shape) for c in network.cores)
    out_f, in_f = network.weight_shape
    build = environment.path_flops(network.equation, shapes)
    act_eq = QUANTA_ACTIVATION_EQUATION.replace("...", "t")
    act = environment.path_flops(act_eq, ((tokens, *network.meta["in_factors"]), *shapes))
    return {"merged": 4 * build + 2 * tokens * in_f * out_f, "factorized": 7 * act}


@lru_cache(maxsize=4096)
def conv_costs(network, x_shape: tuple, out_spatial: tuple) -> dict[str, int]:
    """Estimated extra flops of one fwd+bwd over the frozen conv's (forward + input gradient),
    per strategy, for an input of ``x_shape`` and an output of ``out_spatial`` voxels.

    merged: the weight built twice and swept back once (about four builds, opt_einsum's
    count) plus the dL/dW pass, as costly as the conv itself. factorized: the three maps of
    A(x) = V·conv(U·x, K) (2 flops per multiply-add), run about seven times (θ and θ0 in
    forward; in backward θ's recompute, input and block gradients and θ0's recompute and
    input gradient). Cached per network and shapes (the path search costs milliseconds).
    """
    cout, cin, *k = network.weight_shape
    n = x_shape[0]
    vin, vout = n * math.prod(x_shape[2:]), n * math.prod(out_spatial)
    kvol = math.prod(k)
    p = simplify.plan(network.equation, network.shapes)
    part = partition(p.equation, p.shapes, *network_letters(network))
    merged = 4 * environment.path_flops(p.equation, p.shapes) + 2 * vout * cin * cout * kvol
    path = 2 * (vin * cin * part.rank_u + vout * part.rank_u * part.rank_v * kvol
                + vout * part.rank_v * cout)
    return {"merged": merged, "factorized": 7 * path}
