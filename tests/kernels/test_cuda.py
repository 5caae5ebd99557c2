"""Every backend on a CUDA device against the fp64 oracle (skipped without a GPU).

Tolerances follow flash-attention's rule: a backend's error against the fp64 oracle may be at
most a small multiple of PyTorch's own error for the same computation in the same dtype (a
plain conv/linear on the exact fp64 weight, cast to that dtype), plus a floor for fp32.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.oracle import rel_err, spec_delta
from tenvoo_fast import (QuanTALinear, TenVOOConv3d, available_backends, use_backend,
                         use_strategy)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPES = [(32, 32, (16, 16, 12)), (64, 128, (8, 8, 6)), (512, 512, (4, 4, 3)),
          (1024, 512, (2, 2, 2)), (12, 10, (5, 3, 4))]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _backends():
    """Every backend that runs CUDA tensors here (the ``cpu`` one runs only CPU tensors)."""
    if not torch.cuda.is_available():
        return []
    return [b for b in available_backends() if b not in ("auto", "cpu")]


def _trained(layer):
    with torch.no_grad():
        for p in layer.cores:
            p.add_(torch.randn_like(p) * 0.05 * (p.abs().mean() + 0.1))
    return layer


def _oracle(layer, x, gy, kind):
    """fp64 output, input gradient, core gradients, the exact weight, and the cores used."""
    cores = [p.detach().cpu().double().requires_grad_() for p in layer.cores]
    frozen = [c.detach().cpu() for c in layer.frozen_cores]
    cpu = layer.cpu()
    w = cpu.weight.detach().double() + spec_delta(cpu, cores) - spec_delta(cpu, frozen)
    layer.cuda()
    x64 = x.detach().cpu().double().requires_grad_()
    b = layer.bias.detach().cpu().double()
    y = (F.conv3d(x64, w, b, layer.stride, layer.padding) if kind == "conv"
         else F.linear(x64, w, b))
    y.backward(gy.cpu().double())
    return y, x64.grad, [c.grad for c in cores], w.detach(), cores


def _torch_errors(w64, cores, x, gy, kind, layer, dtype, y0, gx0, gc0):
    """PyTorch's own errors in ``dtype``: the exact weight, rounded once, through its op; its
    dL/dW (in ``dtype``, as the framework forms it) contracted exactly into core gradients."""
    x2 = x.detach().to(dtype).requires_grad_()
    w = w64.to("cuda", dtype).requires_grad_()
    b = layer.bias.detach().to(dtype)
    y = F.conv3d(x2, w, b, layer.stride, layer.padding) if kind == "conv" else F.linear(x2, w, b)
    y.backward(gy.to(dtype))
    cpu = layer.cpu()
    gc = torch.autograd.grad(spec_delta(cpu, cores), cores, w.grad.cpu().double())
    layer.to("cuda")
    return (rel_err(y.cpu(), y0), rel_err(x2.grad.cpu(), gx0),
            [rel_err(g, g0) for g, g0 in zip(gc, gc0)])


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["L", "Q"])
@pytest.mark.parametrize("cin,cout,vol", SHAPES)
def test_tenvoo_conv_on_cuda(cin, cout, vol, variant, dtype, backend):
    torch.manual_seed(0)
    conv = nn.Conv3d(cin, cout, 3, padding=1, device="cuda", dtype=dtype)
    with torch.no_grad():
        conv.weight.normal_(0, 0.02)
    layer = _trained(TenVOOConv3d.from_conv(conv, 4, variant))
    x = torch.randn(2, cin, *vol, device="cuda")
    _check(layer, x, "conv", dtype, backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["L", "Q"])
@pytest.mark.parametrize("cin,cout,vol", SHAPES)
@pytest.mark.parametrize("conv", [dict(padding=1), dict(padding=1, stride=2)], ids=["s1", "s2"])
@pytest.mark.parametrize("strategy,backend", [("implicit-gemm", "triton"),
                                              ("factorized", "triton"),
                                              ("factorized", "torch")])
def test_conv_strategies_on_cuda(cin, cout, vol, variant, dtype, conv, strategy, backend):
    """The Triton conv with on-chip weight generation (implicit-gemm), and the factorized conv
    with its activation-sized maps in the fused Triton kernels and in torch."""
    torch.manual_seed(0)
    base = nn.Conv3d(cin, cout, 3, **conv, device="cuda", dtype=dtype)
    with torch.no_grad():
        base.weight.normal_(0, 0.02)
    layer = _trained(TenVOOConv3d.from_conv(base, 4, variant))
    with use_strategy(strategy):
        _check(layer, torch.randn(2, cin, *vol, device="cuda"), "conv", dtype, backend)
    assert layer.execution_strategy == strategy


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fin,fout", [(128, 512), (512, 512), (24, 12)])
def test_quanta_on_cuda(fin, fout, dtype, backend):
    torch.manual_seed(0)
    lin = nn.Linear(fin, fout, device="cuda", dtype=dtype)
    layer = _trained(QuanTALinear.from_linear(lin, 4))
    _check(layer, torch.randn(3, 7, fin, device="cuda"), "linear", dtype, backend)


def _check(layer, x, kind, dtype, backend):
    x = x.to(dtype)
    with use_backend(backend):
        y = layer(x)
    gy = torch.randn_like(y, dtype=torch.float32)
    y0, gx0, gc0, w64, cores64 = _oracle(layer, x, gy, kind)
    xg = x.detach().requires_grad_()
    for p in layer.cores:
        p.grad = None
    with use_backend(backend):
        y = layer(xg)
    y.backward(gy.to(y.dtype))
    ty, tx, tc = _torch_errors(w64, cores64, x, gy, kind, layer, dtype, y0, gx0, gc0)
    floor = 1e-5 if dtype == torch.float32 else 1e-3
    assert rel_err(y.cpu(), y0) <= 2 * ty + floor, "output"
    assert rel_err(xg.grad.cpu(), gx0) <= 2 * tx + floor, "input gradient"
    for i, (g, g0, t) in enumerate(zip(layer.cores, gc0, tc)):
        assert rel_err(g.grad.cpu(), g0) <= 2 * t + 10 * floor, f"core {i} gradient"


@pytest.mark.parametrize("strategy", ["auto", "factorized"])
@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("variant", ["L", "Q"])
def test_bf16_autocast_on_cuda_identical_to_base_at_init(variant, backend, strategy):
    torch.manual_seed(0)
    conv = nn.Conv3d(64, 32, 3, padding=1, device="cuda")
    layer = TenVOOConv3d.from_conv(conv, 4, variant)
    x = torch.randn(1, 64, 8, 8, 6, device="cuda")
    with (use_backend(backend), use_strategy(strategy),
          torch.autocast("cuda", dtype=torch.bfloat16)):
        y, y_base = layer(x), conv(x)
    assert torch.equal(y, y_base)


@pytest.mark.parametrize("strategy", ["merged", "factorized"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp32_identical_to_base_at_init_under_the_callers_tf32(strategy, backend):
    """With cuDNN's TF32 allowed (PyTorch's default; the suite turns it off), the adapted
    layer's base conv runs as the frozen conv would: identical at init. Only the adapter's own
    rank-sized convs are forced to IEEE fp32."""
    torch.manual_seed(0)
    conv = nn.Conv3d(64, 32, 3, padding=1, device="cuda")
    layer = TenVOOConv3d.from_conv(conv, 4, "L")
    x = torch.randn(1, 64, 8, 8, 6, device="cuda")
    with (torch.backends.cudnn.flags(enabled=True, allow_tf32=True), use_backend(backend),
          use_strategy(strategy)):
        assert torch.equal(layer(x), conv(x))
