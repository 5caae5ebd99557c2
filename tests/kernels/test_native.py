"""The native (csrc) kernels: built by the install, equal to the torch kernels, clear errors on
bad input, and the shared index arithmetic's own CTest executable through CMake."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

import tenvoo_fast
from tenvoo_fast import AdapterError, TenVOOConv3d, use_backend
from tenvoo_fast.contraction import last_step
from tenvoo_fast.kernels import native, torch_last_step
from tenvoo_fast.contraction.prereduce import reduced_cores
from tenvoo_fast.contraction import sweep

ROOT = Path(__file__).resolve().parents[2]


def test_the_install_built_the_cpu_extension():
    """CI installs with the default flags, so the C++ kernels must be there and loaded."""
    if os.environ.get("TENVOO_FAST_BUILD_CPU") == "0":
        pytest.skip("built with TENVOO_FAST_BUILD_CPU=0")
    assert native.CPU_ERROR is None, native.CPU_ERROR
    assert "cpu" in tenvoo_fast.available_backends()


def _last_step_of(layer):
    cores = [c.detach() for c in layer.cores]
    p, _, reduced = reduced_cores(layer.network.views(cores), layer.network.equation)
    steps, nodes = sweep.forward_tree(p.equation, reduced)
    return last_step.step_layout(steps[-1], nodes)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", ["L", "Q"])
def test_native_build_and_grads_equal_the_torch_kernel(variant, out_dtype, seeded):
    layer = TenVOOConv3d.from_conv(nn.Conv3d(24, 16, 3), 3, variant)
    lay, left, right = _last_step_of(layer)
    shape = list(layer.weight.shape)
    base, frozen = torch.randn(shape) * 0.02, torch.randn(shape)
    want = torch_last_step.build(lay, left, right, shape, 0.7, base, frozen, out_dtype).clone()
    got = native.build(lay, left, right, shape, 0.7, base, frozen, out_dtype)
    assert got.dtype == out_dtype and got.shape == want.shape
    # Both fold in fp32 in the same order; only the GEMM's summation order differs.
    torch.testing.assert_close(got, want, rtol=1e-6 if out_dtype == torch.float32 else 1e-2,
                               atol=1e-5)
    g = torch.randn(shape).to(out_dtype)
    for w, n in zip(torch_last_step.grads(lay, g, left, right, 0.7),
                    native.grads(lay, g, left, right, 0.7)):
        torch.testing.assert_close(n, w, rtol=1e-5, atol=1e-5)


def test_native_fold_is_exact_at_initialisation(seeded):
    """scale*T - T0 is exactly zero when the cores are the frozen ones: W comes back bit-exact."""
    layer = TenVOOConv3d.from_conv(nn.Conv3d(32, 16, 3), 4, "L")
    x = torch.randn(1, 32, 4, 4, 4)
    with use_backend("cpu"):
        assert torch.equal(layer(x), nn.functional.conv3d(x, layer.weight, layer.bias))


def _operands():
    a, b = torch.randn(1, 4, 3), torch.randn(1, 3, 5)
    layout = [0, 1, 4, 5, 1, 5, 1]        # no batch; rows (4, stride 5); cols (5, stride 1)
    return a, b, layout


def test_native_ops_refuse_bad_input_with_the_reason():
    a, b, layout = _operands()
    out = torch.empty(20)
    build = torch.ops.tenvoo_fast_C.last_step_build
    build(a, b, layout, None, None, 1.0, out)
    torch.testing.assert_close(out.view(4, 5), a[0] @ b[0])
    with pytest.raises(RuntimeError, match="malformed layout"):
        build(a, b, [0, 1, 4], None, None, 1.0, out)
    with pytest.raises(RuntimeError, match=r"layout groups \(1, 4, 6\) do not match"):
        build(a, b, [0, 1, 4, 5, 1, 6, 1], None, None, 1.0, out)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        build(a.half(), b.half(), layout, None, None, 1.0, out)
    with pytest.raises(RuntimeError, match="do not chain"):
        build(a, b[:, :2], layout, None, None, 1.0, out)
    with pytest.raises(RuntimeError, match="base has 19 elements, the weight 20"):
        build(a, b, layout, torch.randn(19), None, 1.0, out)
    with pytest.raises(RuntimeError, match="frozen must be in the contraction dtype"):
        build(a, b, layout, torch.randn(20), torch.randn(20).double(), 1.0, out)
    with pytest.raises(RuntimeError, match="out has 10 elements"):
        build(a, b, layout, None, None, 1.0, torch.empty(10))
    with pytest.raises(RuntimeError, match="grad_weight has 21 elements"):
        torch.ops.tenvoo_fast_C.last_step_grads(torch.randn(21), a, b, layout, 1.0)


def test_cpu_and_cuda_backends_say_why_they_cannot_run():
    layer = TenVOOConv3d.from_conv(nn.Conv3d(4, 4, 3), 2, name="down.0.conv")
    cuda = tenvoo_fast.dispatch.backends.get_backend("cuda")
    if cuda.unavailable_reason() is None:
        pytest.skip("the CUDA kernels are loaded here")
    with pytest.raises(AdapterError, match="backend 'cuda' cannot run here: .*(CUDA|GPU)"):
        tenvoo_fast.set_backend("cuda")
    meta = torch.empty(1, 4, 3, 3, 3, device="meta")
    reason = tenvoo_fast.dispatch.backends.get_backend("cpu").unsupported_reason(layer, meta)
    assert "runs cpu tensors and the input is on meta" in reason


def test_auto_keeps_the_measured_faster_recompute_on_the_cpu():
    """Measured (benchmarks/results/cpu-2core-*-run4): the C++ build is no faster than torch's
    MKL GEMM + passes on this CPU, so ``auto`` ranks ``cpu`` just below ``recompute``."""
    layer = TenVOOConv3d.from_conv(nn.Conv3d(4, 4, 3), 2)
    x = torch.randn(1, 4, 3, 3, 3)
    assert tenvoo_fast.dispatch.resolve(layer, x).name == "torch"
    with use_backend("cpu"):
        assert tenvoo_fast.dispatch.resolve(layer, x).name == "cpu"


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cmake_builds_csrc_and_ctest_checks_the_index_arithmetic(tmp_path):
    build = tmp_path / "build"
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build)], check=True,
                   capture_output=True, timeout=300)
    subprocess.run(["cmake", "--build", str(build), "-j", "2"], check=True, capture_output=True,
                   timeout=600)
    run = subprocess.run(["ctest", "--test-dir", str(build), "--output-on-failure"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "100% tests passed" in run.stdout
