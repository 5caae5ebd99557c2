"""Adapted layers: forward and gradients against an fp64 oracle, numerics, drop-in behaviour."""
import pytest
import torch
from torch import nn
from torch.func import functional_call

from tests.ddpm_shapes import DDPM_CONV_SHAPES, DDPM_LINEAR_SHAPES
from tests.layer_checks import (CONV_MAKERS, LINEAR_MAKERS, TOL, check_against_oracle, realistic_conv,
                          train_a_little)
from tests.oracle import rel_err, spec_delta
from tenvoo_fast import (AdapterError, LoRAConv3d, QuanTALinear, TenVOOConv3d, use_backend,
                         use_strategy)

@pytest.fixture(params=["reference", "torch", "cpu"])
def backend(request):
    """Every execution backend must match the same oracle; the fast ones with their merged
    strategy here (so that their kernels run whatever the shape), the factorized one in
    test_factorized.py."""
    with use_backend(request.param), use_strategy("merged"):
        yield request.param


LINEAR_BACKENDS = ["reference", "torch/merged", "torch/factorized", "cpu/merged"]
#: (method, backend) for adapted Linear layers: every backend, and each execution strategy of
#: the fast one ('factorized' applies QuanTA to the activations; the other methods have no such
#: form, so those pairs are not generated).
LINEAR_CASES = [(m, b) for m in LINEAR_MAKERS for b in LINEAR_BACKENDS
                if not (b.endswith("/factorized") and m != "quanta")]
linear_cases = pytest.mark.parametrize("method, linear_backend", LINEAR_CASES,
                                       indirect=["linear_backend"])


@pytest.fixture
def linear_backend(request):
    """Runs the test under the backend (and strategy) named by its parameter."""
    name, _, strategy = request.param.partition("/")
    with use_backend(name), use_strategy(strategy or "auto"):
        yield request.param




@pytest.mark.parametrize("cin,cout", DDPM_CONV_SHAPES)
@pytest.mark.parametrize("method", ["tenvoo-l", "tenvoo-q"])
def test_tenvoo_forward_and_grads_ddpm_shapes(cin, cout, method, seeded, backend):
    layer = train_a_little(CONV_MAKERS[method](realistic_conv(cin, cout), 4))
    x = torch.randn(1, cin, 3, 3, 2)
    check_against_oracle(layer, x, "conv", TOL[torch.float32])


@pytest.mark.parametrize("method", list(CONV_MAKERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_conv_methods_forward_and_grads_all_dtypes(method, dtype, seeded, backend):
    layer = train_a_little(CONV_MAKERS[method](realistic_conv(12, 10, (3, 1, 3), dtype), 3))
    x = torch.randn(2, 12, 4, 3, 5, dtype=dtype)
    check_against_oracle(layer, x, "conv", TOL[dtype])


@pytest.mark.parametrize("fin,fout", DDPM_LINEAR_SHAPES)
@linear_cases
def test_linear_forward_and_grads_ddpm_shapes(fin, fout, method, seeded, linear_backend):
    lin = nn.Linear(fin, fout)
    layer = train_a_little(LINEAR_MAKERS[method](lin, 4))
    check_against_oracle(layer, torch.randn(3, fin), "linear", TOL[torch.float32])


@linear_cases
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_linear_dtypes(method, dtype, seeded, linear_backend):
    layer = train_a_little(LINEAR_MAKERS[method](nn.Linear(24, 12, dtype=dtype), 3))
    check_against_oracle(layer, torch.randn(2, 5, 24, dtype=dtype), "linear", TOL[dtype])


def test_strided_dilated_padded_conv(seeded, backend):
    conv = nn.Conv3d(8, 16, 3, stride=(2, 1, 2), padding=(2, 1, 0), dilation=(2, 1, 1))
    layer = train_a_little(TenVOOConv3d.from_conv(conv, 3, "Q"))
    check_against_oracle(layer, torch.randn(1, 8, 7, 6, 5), "conv", TOL[torch.float32])


def test_padding_mode_is_respected(seeded, backend):
    conv = nn.Conv3d(4, 4, 3, padding=1, padding_mode="replicate")
    layer = TenVOOConv3d.from_conv(conv, 2, "L")
    x = torch.randn(1, 4, 4, 4, 4)
    assert torch.equal(layer(x), conv(x))


@pytest.mark.parametrize("method", list(CONV_MAKERS))
def test_conv_identical_to_base_at_init(method, seeded, backend):
    conv = realistic_conv(32, 64)
    layer = CONV_MAKERS[method](conv, 4)
    x = torch.randn(1, 32, 5, 4, 3)
    assert torch.equal(layer(x), conv(x))


@linear_cases
def test_linear_identical_to_base_at_init(method, seeded, linear_backend):
    lin = nn.Linear(128, 32)
    layer = LINEAR_MAKERS[method](lin, 4)
    x = torch.randn(4, 128)
    assert torch.equal(layer(x), lin(x))


@pytest.mark.parametrize("method", list(CONV_MAKERS))
def test_gradcheck_conv_fp64(method, seeded, backend):
    conv = nn.Conv3d(4, 6, 3, padding=1, dtype=torch.float64)
    layer = train_a_little(CONV_MAKERS[method](conv, 2), 0.3)
    names = [f"cores.{i}" for i in range(len(layer.cores))]
    x = torch.randn(1, 4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    cores = [p.detach().clone().requires_grad_() for p in layer.cores]

    def f(x, *cs):
        return functional_call(layer, dict(zip(names, cs)), (x,))

    assert torch.autograd.gradcheck(f, (x, *cores), eps=1e-6, atol=1e-6, rtol=1e-5)


@linear_cases
def test_gradcheck_linear_fp64(method, seeded, linear_backend):
    layer = train_a_little(LINEAR_MAKERS[method](nn.Linear(8, 6, dtype=torch.float64), 2), 0.3)
    names = [f"cores.{i}" for i in range(len(layer.cores))]
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    cores = [p.detach().clone().requires_grad_() for p in layer.cores]

    def f(x, *cs):
        return functional_call(layer, dict(zip(names, cs)), (x,))

    assert torch.autograd.gradcheck(f, (x, *cores), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("variant", ["L", "Q"])
def test_bf16_autocast_keeps_contraction_and_fold_in_fp32(variant, seeded, backend):
    """Under bf16 autocast, ΔW and W - T(θ0) + T(θ) are fp32-accurate, the conv runs in bf16."""
    conv = realistic_conv(64, 32)
    layer = train_a_little(TenVOOConv3d.from_conv(conv, 4, variant))
    exact = conv.weight.double() - spec_delta(layer, list(layer.frozen_cores)) + spec_delta(layer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = layer.delta_weight()
        w = layer.effective_weight()
        y = layer(torch.randn(1, 64, 4, 4, 4))
    assert d.dtype == torch.float32 and w.dtype == torch.float32
    assert rel_err(d, spec_delta(layer)) < 1e-5
    # The effective weight is a small difference of two large tensors (|T| ~ 1, |W| ~ 0.02):
    # fp32 keeps it to ~1e-5 of W; a bf16 contraction or fold would be off by ~1e-1.
    assert rel_err(w, exact) < 1e-4
    naive_bf16 = (conv.weight.bfloat16() - spec_delta(layer, list(layer.frozen_cores)).bfloat16()
                  + spec_delta(layer).bfloat16())
    assert rel_err(naive_bf16, exact) > 100 * rel_err(w, exact)
    assert y.dtype == torch.bfloat16


def test_bf16_model_forms_weight_in_fp32(seeded):
    """A bf16 model: cores stay fp32 masters; the cast to bf16 happens once, at the end."""
    conv = realistic_conv(32, 32, dtype=torch.bfloat16)
    layer = train_a_little(TenVOOConv3d.from_conv(conv, 4, "L"))
    assert all(p.dtype == torch.float32 for p in layer.cores)
    exact = conv.weight.double() - spec_delta(layer, list(layer.frozen_cores)) + spec_delta(layer)
    assert rel_err(layer.effective_weight(), exact) < 1e-4
    assert rel_err(layer.merged_weight(), exact) < 1e-2  # one bf16 rounding


def test_monai_metatensor_input(seeded, backend):
    from monai.data import MetaTensor
    conv = realistic_conv(8, 8)
    layer = train_a_little(TenVOOConv3d.from_conv(conv, 2, "Q"))
    x = torch.randn(1, 8, 4, 4, 4)
    y_meta = layer(MetaTensor(x, meta={"filename_or_obj": "a.nii"}))
    assert torch.equal(torch.as_tensor(y_meta), layer(x))
    lin = QuanTALinear.from_linear(nn.Linear(16, 16), 2)
    v = torch.randn(2, 16)
    assert torch.equal(torch.as_tensor(lin(MetaTensor(v))), lin(v))


def test_lora_bypass_equals_merged(seeded):
    conv = realistic_conv(16, 24)
    merged = train_a_little(LoRAConv3d.from_conv(conv, 4, alpha=2.0), 0.5)
    bypass = LoRAConv3d.from_conv(nn.Conv3d(16, 24, 3, padding=1), 4, alpha=2.0, mode="bypass")
    bypass.load_state_dict(merged.state_dict())
    x = torch.randn(1, 16, 5, 5, 5)
    assert rel_err(bypass(x), merged(x)) < 1e-5


def test_drop_in_attributes_and_state_dict_keys(seeded):
    conv = realistic_conv(32, 64)
    layer = TenVOOConv3d.from_conv(conv, 4, "L")
    assert isinstance(layer, nn.Conv3d)
    assert layer.weight is conv.weight and layer.bias is conv.bias
    assert not layer.weight.requires_grad
    assert (layer.in_channels, layer.out_channels, layer.kernel_size) == (32, 64, (3, 3, 3))
    keys = set(layer.state_dict())
    assert {"weight", "bias", "cores.0", "cores.9", "frozen_cores.0", "frozen_cores.9"} <= keys


def test_frozen_cache_follows_loaded_frozen_cores(seeded):
    layer = TenVOOConv3d.from_conv(realistic_conv(8, 8), 2, "L")
    x = torch.randn(1, 8, 3, 3, 3)
    layer(x)
    with torch.no_grad():
        layer.frozen_cores[0].mul_(0.5)  # as load_adapter's copy_ would
    exact = (layer.weight.double() - spec_delta(layer, list(layer.frozen_cores))
             + spec_delta(layer))
    assert rel_err(layer.effective_weight(), exact) < 1e-5


def test_input_dtype_and_device_mismatch_are_clear(seeded):
    layer = TenVOOConv3d.from_conv(nn.Conv3d(4, 4, 3), 2, "L", name="down.0.conv1")
    with pytest.raises(AdapterError, match=r"down\.0\.conv1.*dtype.*float64.*float32"):
        layer(torch.randn(1, 4, 3, 3, 3, dtype=torch.float64))
    with pytest.raises(AdapterError, match=r"down\.0\.conv1.*meta.*cpu"):
        layer(torch.empty(1, 4, 3, 3, 3, device="meta"))


def test_grouped_conv_and_wrong_types_refused():
    with pytest.raises(AdapterError, match="groups=2"):
        TenVOOConv3d.from_conv(nn.Conv3d(4, 4, 3, groups=2), 2, name="g")
    with pytest.raises(AdapterError, match="nn.Conv3d.*Conv2d"):
        TenVOOConv3d.from_conv(nn.Conv2d(4, 4, 3), 2)
    with pytest.raises(AdapterError, match="nn.Linear.*Conv3d"):
        QuanTALinear.from_linear(nn.Conv3d(4, 4, 3), 2)
    layer = TenVOOConv3d.from_conv(nn.Conv3d(4, 4, 3), 2)
    with pytest.raises(AdapterError, match="already adapted"):
        TenVOOConv3d.from_conv(layer, 2)


def test_factorisation_mismatch_names_layer():
    with pytest.raises(AdapterError, match=r"blk\.conv.*input.*\[2, 2, 2\].*8.*12"):
        TenVOOConv3d.from_conv(nn.Conv3d(12, 8, 3), 2, factors=((2, 2, 2), (2, 2, 2)),
                               name="blk.conv")


@pytest.mark.parametrize("rank", [1, 3, 5, 7])
def test_odd_ranks_work(rank, seeded, backend):
    layer = train_a_little(TenVOOConv3d.from_conv(realistic_conv(16, 8), rank, "L"))
    check_against_oracle(layer, torch.randn(1, 16, 3, 3, 3), "conv", TOL[torch.float32])


def test_backend_selection():
    import tenvoo_fast
    assert "reference" in tenvoo_fast.available_backends()
    with use_backend("reference"):
        assert tenvoo_fast.current_backend() == "reference"
    assert tenvoo_fast.current_backend() == "auto"
    with pytest.raises(AdapterError, match="unknown backend 'nope'"):
        tenvoo_fast.set_backend("nope")
    assert "triton" in tenvoo_fast.dispatch.backends.registered_backends()


def test_triton_backend_says_why_it_cannot_run(monkeypatch):
    import tenvoo_fast
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: triton can run")
    with pytest.raises(AdapterError, match="backend 'triton' cannot run here: no CUDA GPU"):
        tenvoo_fast.set_backend("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    layer = TenVOOConv3d.from_conv(nn.Conv3d(4, 4, 3, padding=1), 2, "L").double()
    with use_backend("triton"), pytest.raises(AdapterError, match="fp64"):
        layer(torch.randn(1, 4, 3, 3, 3, dtype=torch.float64))
    with use_backend("auto"):  # never the interpreter under auto
        assert tenvoo_fast.dispatch.resolve(layer.float(), torch.randn(1, 4, 3, 3, 3)).name != "triton"


@pytest.mark.parametrize("kind, path", [
    (kind, path) for kind in ("conv", "linear")
    for path in ("torch/merged", "torch/factorized", "cpu/merged", "triton/merged",
                 "triton/factorized", "triton/implicit-gemm")
    if not (kind == "linear" and path.endswith("implicit-gemm"))])  # a Conv3d strategy
def test_only_the_cores_need_gradients(path, kind, seeded):
    """A frozen bias and an input without grad (the first adapted layer of a model whose biases
    are frozen, the default): each backward op returns two unneeded gradients, which must be
    distinct empty tensors (torch.library refuses outputs that alias)."""
    name, _, strategy = path.partition("/")
    if name == "triton" and torch.cuda.is_available():
        pytest.skip("interpreter check (tests/kernels/test_cuda.py covers the GPU)")
    if kind == "conv":
        layer = TenVOOConv3d.from_conv(nn.Conv3d(6, 8, 3, padding=1), 2, "L")
        x = torch.randn(1, 6, 3, 3, 2)
    else:
        layer = QuanTALinear.from_linear(nn.Linear(8, 8), 2)
        x = torch.randn(3, 8)
    train_a_little(layer)
    layer.bias.requires_grad_(False)
    with use_backend(name), use_strategy(strategy):
        layer(x).sum().backward()
    assert all(c.grad is not None and c.grad.abs().sum() > 0 for c in layer.cores)
