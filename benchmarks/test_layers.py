"""Fwd+bwd of one adapted layer per method, backend and shape, beside its peers, in one run.

Peers: a trainable plain Conv3d (full fine-tuning), a frozen Conv3d (the floor: forward plus
input gradient), the autograd floor (a frozen conv carrying the adapter's trainable tensors
through one ``autograd.Function`` that does no adapter work: what any layer with that many
trainable tensors pays autograd), and the reference backend (the published algorithm). Each case records
``saved_bytes`` (what autograd keeps for backward beyond the input and the layer's own tensors)
and the weight's size in ``extra_info``. ``python benchmarks/report.py results.json`` turns a
``--benchmark-json`` file into a markdown table of ratios. CI runs this with
``--benchmark-disable`` (each case once, as a test).
"""
import pytest
import torch
from torch import nn

import tenvoo_fast
from tenvoo_fast import (QuanTALinear, TenVOOConv3d, use_backend, use_strategy,
                         use_weight_policy)
from tenvoo_fast.dispatch.costs import conv_costs
from tenvoo_fast.measure import owned_tensors, saved_bytes

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# CPU: the goal shapes (small spatial sizes), and a host-time case (8 channels on 2x2x2
# voxels: compute ~0, so the ratio to a trainable conv is the adapter's host overhead). GPU: the
# paper DDPM's adapted convs at the voxels they see for a 128x128x96 input (one per level, plus
# the widest skip-concat layers).
CPU_SHAPES = {"512x512@8x8x6": (512, 512, (8, 8, 6)), "32x32@32x32x24": (32, 32, (32, 32, 24)),
              "8x8@2x2x2": (8, 8, (2, 2, 2))}
GPU_SHAPES = {f"{ci}x{co}@{'x'.join(map(str, v))}": (ci, co, v) for ci, co, v in [
    (32, 32, (128, 128, 96)), (64, 32, (128, 128, 96)), (32, 32, (64, 64, 48)),
    (64, 64, (32, 32, 24)), (128, 128, (16, 16, 12)), (256, 256, (8, 8, 6)),
    (512, 512, (8, 8, 6)), (512, 512, (4, 4, 3)), (1024, 512, (4, 4, 3))]}
SHAPES = GPU_SHAPES if DEVICE == "cuda" else CPU_SHAPES
#: The DDPM's adapted Linear shapes, each with the rows it sees for a 128x128x96 input, batch 1:
#: attention on 8x8x6 (256 channels) and 4x4x3 (512) voxels, time-embedding layers on one row.
#: Small enough for the CPU as they are.
LINEAR_SHAPES = {f"{i}x{o}@{t}rows": (i, o, t) for i, o, t in [
    (128, 128, 1), (128, 512, 1), (256, 256, 384), (512, 512, 48)]}
#: Autocast dtype of the timed step: the paper trains in bf16 on GPU; fp32 on the CPU.
AMP = torch.bfloat16 if DEVICE == "cuda" else None
ADAPTERS = {"tenvoo-l-r4": ("L", 4), "tenvoo-q-r12": ("Q", 12)}


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _run(benchmark, step, owned, weight, **info):
    benchmark.extra_info.update(info)
    benchmark.extra_info["weight_bytes"] = weight.numel() * weight.element_size()

    def once():
        with torch.autocast(DEVICE, dtype=AMP, enabled=AMP is not None):
            step()
        _sync()

    with torch.autocast(DEVICE, dtype=AMP, enabled=AMP is not None):
        benchmark.extra_info["saved_bytes"] = saved_bytes(step, owned)
    if DEVICE == "cuda":  # the step's peak above what was allocated before it
        _sync()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        once()
        benchmark.extra_info["peak_bytes"] = torch.cuda.max_memory_allocated() - before

    # Enough rounds that the median is stable on a shared 2-core machine.
    benchmark.pedantic(once, rounds=15, warmup_rounds=2, iterations=1)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("peer", ["trainable-conv", "frozen-conv"])
def test_plain_conv(benchmark, shape, peer):
    cin, cout, vol = SHAPES[shape]
    conv = nn.Conv3d(cin, cout, 3, padding=1, device=DEVICE)
    conv.requires_grad_(peer == "trainable-conv")
    x = torch.randn(1, cin, *vol, device=DEVICE, requires_grad=True)
    owned = [x, conv.weight, conv.bias]
    _run(benchmark, lambda: conv(x).sum().backward(), owned, conv.weight, shape=shape,
         method=peer, backend="torch")


class _ConvWithIdleTensors(torch.autograd.Function):
    """A conv whose backward also hands zero gradients to ``idle`` trainable tensors: what
    autograd alone charges a layer with that many trainable tensors (no adapter work)."""

    @staticmethod
    def forward(ctx, x, weight, bias, *idle):
        ctx.save_for_backward(x, weight)
        ctx.idle = [t.shape for t in idle]
        return nn.functional.conv3d(x, weight, bias, padding=1)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        gx, _, gb = torch.ops.aten.convolution_backward(
            grad, x, weight, [weight.shape[0]], [1] * 3, [1] * 3, [1] * 3, False, [0] * 3, 1,
            [True, False, True])
        return (gx, None, gb, *[grad.new_zeros(s) for s in ctx.idle])


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_autograd_floor(benchmark, shape, adapter):
    """The floor of an adapted layer's host time: a frozen conv plus the adapter's trainable
    tensors (its cores and the bias) through one ``autograd.Function`` that does no adapter
    work, only their zero gradients."""
    cin, cout, vol = SHAPES[shape]
    variant, rank = ADAPTERS[adapter]
    layer = TenVOOConv3d.from_conv(nn.Conv3d(cin, cout, 3, padding=1, device=DEVICE), rank,
                                   variant)
    cores = list(layer.cores)
    x = torch.randn(1, cin, *vol, device=DEVICE, requires_grad=True)
    w = layer.weight.detach()

    def step():
        _ConvWithIdleTensors.apply(x, w, layer.bias, *cores).sum().backward()
    _run(benchmark, step, [x, w, layer.bias, *cores], w, shape=shape, method=adapter,
         backend="autograd-floor")


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("adapter", list(ADAPTERS))
# triton on the CPU would be its interpreter (a numerics check, not a speed): GPU only.
# cpu / cuda: the native (csrc) kernels of this device, where the install built them.
# "torch" and "auto" choose the strategy per layer; the forced /merged and /factorized runs
# beside them show whether the choice was the faster; triton/factorized runs the factorized
# conv's activation-sized maps in the fused Triton kernels (torch/factorized: in torch);
# triton/implicit-gemm is the Triton conv that generates its weight tiles on chip (compare with
# trainable-conv: cuDNN's conv).
# A third part is the effective-weight policy ("keep": the merged forward's weight reused by
# the backward; default: rebuilt there).
@pytest.mark.parametrize("backend", ["reference", "torch", "auto", DEVICE, "torch/merged",
                                     "torch/merged/keep", "torch/factorized"]
                         + (["triton", "triton/merged/keep", "triton/factorized",
                             "triton/implicit-gemm"] if DEVICE == "cuda" else []))
def test_tenvoo_conv(benchmark, shape, adapter, backend):
    parts = backend.split("/")
    name, strategy, policy = parts + ["", "recompute"][len(parts) - 1:]
    reason = tenvoo_fast.dispatch.backends.get_backend(name).unavailable_reason() if name in (
        "cpu", "cuda") else None
    if reason:
        pytest.skip(reason)
    cin, cout, vol = SHAPES[shape]
    variant, rank = ADAPTERS[adapter]
    layer = TenVOOConv3d.from_conv(nn.Conv3d(cin, cout, 3, padding=1, device=DEVICE), rank,
                                   variant)
    x = torch.randn(1, cin, *vol, device=DEVICE, requires_grad=True)
    costs = conv_costs(layer.network, tuple(x.shape), vol)
    if strategy == "factorized" and costs["factorized"] > 10 * costs["merged"]:
        pytest.skip(f"factorized is estimated at {costs['factorized'] / costs['merged']:.0f}x "
                    "merged here (rank-sized maps of r³ channels)")
    if strategy == "implicit-gemm" and variant == "Q" and rank > 4:
        pytest.skip("implicit-gemm generates each weight tile over Q's r³ bond (1728 at r=12): "
                    "about 27x the conv's own flops")
    with use_backend(name), use_strategy(strategy or "auto"), use_weight_policy(policy):
        chosen = tenvoo_fast.dispatch.resolve(layer, x)
        picked = (tenvoo_fast.dispatch.strategy.conv_strategy(layer, x.shape, vol, chosen.impl)
                  if chosen.name != "reference" else None)
        _run(benchmark, lambda: layer(x).sum().backward(), owned_tensors(layer, x, chosen),
             layer.weight, shape=shape, method=adapter, backend=backend,
             resolved=chosen.name + (f"/{picked}" if picked else ""))


@pytest.mark.parametrize("shape", list(LINEAR_SHAPES))
@pytest.mark.parametrize("peer", ["trainable-linear", "frozen-linear"])
def test_plain_linear(benchmark, shape, peer):
    fin, fout, rows = LINEAR_SHAPES[shape]
    lin = nn.Linear(fin, fout, device=DEVICE)
    lin.requires_grad_(peer == "trainable-linear")
    x = torch.randn(rows, fin, device=DEVICE, requires_grad=True)
    _run(benchmark, lambda: lin(x).sum().backward(), [x, lin.weight, lin.bias], lin.weight,
         shape=shape, method=peer, backend="torch")


@pytest.mark.parametrize("shape", list(LINEAR_SHAPES))
# "torch" lets the strategy choice pick merged or factorized per shape; the two forced runs
# beside it show whether it picked the faster. "auto" also picks the backend.
@pytest.mark.parametrize("backend", ["reference", "auto", "torch", "torch/merged",
                                     "torch/factorized"]
                         + (["triton"] if DEVICE == "cuda" else []))
def test_quanta_linear(benchmark, shape, backend):
    fin, fout, rows = LINEAR_SHAPES[shape]
    layer = QuanTALinear.from_linear(nn.Linear(fin, fout, device=DEVICE), 12)
    x = torch.randn(rows, fin, device=DEVICE, requires_grad=True)
    name, _, strategy = backend.partition("/")
    with use_backend(name), use_strategy(strategy or "auto"):
        chosen = tenvoo_fast.dispatch.resolve(layer, x)
        picked = tenvoo_fast.dispatch.strategy.linear_strategy(layer, rows)
        _run(benchmark, lambda: layer(x).sum().backward(), owned_tensors(layer, x, chosen),
             layer.weight, shape=shape, method="quanta-r12", backend=backend,
             resolved=chosen.name + (f"/{picked}" if chosen.name != "reference" else ""))
