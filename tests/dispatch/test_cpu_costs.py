"""``auto``'s strategy choice on the CPU charges the ``torch`` kernels' Python-issued operator
calls (dispatch/costs.py, ``CPU_CALLS``): the table agrees with the counted calls, and the
choices follow (a small layer runs merged, as one C++ function; a wide Linear on one row runs
factorized)."""
import pytest
import torch
from torch import nn

import tenvoo_fast
from tenvoo_fast.dispatch import strategy
from tenvoo_fast.dispatch.costs import CPU_CALLS
from tenvoo_fast.kernels import native_layer
from tests.layer_checks import CONV_MAKERS, LINEAR_MAKERS
from tests.measure.test_budgets import extra_counts


@pytest.mark.parametrize("kind,method,shapes", [
    ("conv3d", "tenvoo-l", [(32, 32), (64, 32), (256, 256)]),
    ("conv3d", "tenvoo-q", [(32, 64), (128, 128)]),
    ("linear", "quanta", [(32, 16), (128, 128), (512, 512)])])
def test_the_charged_calls_are_the_counted_ones(kind, method, shapes):
    """Within 20% on every shape: one charge per kind stands for every method and shape (TenVOO-L
    and -Q merged take 40-56 calls with the program's copies)."""
    for strat in ("merged", "factorized"):
        charged = CPU_CALLS["python"][kind][strat]
        for shape in shapes:
            counted = extra_counts(method, *shape, "torch", strat)[0]
            assert abs(counted - charged) <= 0.2 * charged, (strat, shape, counted, charged)
    # The C++ function issues the merged op's calls without Python between them.
    assert CPU_CALLS["native"][kind]["merged"] < CPU_CALLS["python"][kind]["merged"]
    assert CPU_CALLS["native"][kind]["factorized"] == CPU_CALLS["python"][kind]["factorized"]


def _linear_choice(fin, fout, rows):
    layer = LINEAR_MAKERS["quanta"](nn.Linear(fin, fout), 4)
    x = torch.randn(rows, fin)
    with tenvoo_fast.use_backend("torch"):
        layer(x)
    return layer.execution_strategy


def test_a_small_linear_runs_merged_and_a_wide_one_on_one_row_factorized():
    """Measured on the development CPU: QuanTA 32->16 on one row 0.31 ms merged (C++) against
    1.4 ms factorized; 512->512 on one row 7.3 ms merged against 1.7 ms factorized."""
    assert _linear_choice(32, 16, 1) == "merged"
    assert _linear_choice(512, 512, 1) == "factorized"


def test_a_small_conv_runs_merged():
    layer = CONV_MAKERS["tenvoo-l"](nn.Conv3d(8, 8, 3, padding=1), 4)
    with tenvoo_fast.use_backend("torch"):
        layer(torch.randn(1, 8, 2, 2, 2))
    assert layer.execution_strategy == "merged"


def test_the_charge_follows_whether_the_cpp_function_is_there(monkeypatch):
    assert strategy._host_charge("torch", "cpu") == (
        "cpu-native" if native_layer.available() else "cpu-python")
    monkeypatch.setattr(native_layer, "_RUN", None)
    assert strategy._host_charge("torch", "cpu") == "cpu-python"
    assert strategy._host_charge("triton", "cuda") is None
    monkeypatch.undo()
    # A layer the C++ function does not take (a bf16 base weight) is charged the Python op.
    layer = CONV_MAKERS["tenvoo-l"](nn.Conv3d(8, 8, 3, padding=1), 4)
    assert strategy._host_charge("torch", "cpu", layer) == (
        "cpu-native" if native_layer.available() else "cpu-python")
    layer.weight.data = layer.weight.data.bfloat16()
    assert strategy._host_charge("torch", "cpu", layer) == "cpu-python"
    assert strategy._host_charge("native", "cpu") is None
