"""Strategy 'implicit-gemm' (the Triton conv that generates its weight tiles from the cores):
equal to the fp64 oracle in forward, input gradient and every core gradient, exact at
initialisation, nothing weight-sized kept, traceable, and refused with a reason where the
network or the backend cannot run it. Off a GPU the kernels run in Triton's interpreter on tiny
shapes (tests/kernels/test_cuda.py runs them on the GPU)."""
import pytest
import torch
from torch import nn

from tests.ddpm_shapes import DDPM_CONV_SHAPES
from tests.oracle import rel_err
from tests.layer_checks import (TOL, check_against_oracle, check_compiled_matches_eager,
                                cores_op_args, realistic_conv, train_a_little)
import tenvoo_fast
from tenvoo_fast import AdapterError, LoRAConv3d, TenVOOConv3d, methods, use_backend, use_strategy
from tenvoo_fast.methods.channels import default_factors
from tenvoo_fast.contraction.generation import unsupported_reason
from tenvoo_fast.measure import owned_tensors, saved_bytes
from tenvoo_fast.dispatch.strategy import conv_strategy, supported_strategies

interpreted = pytest.mark.skipif(torch.cuda.is_available(),
                                 reason="GPU present: tests/kernels/test_cuda.py covers implicit-gemm")
pytestmark = interpreted

#: The DDPM's conv shapes the interpreter runs in seconds (it is ~1e4x slower than a GPU).
SMALL_DDPM = [s for s in DDPM_CONV_SHAPES if s[0] * s[1] <= 64 * 128]


@pytest.fixture
def implicit(seeded):
    with use_backend("triton"), use_strategy("implicit-gemm"):
        yield


@pytest.mark.usefixtures("implicit")
@pytest.mark.parametrize("cin,cout", SMALL_DDPM)
def test_ddpm_shapes_against_the_oracle(cin, cout):
    layer = train_a_little(TenVOOConv3d.from_conv(realistic_conv(cin, cout), 4, "L"))
    check_against_oracle(layer, torch.randn(1, cin, 3, 3, 2), "conv", TOL[torch.float32])
    assert layer.execution_strategy == "implicit-gemm"


@pytest.mark.usefixtures("implicit")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rank", [1, 3, 5])
def test_ranks_and_dtypes(rank, dtype):
    """Rank 5 has a 25-wide bond: two chunks of the generation's K loop, one masked."""
    layer = train_a_little(TenVOOConv3d.from_conv(realistic_conv(12, 10, (3, 1, 3), dtype),
                                                  rank, "L"))
    check_against_oracle(layer, torch.randn(2, 12, 4, 3, 5, dtype=dtype), "conv", TOL[dtype])


@pytest.mark.usefixtures("implicit")
@pytest.mark.parametrize("conv", [
    dict(stride=(2, 1, 2), padding=(2, 1, 0), dilation=(2, 1, 1)),
    dict(padding=0, stride=2),
    dict(padding=1, stride=2, bias=False),
], ids=["strided-dilated", "stride2", "downsample-no-bias"])
def test_odd_convs(conv):
    layer = train_a_little(TenVOOConv3d.from_conv(nn.Conv3d(8, 16, 3, **conv), 2, "L"))
    check_against_oracle(layer, torch.randn(1, 8, 7, 6, 5), "conv", TOL[torch.float32])


@pytest.mark.usefixtures("implicit")
def test_channels_last_input_and_zero_last_init():
    layer = train_a_little(TenVOOConv3d.from_conv(realistic_conv(16, 8), 2, "L",
                                                  init="zero-last"))
    assert layer.frozen_cores is None
    x = torch.randn(2, 16, 4, 3, 5).to(memory_format=torch.channels_last_3d)
    check_against_oracle(layer, x, "conv", TOL[torch.float32])


@pytest.mark.usefixtures("implicit")
@pytest.mark.parametrize("rank", [2, 4])
def test_tenvoo_q(rank):
    """Q's channel-split last step has an r³ bond (rank 4: 64, four K chunks)."""
    layer = train_a_little(TenVOOConv3d.from_conv(realistic_conv(16, 8), rank, "Q"))
    check_against_oracle(layer, torch.randn(1, 16, 3, 2, 2), "conv", TOL[torch.float32])


@pytest.mark.usefixtures("implicit")
def test_the_weight_is_exactly_the_base_at_init():
    """A one-hot input reads single weights out of the conv (no sums of non-zeros), so the
    outputs equal the frozen conv's bit for bit iff the generated weight is exactly W."""
    conv = realistic_conv(8, 12)
    layer = TenVOOConv3d.from_conv(conv, 3, "L")
    x = torch.zeros(8, 8, 3, 3, 3)
    x[torch.arange(8), torch.arange(8), 1, 1, 1] = 1.0
    assert torch.equal(layer(x), conv(x))
    train_a_little(layer)
    assert not torch.equal(layer(x), conv(x))


@pytest.mark.usefixtures("implicit")
def test_keeps_nothing_weight_sized():
    layer = TenVOOConv3d.from_conv(nn.Conv3d(16, 32, 3, padding=1), 4, "L")
    x = torch.randn(1, 16, 3, 3, 2, requires_grad=True)
    backend = tenvoo_fast.dispatch.resolve(layer, x)
    assert saved_bytes(lambda: layer(x), owned_tensors(layer, x, backend)) == 0


def test_opcheck_and_compile(seeded):
    layer = train_a_little(TenVOOConv3d.from_conv(nn.Conv3d(6, 8, 3, padding=1), 2, "L"))
    x = torch.randn(2, 6, 3, 2, 3, requires_grad=True)
    for inp in (x, x.detach().to(memory_format=torch.channels_last_3d).requires_grad_()):
        torch.library.opcheck(torch.ops.tenvoo_fast.implicit_conv3d.default,
                              cores_op_args(layer, inp, "triton"))
    check_compiled_matches_eager(layer, x, "triton", "implicit-gemm")


def test_refused_with_a_reason():
    lay = TenVOOConv3d.from_conv(nn.Conv3d(8, 8, 3, padding=1), 2, "L", name="blk.l")
    with use_backend("torch"), use_strategy("implicit-gemm"):
        with pytest.raises(AdapterError, match=r"blk\.l.*backend 'triton'"):
            lay(torch.randn(1, 8, 2, 2, 2))
    lora = LoRAConv3d.from_conv(nn.Conv3d(4, 4, 3), 2, name="blk.lora")
    with use_backend("triton"), use_strategy("implicit-gemm"):
        with pytest.raises(AdapterError,
                           match=r"blk\.lora.*'implicit-gemm' is not implemented for lora"):
            lora(torch.randn(1, 4, 3, 3, 3))
    every = [methods.tenvoo(v, default_factors(ci), default_factors(co), (3, 3, 3), r)
             for v in "LQ" for r in (1, 4, 12) for ci, co in DDPM_CONV_SHAPES]
    assert all(unsupported_reason(net) is None for net in every)


@pytest.mark.usefixtures("implicit")
def test_empty_batch():
    layer = TenVOOConv3d.from_conv(nn.Conv3d(8, 8, 3, padding=1), 2, "L")
    x = torch.randn(0, 8, 3, 3, 3, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad.shape == x.shape
    assert all(torch.equal(c.grad, torch.zeros_like(c)) for c in layer.cores)


def test_refused_under_deterministic_algorithms():
    layer = TenVOOConv3d.from_conv(nn.Conv3d(8, 8, 3, padding=1), 2, "L", name="blk.d")
    assert "implicit-gemm" in supported_strategies(layer, "triton")
    torch.use_deterministic_algorithms(True)
    try:
        assert "implicit-gemm" not in supported_strategies(layer, "triton")
        with use_backend("triton"), use_strategy("implicit-gemm"):
            with pytest.raises(AdapterError, match=r"blk\.d.*deterministic"):
                layer(torch.randn(1, 8, 2, 2, 2))
    finally:
        torch.use_deterministic_algorithms(False)


def test_auto_does_not_pick_it_unmeasured():
    layer = TenVOOConv3d.from_conv(nn.Conv3d(512, 512, 3, padding=1), 4, "L")
    assert "implicit-gemm" in supported_strategies(layer, "triton")
    for shape, out in (((1, 512, 4, 4, 3), (4, 4, 3)), ((1, 512, 32, 32, 24), (32, 32, 24))):
        assert conv_strategy(layer, shape, out, "triton") != "implicit-gemm"


@pytest.mark.usefixtures("implicit")
def test_replicate_padding_matches_the_reference_backend():
    layer = train_a_little(TenVOOConv3d.from_conv(
        nn.Conv3d(8, 8, 3, padding=1, padding_mode="replicate"), 2, "L"))
    x = torch.randn(1, 8, 4, 3, 3)
    got = layer(x)
    with use_backend("reference"):
        want = layer(x)
    assert rel_err(got, want) < TOL[torch.float32]
