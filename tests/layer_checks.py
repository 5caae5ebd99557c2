"""Checking an adapted layer against the fp64 oracle (output, input gradient, every core and
bias gradient), and the layers those checks use; shared by the module and strategy tests."""
import torch
import torch.nn.functional as F
from torch import nn

from tests.oracle import rel_err, spec_delta
from tenvoo_fast import (LoHaConv3d, LoHaLinear, LoKrConv3d, LoKrLinear, LoRAConv3d, LoRALinear,
                         QuanTALinear, TenVOOConv3d)

CONV_MAKERS = {
    "tenvoo-l": lambda c, r: TenVOOConv3d.from_conv(c, r, "L"),
    "tenvoo-q": lambda c, r: TenVOOConv3d.from_conv(c, r, "Q"),
    "lora": lambda c, r: LoRAConv3d.from_conv(c, r),
    "lora-bypass": lambda c, r: LoRAConv3d.from_conv(c, r, mode="bypass"),
    "loha": lambda c, r: LoHaConv3d.from_conv(c, r),
    "lokr": lambda c, r: LoKrConv3d.from_conv(c, r),
}
LINEAR_MAKERS = {
    "quanta": lambda l, r: QuanTALinear.from_linear(l, r),
    "lora": lambda l, r: LoRALinear.from_linear(l, r),
    "loha": lambda l, r: LoHaLinear.from_linear(l, r),
    "lokr": lambda l, r: LoKrLinear.from_linear(l, r),
}

#: fp32 tolerance: the reference contracts and convolves in fp32 (errors ~1e-7..1e-6 relative).
TOL = {torch.float32: 2e-5, torch.float64: 1e-10, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def realistic_conv(cin, cout, k=3, dtype=torch.float32):
    """Pre-trained-like magnitudes (std ~0.005-0.05), where the frozen copy dominates W."""
    conv = nn.Conv3d(cin, cout, k, padding=1, dtype=dtype)
    with torch.no_grad():
        conv.weight.normal_(0, 0.02)
        conv.bias.normal_(0, 0.02)
    return conv


def train_a_little(layer, scale=0.05):
    """Move the cores away from θ0 as training would, so T(θ) - T(θ0) is non-zero."""
    with torch.no_grad():
        for p in layer.cores:
            p.add_(torch.randn_like(p) * scale * (p.abs().mean() + 0.1))
    return layer


def oracle_forward_and_grads(layer, x, gy, kind):
    """fp64 output, input grad and core grads, from the spec oracle and torch's conv/linear."""
    cores = [p.detach().double().requires_grad_() for p in layer.cores]
    x64 = x.detach().double().requires_grad_()
    w = layer.weight.detach().double() + spec_delta(layer, cores)
    if layer.frozen_cores is not None:
        w = w - spec_delta(layer, list(layer.frozen_cores))
    b = None if layer.bias is None else layer.bias.detach().double().requires_grad_()
    if kind == "conv":
        conv = F.conv3d if w.dim() == 5 else F.conv2d
        y = conv(x64, w, b, layer.stride, layer.padding, layer.dilation)
    else:
        y = F.linear(x64, w, b)
    y.backward(gy.double())
    return y, x64.grad, [c.grad for c in cores] + ([] if b is None else [b.grad])


def run_layer(layer, x, gy):
    """Output, input gradient, and the gradients of the cores and the (trainable) bias."""
    x = x.detach().clone().requires_grad_()
    params = list(layer.cores) + ([] if layer.bias is None else [layer.bias])
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    y = layer(x)
    y.backward(gy.to(y.dtype))
    return y, x.grad, [p.grad for p in params]


def check_against_oracle(layer, x, kind, tol):
    y_shape = layer(x).shape
    gy = torch.randn(y_shape, dtype=torch.float64)
    y, gx, gc = run_layer(layer, x, gy)
    y0, gx0, gc0 = oracle_forward_and_grads(layer, x, gy, kind)
    assert rel_err(y, y0) < tol, "output"
    assert rel_err(gx, gx0) < tol, "input gradient"
    for i, (g, g0) in enumerate(zip(gc, gc0)):
        assert g is not None, f"parameter {i} got no gradient"
        assert rel_err(g, g0) < tol, f"parameter {i} gradient"


def cores_op_args(layer, x, impl: str) -> tuple:
    """The arguments of a conv op that takes the cores (factorized, implicit-gemm) for ``layer``
    on ``x`` with stride, padding and dilation 1."""
    from tenvoo_fast.contraction.partition import channel_letters
    return (x, layer.weight, list(layer.cores), list(layer.frozen_cores), layer.bias,
            layer.network.equation, ",".join(channel_letters(layer.network)),
            layer.network.scale, [1] * 9, impl)


def check_compiled_matches_eager(layer, x, backend: str, strategy: str) -> None:
    """``torch.compile(fullgraph=True)`` of ``layer`` gives what eager mode gives."""
    from tenvoo_fast import use_backend, use_strategy
    with use_backend(backend), use_strategy(strategy):
        eager = layer(x)
        torch._dynamo.reset()
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    assert rel_err(compiled, eager) < 1e-6
