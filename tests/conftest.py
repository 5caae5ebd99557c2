import os
import sys

import pytest
import torch

# Test helpers (oracle.py, ddpm_shapes.py) are plain modules beside the tests.
sys.path.insert(0, os.path.dirname(__file__))

# Numerics under test must not depend on TF32 settings (adapters.md §3).
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


@pytest.fixture
def seeded():
    torch.manual_seed(1234)
    yield
