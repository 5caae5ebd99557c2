"""The merged layer as one C++ autograd function (``csrc/merged_layer.cpp``): the same bits as
the Python ``torch`` op it replaces on the CPU, for every method, shape, dtype and geometry,
and it runs only where dispatch says (never under a launch counter or ``torch.compile``)."""
import pytest
import torch
from torch import nn

from tenvoo_fast import use_backend, use_strategy, use_weight_policy
from tenvoo_fast.contraction import native_runner
from tenvoo_fast.kernels import native_layer
from tenvoo_fast.measure.launches import LaunchCounter
from tests.ddpm_shapes import DDPM_CONV_SHAPES, DDPM_LINEAR_SHAPES
from tests.layer_checks import CONV_MAKERS, LINEAR_MAKERS, train_a_little

pytestmark = pytest.mark.skipif(not native_layer.available(),
                                reason="the C++ extension tenvoo_fast._C was not built")


class _Disabled:
    """The Python op instead of the C++ function (as where the extension is not built)."""

    def __enter__(self):
        self.saved, native_layer._RUN = native_layer._RUN, None

    def __exit__(self, *exc):
        native_layer._RUN = self.saved


class _Calls:
    """Counts the C++ function's calls (proof that a case ran it)."""

    def __enter__(self):
        self.n, self.saved = 0, native_layer._RUN

        def run(*args):
            self.n += 1
            return self.saved(*args)
        native_layer._RUN = run
        return self

    def __exit__(self, *exc):
        native_layer._RUN = self.saved


def _step(layer, x, autocast=False, policy="recompute", x_grad=True, channels_last=False):
    for p in layer.parameters():
        p.grad = None
    x = x.detach().clone()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    x.requires_grad_(x_grad)
    with use_backend("torch"), use_strategy("merged"), use_weight_policy(policy), \
            torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        y = layer(x)
    gy = torch.linspace(-1, 1, y.numel()).view(y.shape)
    (y.float() * gy).sum().backward()
    return [y, x.grad] + [p.grad for p in layer.parameters() if p.requires_grad]


def _same_bits(layer, x, **kw):
    with _Calls() as calls:
        native = _step(layer, x, **kw)
    assert calls.n == 1
    with _Disabled():
        python = _step(layer, x, **kw)
    for i, (a, b) in enumerate(zip(native, python)):
        assert (a is None) == (b is None), i
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), i
            assert a.stride() == b.stride(), i


# A sample of the DDPM's conv shapes (the widest run long on two cores) and some odd ones.
CONV_SHAPES = DDPM_CONV_SHAPES[:6] + [(192, 128), (256, 512), (3, 5), (7, 1), (1, 16)]


@pytest.mark.parametrize("method", ["tenvoo-l", "tenvoo-q"])
@pytest.mark.parametrize("cin,cout", CONV_SHAPES)
def test_the_ddpm_convs_give_the_python_ops_bits(method, cin, cout):
    torch.manual_seed(cin * 1000 + cout)
    layer = train_a_little(CONV_MAKERS[method](nn.Conv3d(cin, cout, 3, padding=1), 4))
    _same_bits(layer, torch.randn(1, cin, 3, 2, 3))


@pytest.mark.parametrize("method", ["tenvoo-l", "tenvoo-q", "lora", "loha", "lokr"])
@pytest.mark.parametrize("dtype,autocast", [(torch.float32, False), (torch.float64, False),
                                            (torch.float32, True)])
def test_every_method_and_dtype_gives_the_python_ops_bits(method, dtype, autocast):
    torch.manual_seed(1)
    layer = train_a_little(CONV_MAKERS[method](nn.Conv3d(12, 20, 3, padding=1), 3)).to(dtype)
    _same_bits(layer, torch.randn(2, 12, 4, 3, 5, dtype=dtype), autocast=autocast)


@pytest.mark.parametrize("options", [
    dict(stride=2, padding=1), dict(stride=(1, 2, 1), padding=(0, 1, 2), dilation=(2, 1, 1)),
    dict(padding=1, bias=False), dict(padding=1, padding_mode="replicate")])
@pytest.mark.parametrize("policy", ["recompute", "keep"])
def test_conv_geometry_bias_and_policy(options, policy):
    torch.manual_seed(2)
    layer = train_a_little(CONV_MAKERS["tenvoo-l"](nn.Conv3d(8, 16, 3, **options), 4))
    _same_bits(layer, torch.randn(2, 8, 5, 6, 5), policy=policy)


@pytest.mark.parametrize("x_grad,channels_last", [(False, False), (True, True)])
def test_an_input_without_gradient_and_a_channels_last_input(x_grad, channels_last):
    torch.manual_seed(3)
    layer = train_a_little(CONV_MAKERS["tenvoo-q"](nn.Conv3d(16, 8, 3, padding=1), 4))
    _same_bits(layer, torch.randn(2, 16, 3, 4, 3), x_grad=x_grad, channels_last=channels_last)


@pytest.mark.parametrize("fin,fout", DDPM_LINEAR_SHAPES[:3] + [(5, 3)])
@pytest.mark.parametrize("autocast", [False, True])
def test_quanta_linears_give_the_python_ops_bits(fin, fout, autocast):
    torch.manual_seed(fin + fout)
    layer = train_a_little(LINEAR_MAKERS["quanta"](nn.Linear(fin, fout), 4))
    _same_bits(layer, torch.randn(3, 5, fin), autocast=autocast)


def test_a_frozen_copy_reproduces_the_base_layer_exactly_at_initialisation():
    torch.manual_seed(4)
    conv = nn.Conv3d(16, 32, 3, padding=1)
    layer = CONV_MAKERS["tenvoo-l"](conv, 4)
    x = torch.randn(1, 16, 4, 4, 4)
    with _Calls() as calls, use_backend("torch"), use_strategy("merged"):
        y = layer(x)
    assert calls.n == 1 and torch.equal(y, conv(x))


def test_it_does_not_run_where_dispatch_says_no():
    """Watched (a launch counter: the portable op's calls are what a GPU makes), with the
    C++ loops off, or on another backend: the Python op runs."""
    torch.manual_seed(5)
    layer = CONV_MAKERS["tenvoo-l"](nn.Conv3d(8, 8, 3, padding=1), 4)
    x = torch.randn(1, 8, 3, 3, 3, requires_grad=True)
    with _Calls() as calls, use_backend("torch"), use_strategy("merged"):
        with LaunchCounter():
            layer(x).sum().backward()
        loops, native_runner.LOOPS = native_runner.LOOPS, False
        try:
            layer(x).sum().backward()
        finally:
            native_runner.LOOPS = loops
        with use_backend("reference"):
            layer(x).sum().backward()
        assert calls.n == 0
        layer(x).sum().backward()
        assert calls.n == 1


def test_a_backward_watched_on_its_own_issues_the_programs_calls():
    """The watch is asked at each call (not at forward time): a launch counter around the
    backward alone sees the program's matmuls, as it would see the Python op's."""
    torch.manual_seed(8)
    layer = CONV_MAKERS["tenvoo-l"](nn.Conv3d(8, 8, 3, padding=1), 4)
    x = torch.randn(1, 8, 3, 3, 3, requires_grad=True)

    def backward_bmms():
        with use_backend("torch"), use_strategy("merged"):
            y = layer(x)
        with LaunchCounter() as counter:
            y.sum().backward()
        return sum(ops.get("bmm", 0) for ops in counter.by_op.values())
    with _Calls() as calls:
        native = backward_bmms()
    assert calls.n == 1
    with _Disabled():
        python = backward_bmms()
    assert native == python > 10


def test_a_plan_is_checked():
    plan = native_layer._C.MergedPlan()
    plan.width = 3
    with pytest.raises(RuntimeError, match="place tables must name all 3 tensor ids"):
        plan.check()
    net = CONV_MAKERS["tenvoo-l"](nn.Conv3d(8, 8, 3, padding=1), 4).network
    good = native_layer.plan_for(net.equation, net.contraction_shapes, net.scale,
                                 (1, 1, 1, 1, 1, 1, 1, 1, 1))
    bad = native_layer._C.MergedPlan()
    for field in ("n_cores", "core_shapes", "sum_axes", "width", "fwd_kind", "fwd_offset",
                  "bwd_kind", "bwd_offset", "left", "right", "gemm", "direct", "unpack_index",
                  "grad_t"):
        setattr(bad, field, getattr(good, field))
    bad.check()
    kinds = list(good.fwd_kind)
    kinds[-1] = good.n_cores + 3            # dL/dT is no forward place
    bad.fwd_kind = kinds
    with pytest.raises(RuntimeError, match="bad place of tensor id"):
        bad.check()
    bad.fwd_kind, bad.grad_t = good.fwd_kind, good.width
    with pytest.raises(RuntimeError, match="out of range"):
        bad.check()


def test_wrong_core_count_is_refused():
    torch.manual_seed(6)
    layer = CONV_MAKERS["tenvoo-l"](nn.Conv3d(8, 8, 3, padding=1), 4)
    net = layer.network
    plan = native_layer.plan_for(net.equation, net.contraction_shapes, net.scale,
                                 (1, 1, 1, 1, 1, 1, 1, 1, 1))
    with pytest.raises(RuntimeError, match="cores for a plan of"):
        native_layer._RUN(plan, torch.randn(1, 8, 3, 3, 3), layer.weight, None, layer.bias,
                          False, layer.core_list()[:-1])


def test_gradcheck_in_double():
    """Autograd through the C++ function against finite differences (fp64)."""
    torch.manual_seed(7)
    layer = train_a_little(CONV_MAKERS["tenvoo-l"](nn.Conv3d(3, 4, 3, padding=1), 2)).double()
    cores = layer.core_list()
    x = torch.randn(1, 3, 2, 3, 2, dtype=torch.float64, requires_grad=True)

    def f(x, bias, *cs):
        return native_layer.merged(layer.network, x, layer.weight, cs, None, bias,
                                   (1, 1, 1, 1, 1, 1, 1, 1, 1), False)
    inputs = (x, layer.bias.detach().clone().requires_grad_(),
              *[c.detach().clone().requires_grad_() for c in cores])
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)
