"""The merged strategy's ops (and the ``torch`` backend): equal to autograd of the reference,
nothing kept for backward, and traceable by torch.compile."""
import pytest
import torch
from torch import nn

from tests.oracle import rel_err
import tenvoo_fast
from tenvoo_fast import (LoHaConv3d, LoKrConv3d, LoRAConv3d, QuanTALinear, TenVOOConv3d,
                         methods, use_backend, use_strategy)
from tenvoo_fast.contraction import program, reference
from tenvoo_fast.dispatch.strategy import linear_strategy
from tenvoo_fast.measure import owned_tensors, saved_bytes

NETWORKS = {
    "tenvoo-l": lambda: methods.tenvoo("L", (4, 2, 2), (2, 3, 2), (3, 1, 3), 3),
    "tenvoo-q": lambda: methods.tenvoo("Q", (4, 2, 2), (2, 3, 2), (3, 2, 3), 3),
    "quanta-equal": lambda: methods.quanta((4, 2, 2), (4, 2, 2), 3),
    "quanta-rank": lambda: methods.quanta((4, 2, 2), (2, 3, 2), 3),
    "lora": lambda: methods.lora(12, 16, (3, 3, 3), 3, 2.0),
    "loha": lambda: methods.loha(12, 16, (3, 1, 3), 3),
    "lokr-full": lambda: methods.lokr(12, 16, (3, 3, 3), 3, full_w2=True),
    "lokr-rank": lambda: methods.lokr(12, 16, (3, 3, 3), 2, full_w2=False),
}


#: Who runs the ops' weight-sized steps (``impl``); "triton" runs in the interpreter without a GPU,
#: "native" is the csrc C++ kernel (its CUDA twin on a GPU) and runs in fp64 too.
IMPLS = {"torch": (torch.float64, 1e-12), "triton": (torch.float32, 2e-6),
           "native": (torch.float64, 1e-12)}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("name", list(NETWORKS))
def test_build_delta_and_core_grads_equal_reference_autograd(name, impl, seeded):
    dtype, tol = IMPLS[impl]
    net = NETWORKS[name]()
    cores = [torch.randn(c.shape, dtype=torch.float64, requires_grad=True) for c in net.cores]
    views = [v.detach().to(dtype) for v in net.views(cores)]
    d_ref = reference.delta_weight(net, cores)
    d = torch.ops.tenvoo_fast.build_delta(views, net.equation, list(net.weight_shape), net.scale,
                                          impl)
    assert d.dtype == dtype and rel_err(d, d_ref) < tol
    g = torch.randn_like(d_ref)
    expected = torch.autograd.grad(d_ref, cores, g)
    got = torch.ops.tenvoo_fast.weight_grad_to_cores(g.to(dtype), views, net.equation,
                                                     list(net.weight_shape), net.scale, impl)
    for e, c, gc in zip(expected, cores, got):
        assert rel_err(gc.reshape(c.shape), e) < tol


LAYERS = {
    "tenvoo-l": lambda: TenVOOConv3d.from_conv(nn.Conv3d(64, 128, 3, padding=1), 4, "L"),
    "tenvoo-q": lambda: TenVOOConv3d.from_conv(nn.Conv3d(64, 128, 3, padding=1), 4, "Q"),
    "lora": lambda: LoRAConv3d.from_conv(nn.Conv3d(64, 128, 3, padding=1), 4),
    "loha": lambda: LoHaConv3d.from_conv(nn.Conv3d(64, 128, 3, padding=1), 4),
    "lokr": lambda: LoKrConv3d.from_conv(nn.Conv3d(64, 128, 3, padding=1), 4),
    "quanta": lambda: QuanTALinear.from_linear(nn.Linear(128, 256), 4),
}


def saved_bytes_beyond_owned(layer, x):
    """Bytes autograd keeps for backward, except the input and the layer's own tensors."""
    backend = tenvoo_fast.dispatch.resolve(layer, x)
    return saved_bytes(lambda: layer(x), owned_tensors(layer, x, backend))


@pytest.mark.parametrize("name", list(LAYERS))
def test_torch_backend_keeps_only_its_small_intermediates(name, seeded):
    """The torch kernels keep the contraction's small results for backward (so backward does
    not redo them): at most the program's keep limit (10% of the weight, or 131072 numbers
    for a small layer)."""
    layer = LAYERS[name]()
    x = (torch.randn(1, 64, 6, 6, 4) if "quanta" not in name else torch.randn(8, 128))
    x.requires_grad_()
    weight_bytes = layer.weight.numel() * 4
    with use_backend("torch"):
        assert saved_bytes_beyond_owned(layer, x) <= max(
            program.KEEP_FRACTION * weight_bytes, program.KEEP_ELEMENTS * 4)
        assert program.KEEP_FRACTION <= 0.1 and program.KEEP_ELEMENTS <= 1 << 17
    with use_backend("reference"):  # the published algorithm keeps at least a weight's worth
        assert saved_bytes_beyond_owned(layer, x) >= weight_bytes


@pytest.mark.parametrize("make", [
    lambda: TenVOOConv3d.from_conv(nn.Conv3d(8, 8, 3, padding=1), 2, "Q"),
    lambda: TenVOOConv3d.from_conv(nn.Conv3d(8, 6, 3, padding=1, stride=2), 3, "L"),
    lambda: QuanTALinear.from_linear(nn.Linear(8, 12), 2),
    lambda: QuanTALinear.from_linear(nn.Linear(8, 8), 2, name="factorized"),
])
def test_torch_compile_fullgraph_matches_eager(make, seeded):
    layer = make()
    with torch.no_grad():
        for p in layer.cores:
            p.add_(0.1 * torch.randn_like(p))
    layer.bias.requires_grad_(True)
    x = (torch.randn(2, 8, 4, 4, 4) if isinstance(layer, nn.Conv3d) else torch.randn(3, 8))
    x.requires_grad_()
    params = list(layer.cores) + [layer.bias]

    def run(fn):
        for p in params:
            p.grad = None
        x.grad = None
        y = fn(x)
        y.square().sum().backward()
        return [y.detach(), x.grad.clone()] + [p.grad.clone() for p in params]

    strategy = "factorized" if layer.adapter_name == "factorized" else "merged"
    with use_backend("torch"), use_strategy(strategy):
        eager = run(layer)
        torch._dynamo.reset()
        compiled = run(torch.compile(layer, fullgraph=True, backend="aot_eager"))
    for a, b in zip(compiled, eager):
        assert rel_err(a, b) < 1e-6


def test_auto_prefers_torch_and_reference_stays_selectable():
    layer = TenVOOConv3d.from_conv(nn.Conv3d(4, 4, 3), 2)
    x = torch.randn(1, 4, 3, 3, 3)
    assert tenvoo_fast.dispatch.resolve(layer, x).name == "torch"
    with use_backend("reference"):
        assert tenvoo_fast.dispatch.resolve(layer, x).name == "reference"
    # Linear on the CPU: the reference measured as fast or faster on every DDPM shape.
    lin = QuanTALinear.from_linear(nn.Linear(8, 8), 2)
    assert tenvoo_fast.dispatch.resolve(lin, torch.randn(2, 8)).name == "reference"


def test_the_old_backend_name_recompute_still_selects_torch():
    layer = TenVOOConv3d.from_conv(nn.Conv3d(4, 4, 3), 2)
    with use_backend("recompute"):
        assert tenvoo_fast.current_backend() == "torch"
        layer(torch.randn(1, 4, 3, 3, 3))
    assert layer.execution_backend == "torch"


def test_strategy_choice_follows_the_cost_model_and_refuses_what_a_layer_cannot_run():
    lin = QuanTALinear.from_linear(nn.Linear(512, 512), 12, name="blk.attn.to_q")
    assert linear_strategy(lin, 1) == "factorized"     # no build, no dL/dW GEMM
    assert linear_strategy(lin, 4096) == "merged"      # the activation path costs more per row
    with use_strategy("merged"):
        assert linear_strategy(lin, 1) == "merged"
    lora = tenvoo_fast.LoRALinear.from_linear(nn.Linear(8, 8), 2, name="blk.lora")
    with use_backend("torch"), use_strategy("factorized"):
        with pytest.raises(tenvoo_fast.AdapterError, match=r"blk\.lora.*'factorized' is not implemented for lora.*'merged'"):
            lora(torch.randn(2, 8))
    with pytest.raises(tenvoo_fast.AdapterError, match="unknown strategy 'fast'"):
        with use_strategy("fast"):
            pass


def test_factorized_keeps_nothing_weight_sized(seeded):
    lin = QuanTALinear.from_linear(nn.Linear(128, 256), 4)
    x = torch.randn(8, 128, requires_grad=True)
    with use_backend("torch"), use_strategy("factorized"):
        assert saved_bytes_beyond_owned(lin, x) == 0


def test_string_padding_falls_back_under_auto_and_refuses_explicitly():
    layer = TenVOOConv3d.from_conv(nn.Conv3d(4, 4, 3, padding="same"), 2, name="s.conv")
    x = torch.randn(1, 4, 5, 5, 5)
    assert tenvoo_fast.dispatch.resolve(layer, x).name == "reference"
    with use_backend("torch"):
        with pytest.raises(tenvoo_fast.AdapterError, match=r"s\.conv.*torch.*padding"):
            layer(x)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_opcheck_every_op(impl, seeded):
    """torch.library.opcheck: schemas, fake kernels (shapes and strides), autograd registration.
    The registration and tracing checks (autograd, AOT dispatch) do not depend on ``impl`` and
    run for the fast ones; the Triton interpreter (slow) runs what does: the schema's aliasing
    and the real kernels' outputs against the fake kernels'."""
    if impl == "triton":
        def opcheck(op, args):
            torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    else:
        opcheck = torch.library.opcheck
    net = NETWORKS["tenvoo-q"]()
    cores = [torch.randn(c.contraction_shape, requires_grad=True) for c in net.cores]
    shape = list(net.weight_shape)
    opcheck(torch.ops.tenvoo_fast.build_delta.default,
                          ([c.detach() for c in cores], net.equation, shape, net.scale, impl))
    opcheck(torch.ops.tenvoo_fast.weight_grad_to_cores.default,
                          (torch.randn(shape), [c.detach() for c in cores], net.equation, shape,
                           net.scale, impl))
    base, frozen = torch.randn(shape) * 0.02, [torch.randn(shape)]
    conv = [1, 1, 1, 1, 0, 1, 1, 1, 1]
    bias = torch.randn(shape[0], requires_grad=True)
    for layout, keep in ((torch.contiguous_format, False), (torch.channels_last_3d, False),
                         (torch.contiguous_format, True)):
        x = torch.randn(1, shape[1], 4, 3, 4).contiguous(memory_format=layout).requires_grad_()
        opcheck(torch.ops.tenvoo_fast.merged_conv3d.default,
                              (x, base, cores, frozen, bias, net.equation, net.scale, conv, impl,
                               keep))
        _, saved, weight = torch.ops.tenvoo_fast.merged_conv3d(
            x.detach(), base, [c.detach() for c in cores], frozen, bias.detach(), net.equation,
            net.scale, conv, impl, keep)
        assert weight.numel() == (base.numel() if keep else 0)
        opcheck(torch.ops.tenvoo_fast.merged_conv3d_backward.default,
                              (torch.randn(1, shape[0], 4, 2, 4), x.detach(), base,
                               [c.detach() for c in cores], frozen, bias.detach(), saved, weight,
                               True, True, net.equation, net.scale, conv, impl, keep))
    qnet = NETWORKS["quanta-rank"]()
    qcores = [torch.randn(c.contraction_shape, requires_grad=True) for c in qnet.cores]
    qshape = list(qnet.weight_shape)
    opcheck(torch.ops.tenvoo_fast.merged_linear.default,
                          (torch.randn(2, 3, qshape[1], requires_grad=True),
                           torch.randn(qshape) * 0.02, qcores, [], None, qnet.equation,
                           qnet.scale, impl, False))
    eq = methods.QUANTA_ACTIVATION_EQUATION
    xq = torch.randn(2, 3, qshape[1], requires_grad=True)
    frozen = [c.detach() + 0.1 for c in qcores]
    opcheck(torch.ops.tenvoo_fast.factorized_linear.default,
                          (xq, torch.randn(qshape) * 0.02, qcores, frozen, bias[:qshape[0]].detach()
                           .requires_grad_(), eq, qnet.scale))
    opcheck(torch.ops.tenvoo_fast.factorized_linear_backward.default,
                          (torch.randn(2, 3, qshape[0]), xq.detach(), torch.randn(qshape) * 0.02,
                           [c.detach() for c in qcores], frozen, None, True, False, eq,
                           qnet.scale))


def test_fake_kernels_refuse_bad_arguments():
    """The fake kernels validate (torch._check) what the real ones would trip over later."""
    net = NETWORKS["tenvoo-l"]()
    meta = dict(device="meta")
    cores = [torch.empty(c.contraction_shape, **meta) for c in net.cores]
    cout, cin, *taps = net.weight_shape
    base = torch.empty(net.weight_shape, **meta)
    with pytest.raises(RuntimeError, match=f"input has {cin + 1} channels"):
        torch.ops.tenvoo_fast.merged_conv3d(torch.empty(1, cin + 1, 4, 4, 4, **meta), base,
                                            cores, [], None, net.equation, 1.0, [1] * 9, "torch",
                                            False)
    with pytest.raises(RuntimeError, match="9 ints"):
        torch.ops.tenvoo_fast.merged_conv3d(torch.empty(1, cin, 4, 4, 4, **meta), base, cores,
                                            [], None, net.equation, 1.0, [1, 1, 1], "torch", False)
    with pytest.raises(RuntimeError, match="frozen tensors"):
        torch.ops.tenvoo_fast.merged_conv3d(torch.empty(1, cin, 4, 4, 4, **meta), base, cores,
                                            [base, base], None, net.equation, 1.0, [1] * 9,
                                            "torch", False)


def test_torch_compile_inductor(seeded):
    """Inductor checks the real kernels' output strides against the fake kernels'."""
    layer = TenVOOConv3d.from_conv(nn.Conv3d(4, 4, 3, padding=1), 2, "Q")
    x = torch.randn(1, 4, 3, 3, 3, requires_grad=True)
    with use_backend("torch"):
        y_ref = layer(x)
        g_ref = torch.autograd.grad(y_ref.sum(), [x, *layer.cores])
        torch._dynamo.reset()
        y = torch.compile(layer, fullgraph=True)(x)
        g = torch.autograd.grad(y.sum(), [x, *layer.cores])
    assert rel_err(y, y_ref) < 1e-6
    for a, b in zip(g, g_ref):
        assert rel_err(a, b) < 1e-6
