import os

import pytest
import torch

# Without a GPU the triton backend runs its kernels in Triton's interpreter (on CPU tensors),
# so its numerics are tested everywhere; ``auto`` never picks it on the CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Numerics under test must not depend on TF32 settings (adapters.md §3).
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def pytest_sessionstart(session):
    """Fail the run, rather than skip tests, when a tool the suite relies on is missing: triton
    (the interpreter and ahead-of-time checks of the GPU kernels) always, nvcc (compiling the
    CUDA sources) when TENVOO_FAST_REQUIRE_NVCC=1, as CI sets it."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        pytest.exit("triton is not installed, so the GPU kernels cannot be checked here; install "
                    "the test extras (bash .ci/install, or pip install -e .[test])", returncode=1)
    if os.environ.get("TENVOO_FAST_REQUIRE_NVCC") == "1":
        from tenvoo_fast.kernels.compile_check import nvcc
        if nvcc() is None:
            pytest.exit("TENVOO_FAST_REQUIRE_NVCC=1 but nvcc is not on PATH (nor under "
                        "CUDA_HOME): install the CUDA toolkit, or unset it to skip compiling "
                        "the .cu files", returncode=1)


@pytest.fixture
def seeded():
    torch.manual_seed(1234)
    yield
