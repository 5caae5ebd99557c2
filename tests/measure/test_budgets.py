"""Launch budgets of one adapted layer's training step (forward and backward), beyond what the
same layer costs trainable and plain, counted on the CPU (counts do not depend on the device).

The budgets are what the torch path achieves today (README, "Launches"); they only go down.
The launch issue's budget for the torch path is +40 launches and 10 copies per adapted Conv3d:
TenVOO-L meets it on every DDPM shape; TenVOO-Q meets the copy budget, not yet the
launch budget.
"""
import pytest
import torch
from torch import nn

import tenvoo_fast
from tenvoo_fast.measure.launches import extra_step_counts
from tests.ddpm_shapes import DDPM_CONV_SHAPES, DDPM_LINEAR_SHAPES
from tests.layer_checks import CONV_MAKERS, LINEAR_MAKERS

#: method -> (extra launches, extra copies) of an adapted Conv3d's step on the torch backend,
#: per effective-weight policy (recompute: the default; keep: no rebuild in backward).
CONV_BUDGETS = {
    "recompute": {"tenvoo-l": (40, 4), "tenvoo-q": (49, 10), "lora": (6, 0), "loha": (14, 0),
                  "lokr": (10, 1)},
    "keep": {"tenvoo-l": (37, 4), "tenvoo-q": (46, 10), "lora": (4, 0), "loha": (12, 0),
             "lokr": (8, 1)},
}
#: The same for an adapted Linear (QuanTA) on the backend the CPU runs it with (reference).
LINEAR_BUDGET = (13, 5)


def extra_counts(method, cin, cout, backend, strategy, rank=4):
    """(launches, copies, syncs) of an adapted layer's step beyond the trainable plain one."""
    torch.manual_seed(0)
    if method in LINEAR_MAKERS and method == "quanta":
        plain = nn.Linear(cin, cout)
        layer = LINEAR_MAKERS[method](nn.Linear(cin, cout), rank)
        x = torch.randn(4, cin, requires_grad=True)
    else:
        plain = nn.Conv3d(cin, cout, 3, padding=1)
        layer = CONV_MAKERS[method](nn.Conv3d(cin, cout, 3, padding=1), rank)
        x = torch.randn(1, cin, 2, 2, 2, requires_grad=True)
    with tenvoo_fast.use_backend(backend), tenvoo_fast.use_strategy(strategy):
        extra = extra_step_counts(layer, plain, x)
    return extra.launches, extra.copies, extra.syncs


@pytest.mark.parametrize("policy", list(CONV_BUDGETS))
@pytest.mark.parametrize("method", list(CONV_BUDGETS["recompute"]))
@pytest.mark.parametrize("shape", DDPM_CONV_SHAPES[::3] + [(24, 40)])
def test_adapted_conv_launch_budget_on_the_torch_path(method, shape, policy):
    with tenvoo_fast.use_weight_policy(policy):
        launches, copies, syncs = extra_counts(method, *shape, "torch", "merged")
    budget, copy_budget = CONV_BUDGETS[policy][method]
    assert launches <= budget, f"{method} {shape}: +{launches} launches (budget {budget})"
    assert copies <= copy_budget, f"{method} {shape}: +{copies} copies (budget {copy_budget})"
    assert syncs == 0


@pytest.mark.parametrize("shape", DDPM_LINEAR_SHAPES)
def test_adapted_linear_launch_budget(shape):
    launches, copies, syncs = extra_counts("quanta", *shape, "reference", "auto")
    assert launches <= LINEAR_BUDGET[0] and copies <= LINEAR_BUDGET[1], (launches, copies)
    assert syncs == 0


BACKEND_STRATEGIES = [("reference", "auto"), ("torch", "merged"), ("torch", "factorized")]


@pytest.mark.parametrize("backend,strategy", BACKEND_STRATEGIES)
@pytest.mark.parametrize("method", ["tenvoo-l", "tenvoo-q", "lora", "loha", "lokr", "quanta"])
def test_no_host_sync_inside_adapted_layers(method, backend, strategy):
    """Nothing in an adapted layer's forward or backward makes the host wait for the device
    (``item()``, data-dependent shapes, device-to-host copies)."""
    if strategy == "factorized" and method not in ("tenvoo-l", "tenvoo-q", "quanta"):
        pytest.skip("factorized runs TenVOO and QuanTA only")
    shape = (32, 64) if method != "quanta" else (128, 64)
    *_, syncs = extra_counts(method, *shape, backend, strategy)
    assert syncs == 0
