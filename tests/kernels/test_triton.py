"""The triton backend against the fp64 oracle: on the GPU when there is one, else in Triton's
interpreter on CPU tensors (tiny shapes: the interpreter runs one program at a time)."""
import pytest
import torch
from torch import nn

from tests.layer_checks import (CONV_MAKERS, LINEAR_MAKERS, TOL, check_against_oracle, realistic_conv,
                          train_a_little)
from tenvoo_fast import TenVOOConv3d, use_backend

# The interpreter computes bf16 wrongly (kernels.md): bf16 is checked on the GPU (test_cuda.py).
DTYPES = [torch.float32, torch.float16]
# These run CPU tensors through the interpreter; on a GPU, test_cuda.py checks the backend.
interpreted = pytest.mark.skipif(torch.cuda.is_available(),
                                 reason="GPU present: tests/kernels/test_cuda.py covers triton there")


@pytest.fixture
def triton_backend(seeded):
    with use_backend("triton"):
        yield


@interpreted
@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("method", list(CONV_MAKERS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_conv_forward_and_grads(method, dtype):
    layer = train_a_little(CONV_MAKERS[method](realistic_conv(12, 10, (3, 1, 3), dtype), 3))
    check_against_oracle(layer, torch.randn(2, 12, 4, 3, 5, dtype=dtype), "conv", TOL[dtype])


@interpreted
@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("cin,cout", [(8, 8), (32, 16), (6, 20)])
@pytest.mark.parametrize("variant", ["L", "Q"])
def test_tenvoo_odd_and_small_ddpm_shapes(cin, cout, variant):
    layer = train_a_little(TenVOOConv3d.from_conv(realistic_conv(cin, cout), 3, variant))
    check_against_oracle(layer, torch.randn(1, cin, 3, 3, 2), "conv", TOL[torch.float32])


@interpreted
@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("method", list(LINEAR_MAKERS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_forward_and_grads(method, dtype):
    layer = train_a_little(LINEAR_MAKERS[method](nn.Linear(24, 12, dtype=dtype), 3))
    check_against_oracle(layer, torch.randn(2, 5, 24, dtype=dtype), "linear", TOL[dtype])


@interpreted
@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("variant", ["L", "Q"])
def test_identical_to_base_at_init(variant):
    """The fused W + (T(θ) - T(θ0)) is exactly W at θ = θ0 (FMA contraction is off)."""
    conv = realistic_conv(8, 12)
    layer = TenVOOConv3d.from_conv(conv, 3, variant)
    x = torch.randn(1, 8, 4, 3, 3)
    assert torch.equal(layer.effective_weight(), conv.weight.detach())
    assert torch.equal(layer(x), conv(x))


@interpreted
@pytest.mark.usefixtures("triton_backend")
def test_torch_compile_fullgraph():
    layer = train_a_little(TenVOOConv3d.from_conv(nn.Conv3d(6, 8, 3, padding=1), 2, "Q"))
    x = torch.randn(1, 6, 3, 3, 3, requires_grad=True)
    eager = layer(x)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(compiled, eager)
    compiled.sum().backward()
    assert all(p.grad is not None for p in layer.cores)


@pytest.mark.parametrize("arch", [80, 90])
def test_check_kernels_compiles_everything_for_sm80_and_sm90(arch):
    """``tenvoo-fast check-kernels`` (a fresh process: the kernels must not be interpreted),
    one architecture per test so that the two run side by side."""
    import os
    import subprocess
    import sys
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    run = subprocess.run([sys.executable, "-m", "tenvoo_fast", "check-kernels",
                          "--arch", str(arch)], capture_output=True, text=True, env=env,
                         timeout=600)
    lines = run.stdout.splitlines()
    assert run.returncode == 0, run.stdout + run.stderr
    for kernel in ("build_kernel", "grads_kernel", "tree_kernel", "conv_fwd_kernel",
                   "conv_dgrad_kernel", "conv_wgrad_kernel", "project_kernel", "expand_kernel",
                   "outer_kernel"):
        assert any(l.startswith((f"ok      sm_{arch}  {kernel}[", f"ok      sm_{arch}  {kernel} "))
                   for l in lines), (kernel, arch)
    # Every csrc .cu file is compiled by nvcc for both architectures where nvcc exists.
    from tenvoo_fast.kernels.compile_check import nvcc
    want = "ok      " if nvcc() else "skipped "
    assert any(l.startswith(f"{want}sm_{arch}  csrc/cuda/last_step_cuda.cu")
               or (not nvcc() and l.startswith(f"skipped sm_{arch}")) for l in lines), arch
    if nvcc():  # and the CUDA extension's host file against torch's headers
        assert "ok      host   csrc/cuda/bind_cuda.cpp" in lines
    assert not any(l.startswith("failed") for l in lines)
    assert lines[-1] == "check-kernels: all ok"
    # The fused factorized kernels are sized not to spill (where cuobjdump reports it).
    for line in lines:
        if line.split("[")[0].split()[-1] in ("project_kernel", "expand_kernel", "outer_kernel"):
            assert "stack" not in line or " 0 B stack" in line, line
