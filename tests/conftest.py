import os
import sys

import pytest
import torch

# Test helpers (oracle.py, ddpm_shapes.py) are plain modules beside the tests.
sys.path.insert(0, os.path.dirname(__file__))

# Without a GPU the triton backend runs its kernels in Triton's interpreter (on CPU tensors),
# so its numerics are tested everywhere; ``auto`` never picks it on the CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Numerics under test must not depend on TF32 settings (adapters.md §3).
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


@pytest.fixture
def seeded():
    torch.manual_seed(1234)
    yield
