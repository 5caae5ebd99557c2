"""Strategy 'factorized' for TenVOO Conv3d (V·conv(U·x, K) beside the frozen base conv): equal
to the fp64 oracle, exact at initialisation, nothing weight-sized kept, traceable, and chosen
by the cost model where it is cheaper. Each check runs the pure-torch maps (``torch``) and
the fused Triton ones (``triton``, in Triton's interpreter on tiny shapes off a GPU;
tests/kernels/test_cuda.py runs them on a GPU)."""
import pytest
import torch
from torch import nn

from tests.ddpm_shapes import DDPM_CONV_SHAPES
from tests.oracle import rel_err
from tests.layer_checks import (TOL, check_against_oracle, check_compiled_matches_eager,
                                cores_op_args, oracle_forward_and_grads, realistic_conv,
                                run_layer, train_a_little)
import tenvoo_fast
from tenvoo_fast import (AdapterError, LoRAConv3d, QuanTALinear, TenVOOConv3d, methods,
                         use_backend, use_strategy)
from tenvoo_fast.kernels import torch_activation_maps as activation_maps
from tenvoo_fast.contraction.partition import channel_letters, partition
from tenvoo_fast.measure import owned_tensors, saved_bytes
from tenvoo_fast.dispatch.strategy import conv_strategy


interpreted = pytest.mark.skipif(torch.cuda.is_available(),
                                 reason="GPU present: tests/kernels/test_cuda.py covers the Triton maps")
BACKENDS = ["torch", pytest.param("triton", marks=interpreted)]


@pytest.fixture(params=BACKENDS)
def factorized(request):
    with use_backend(request.param), use_strategy("factorized"):
        yield request.param


@pytest.mark.parametrize("cin,cout", DDPM_CONV_SHAPES)
@pytest.mark.parametrize("variant", ["L", "Q"])
def test_ddpm_shapes_against_the_oracle(cin, cout, variant, seeded, factorized):
    layer = train_a_little(TenVOOConv3d.from_conv(realistic_conv(cin, cout), 4, variant))
    check_against_oracle(layer, torch.randn(1, cin, 3, 3, 2), "conv", TOL[torch.float32])


@pytest.mark.parametrize("variant", ["L", "Q"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_every_dtype(variant, dtype, seeded, factorized):
    layer = train_a_little(TenVOOConv3d.from_conv(realistic_conv(12, 10, (3, 1, 3), dtype), 3,
                                                  variant))
    x = torch.randn(2, 12, 4, 3, 5, dtype=dtype)
    if factorized == "triton" and dtype == torch.float64:
        with pytest.raises(AdapterError, match="fp64"):
            layer(x)
        return
    check_against_oracle(layer, x, "conv", TOL[dtype])


@pytest.mark.parametrize("conv", [
    dict(stride=(2, 1, 2), padding=(2, 1, 0), dilation=(2, 1, 1)),
    dict(padding=0, stride=2),
], ids=["strided-dilated", "stride2"])
@pytest.mark.parametrize("rank", [1, 3])
def test_odd_convs_and_ranks(conv, rank, seeded, factorized):
    layer = train_a_little(TenVOOConv3d.from_conv(nn.Conv3d(8, 16, 3, **conv), rank, "Q"))
    check_against_oracle(layer, torch.randn(1, 8, 7, 6, 5), "conv", TOL[torch.float32])


def test_padding_mode_matches_the_reference_backend(seeded):
    """The oracle pads with zeros; a replicate-padded layer is checked against the reference."""
    layer = train_a_little(TenVOOConv3d.from_conv(
        nn.Conv3d(8, 8, 3, padding=1, padding_mode="replicate", dtype=torch.float64), 2, "L"))
    x = torch.randn(1, 8, 5, 4, 3, dtype=torch.float64)
    with use_backend("reference"):
        want = layer(x)
    with use_backend("torch"), use_strategy("factorized"):
        got = layer(x)
    assert rel_err(got, want) < 1e-12


@pytest.mark.parametrize("variant", ["L", "Q"])
def test_identical_to_the_base_conv_at_init(variant, seeded, factorized):
    conv = realistic_conv(32, 64)
    layer = TenVOOConv3d.from_conv(conv, 4, variant)
    x = torch.randn(1, 32, 5, 4, 3)
    assert torch.equal(layer(x), conv(x))


def near_init(layer, move=1e-3):
    """Cores moved by ``move`` (relative) from θ0: the update is a thousandth of the frozen
    term, so a difference of two large terms would lose three digits."""
    with torch.no_grad():
        for p in layer.cores:
            p.mul_(1 + move * torch.randn_like(p))
    return layer


@pytest.mark.parametrize("cin,cout", [(32, 64), (256, 128)])
@pytest.mark.parametrize("variant", ["L", "Q"])
def test_fp32_error_near_init_within_1_5x_of_merged(cin, cout, variant, seeded, factorized):
    """A(x; θ) - A(x; θ0) is formed telescoped (ΔV·conv(U·x, K) + V0·(conv(U·x, ΔK) +
    conv(ΔU·x, K0)), and likewise for the input gradient), so the fp32 error of the output and
    the input gradient against the fp64 oracle stays within 1.5x of the merged path's (the
    core gradients never involve θ0; the oracle tests bound them). The Triton maps run here in
    the interpreter, on the narrow shape only (the wide one takes minutes there; their
    numerics on every DDPM shape are checked against the oracle above)."""
    if factorized == "triton" and (cin, cout) != (32, 64):
        pytest.skip("the Triton interpreter on 256->128: the torch maps cover the wide shape")
    layer = near_init(TenVOOConv3d.from_conv(realistic_conv(cin, cout), 4, variant))
    x = torch.randn(1, cin, 4, 4, 3)
    gy = torch.randn(layer(x).shape, dtype=torch.float64)
    want = oracle_forward_and_grads(layer, x, gy, "conv")

    def errors():
        y, gx, _ = run_layer(layer, x, gy)
        return [rel_err(y, want[0]), rel_err(gx, want[1])]

    got = errors()
    with use_strategy("merged"):
        merged = errors()
    worst = max(g / m for g, m in zip(got, merged))
    assert worst <= 1.5, f"factorized/merged fp32 error up to {worst:.2f}x: {got} vs {merged}"


@pytest.mark.parametrize("cin,cout", [(128, 128), (256, 512)])
def test_quanta_fp32_error_near_init_within_1_5x_of_merged(cin, cout, seeded):
    """QuanTA's gates on the activations: A(x; θ) - A(x; θ0) telescoped along the gate chain
    (and its input gradient in reverse) keeps the output and input-gradient error within
    1.5x of the merged Linear's."""
    lin = nn.Linear(cin, cout)
    with torch.no_grad():
        lin.weight.normal_(0, 0.02)
    layer = near_init(QuanTALinear.from_linear(lin, 4))
    x = torch.randn(16, cin)
    gy = torch.randn(16, cout, dtype=torch.float64)
    want = oracle_forward_and_grads(layer, x, gy, "linear")
    errors = {}
    for strategy in ("factorized", "merged"):
        with use_backend("torch"), use_strategy(strategy):
            y, gx, _ = run_layer(layer, x, gy)
        errors[strategy] = [rel_err(y, want[0]), rel_err(gx, want[1])]
    worst = max(f / m for f, m in zip(errors["factorized"], errors["merged"]))
    assert worst <= 1.5, f"factorized/merged fp32 error up to {worst:.2f}x: {errors}"


def test_zero_last_init_has_no_frozen_path(seeded, factorized):
    layer = train_a_little(TenVOOConv3d.from_conv(realistic_conv(16, 8), 2, "L",
                                                  init="zero-last"))
    check_against_oracle(layer, torch.randn(1, 16, 4, 4, 4), "conv", TOL[torch.float32])


def test_keeps_nothing_weight_sized(seeded, factorized):
    layer = TenVOOConv3d.from_conv(nn.Conv3d(64, 128, 3, padding=1), 4, "L")
    x = torch.randn(1, 64, 6, 6, 4, requires_grad=True)
    backend = tenvoo_fast.dispatch.resolve(layer, x)
    assert saved_bytes(lambda: layer(x), owned_tensors(layer, x, backend)) == 0


def test_blocks_of_the_networks():
    """U holds the input-channel cores, V the output ones, K the kernel and cross cores; the
    bonds between them are r³ for both variants (spec core tables)."""
    for variant in "LQ":
        net = methods.tenvoo(variant, (4, 2, 2), (2, 3, 2), (3, 3, 3), 3)
        part = partition(net.equation, net.shapes, *channel_letters(net))
        assert (part.u_cores, part.v_cores) == ((0, 1), (5, 6))
        assert part.k_cores == (2, 3, 4, 7, 8, 9)
        assert part.rank_u == part.rank_v == 27
    lora = methods.lora(12, 16, (3, 3, 3), 3)
    with pytest.raises(ValueError):
        partition(lora.equation, lora.shapes, "O", "I", "xyz")


def test_opcheck_and_compile(seeded):
    layer = train_a_little(TenVOOConv3d.from_conv(nn.Conv3d(6, 8, 3, padding=1), 2, "Q"))
    layer.bias.requires_grad_(True)
    x = torch.randn(2, 6, 4, 3, 4, requires_grad=True)
    torch.library.opcheck(torch.ops.tenvoo_fast.factorized_conv3d.default,
                          cores_op_args(layer, x, "torch"))
    check_compiled_matches_eager(layer, x, "torch", "factorized")


def test_opcheck_with_the_triton_maps(seeded):
    layer = train_a_little(TenVOOConv3d.from_conv(nn.Conv3d(6, 8, 3, padding=1), 2, "L"))
    x = torch.randn(2, 6, 3, 2, 3, requires_grad=True)
    permuted = x.detach().transpose(2, 4).contiguous().transpose(2, 4)  # dense, not a format
    for inp in (x, x.detach().to(memory_format=torch.channels_last_3d), permuted):
        inp = inp.detach().requires_grad_()
        common = (layer.network.equation, ",".join(channel_letters(layer.network)),
                  layer.network.scale, [1, 1, 1, 1, 1, 1, 1, 1, 1], "triton")
        torch.library.opcheck(torch.ops.tenvoo_fast.factorized_conv3d.default,
                              (inp, layer.weight, list(layer.cores), list(layer.frozen_cores),
                               layer.bias, *common))
        g = torch.randn(2, 8, 3, 2, 3)
        torch.library.opcheck(torch.ops.tenvoo_fast.factorized_conv3d_backward.default,
                              (g, inp.detach(), layer.weight.detach(),
                               [c.detach() for c in layer.cores], list(layer.frozen_cores),
                               layer.bias.detach(), True, True, *common))


def test_channels_last_in_channels_last_out(seeded, factorized):
    layer = train_a_little(TenVOOConv3d.from_conv(realistic_conv(16, 8), 2, "Q"))
    x = torch.randn(2, 16, 4, 3, 5).to(memory_format=torch.channels_last_3d)
    check_against_oracle(layer, x, "conv", TOL[torch.float32])
    x.requires_grad_()
    y = layer(x)
    y.backward(torch.randn_like(y))
    assert y.is_contiguous(memory_format=torch.channels_last_3d)
    assert x.grad.is_contiguous(memory_format=torch.channels_last_3d)


def test_rank_wider_than_one_tile(seeded, factorized):
    """TenVOO-Q at rank 6 has r³ = 216 rank channels: two of the kernels' 128-wide rank tiles,
    the second masked."""
    layer = train_a_little(TenVOOConv3d.from_conv(realistic_conv(8, 8), 6, "Q"))
    check_against_oracle(layer, torch.randn(1, 8, 3, 3, 2), "conv", TOL[torch.float32])


def test_empty_batch(factorized):
    layer = TenVOOConv3d.from_conv(nn.Conv3d(8, 8, 3, padding=1), 2, "L")
    x = torch.randn(0, 8, 3, 3, 3, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad.shape == x.shape
    assert all(torch.equal(c.grad, torch.zeros_like(c)) for c in layer.cores)


@interpreted
def test_the_triton_backend_runs_the_fused_maps(seeded, monkeypatch):
    """The triton backend's factorized conv goes through the three Triton launchers (forward:
    project and expand; backward: project, outer twice and expand), the others through torch."""
    from tenvoo_fast.triton_kernels import launch_factorized
    calls = []
    for name in ("project", "add_expanded", "outer"):
        fn = getattr(launch_factorized, name)
        monkeypatch.setattr(launch_factorized, name,
                            lambda *a, _fn=fn, _name=name, **k: calls.append(_name) or _fn(*a, **k))
    layer = train_a_little(TenVOOConv3d.from_conv(nn.Conv3d(8, 8, 3, padding=1), 2, "L"))
    x = torch.randn(1, 8, 3, 3, 3, requires_grad=True)
    with use_backend("torch"), use_strategy("factorized"):
        layer(x).sum().backward()
    assert calls == []
    with use_backend("triton"), use_strategy("factorized"):
        layer(x).sum().backward()
    assert sorted(calls) == sorted(["project", "add_expanded",  # forward
                                    "project", "project", "outer", "outer", "add_expanded"])


def _strided(t, layout):
    if layout == "channels-last":
        return t.to(memory_format=torch.channels_last_3d)
    if layout == "sliced":  # every other element along W
        return torch.cat([t, t], dim=4)[..., ::2]
    if layout == "permuted":  # H outermost in memory
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    return t


@interpreted
@pytest.mark.parametrize("layout", ["contiguous", "channels-last", "sliced", "permuted"])
@pytest.mark.parametrize("rank", [1, 20, 130])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_maps_equal_the_torch_maps(layout, rank, dtype, seeded):
    """Each launcher against its pure-torch twin (activation_maps) on odd ranks (one masked
    tile; two tiles), strides and 16-bit inputs; θ0's accumulators cancel θ's exactly."""
    from tenvoo_fast.triton_kernels import launch_factorized as tri
    ref = activation_maps
    a = _strided(torch.randn(2, 40, 3, 4, 5).to(dtype), layout)
    mat, mat0 = torch.randn(rank, 40), torch.randn(rank, 40)
    up, up0 = torch.randn(40, rank), torch.randn(40, rank)
    z, z0 = tri.project(a, mat, mat0, 0.5)
    zr, zr0 = ref.project(a, mat, mat0, 0.5)
    assert rel_err(z, zr) < 1e-6 and rel_err(z0, zr0) < 1e-6
    y = _strided(torch.randn(2, 40, 3, 4, 5).to(dtype), layout)
    got = tri.add_expanded(y.clone(), z, up, z0, up0, 0.25)
    want = ref.add_expanded(y.clone().float(), z, up, z0, up0, 0.25).to(dtype)
    assert rel_err(got, want) < TOL[dtype]
    z0_other = z0.transpose(2, 4).contiguous().transpose(2, 4)  # θ0's map in another layout
    assert torch.equal(tri.add_expanded(y.clone(), z, up, z0_other, up0, 0.25), got)
    assert torch.equal(tri.add_expanded(y.clone(), z, up, z, up, 0.25), y)
    for splits in (None, 3):  # one split, or several (capped at the 2 voxel chunks here)
        assert rel_err(tri.outer(a, z, 2.0, splits), ref.outer(a, z, 2.0)) < 1e-6
    empty = a[:0]
    assert tri.outer(empty, z[:0]).shape == (40, rank)
    assert tri.project(empty, mat)[0].shape == (0, rank, 3, 4, 5)


def test_auto_chooses_by_cost_and_refuses_what_cannot_factor():
    big = TenVOOConv3d.from_conv(nn.Conv3d(512, 512, 3, padding=1), 4, "L")
    small = TenVOOConv3d.from_conv(nn.Conv3d(32, 32, 3, padding=1), 4, "L")
    # Measured on the CPU: factorized 0.38x of merged at 512->512 on 4x4x3 voxels, 8.8x at
    # 32->32 on 32x32x24; the model picks the faster in both.
    assert conv_strategy(big, (1, 512, 4, 4, 3), (4, 4, 3)) == "factorized"
    assert conv_strategy(small, (1, 32, 32, 32, 24), (32, 32, 24)) == "merged"
    # On a GPU with the triton kernels each launch is charged: merged's 5 beat factorized's 150.
    assert conv_strategy(big, (1, 512, 4, 4, 3), (4, 4, 3), "triton", "cuda") == "merged"
    with use_strategy("merged"):
        assert conv_strategy(big, (1, 512, 4, 4, 3), (4, 4, 3)) == "merged"
    lora = LoRAConv3d.from_conv(nn.Conv3d(4, 4, 3), 2, name="blk.lora")
    with use_backend("torch"), use_strategy("factorized"):
        with pytest.raises(AdapterError, match=r"blk\.lora.*'factorized' is not implemented for lora.*'merged'"):
            lora(torch.randn(1, 4, 3, 3, 3))


def test_finetune_strategy_flag_runs_the_whole_model_that_way(tmp_path):
    """--strategy factorized: TenVOO convs run factorized; layers without that form run merged
    (a whole-model comparison must not stop at the first LoRA or QuanTA layer)."""
    import json
    from tenvoo_fast.ddpm.cli import main
    for method in ("tenvoo-l", "lora"):
        out = tmp_path / method
        assert main(["finetune", "--preset", "tiny", "--device", "cpu", "--num-volumes", "3",
                     "--steps", "1", "--method", method, "--strategy", "factorized",
                     "--size", "8", "8", "8", "--out", str(out)]) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["strategy"] == "factorized"
        convs = [p for p in metrics["execution"] if p["layer"].endswith(".conv")]
        assert convs and all(p["strategy"] == ("factorized" if method == "tenvoo-l" else "merged")
                             for p in convs)
