"""``auto`` on CUDA from the GPU cost model (dispatch/gpu_costs.py): its launch table is the
counted one, its constants are the committed calibration's, and its choices follow from
counts and rooflines (the model is a pure function of shapes, so it is checked on the CPU)."""
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import tenvoo_fast
from tenvoo_fast.dispatch import gpu_costs, strategy
from tenvoo_fast.measure.launches import extra_step_counts
from tests.layer_checks import CONV_MAKERS, LINEAR_MAKERS

ROOT = Path(__file__).resolve().parents[2]
#: Two shapes per kind whose counts differ for some methods; the table holds the larger.
SHAPES = {"conv3d": [(64, 64), (32, 128)], "linear": [(128, 64), (512, 512)]}


def _count(kind, method, cin, cout, backend, strat):
    torch.manual_seed(0)
    if kind == "linear":
        plain, layer = nn.Linear(cin, cout), LINEAR_MAKERS[method](nn.Linear(cin, cout), 4)
        x = torch.randn(4, cin, requires_grad=True)
    else:
        plain = nn.Conv3d(cin, cout, 3, padding=1)
        layer = CONV_MAKERS[method](nn.Conv3d(cin, cout, 3, padding=1), 4)
        x = torch.randn(1, cin, 2, 2, 2, requires_grad=True)
    with tenvoo_fast.use_backend(backend), tenvoo_fast.use_strategy(
            "auto" if backend == "reference" else strat):
        return extra_step_counts(layer, plain, x).launches


@pytest.mark.parametrize("kind,method", list(gpu_costs.LAUNCHES))
def test_the_launch_table_is_the_counted_one(kind, method, monkeypatch):
    """Triton's launches counted without running them (``dry_run``), as the paper model's."""
    dry_run = pytest.importorskip("tenvoo_fast.triton_kernels.launching").dry_run
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    table = gpu_costs.LAUNCHES[(kind, method)]
    for (backend, strat), charged in table.items():
        with dry_run():
            counted = [_count(kind, method, *shape, backend, strat) for shape in SHAPES[kind]]
        assert max(counted) == charged, (backend, strat, counted)


def test_the_constants_are_the_committed_calibration():
    fit = json.loads((ROOT / "benchmarks/results/step-model-2026-12-07/step-model.json")
                     .read_text())
    assert gpu_costs.HOST_S_PER_LAUNCH == pytest.approx(fit["host_s_per_call"], rel=1e-3)
    assert gpu_costs.CONV_INEFFICIENCY == pytest.approx(fit["inefficiency"]["conv"], rel=1e-3)
    assert gpu_costs.OTHER_INEFFICIENCY == pytest.approx(fit["inefficiency"]["other"],
                                                         rel=1e-2)


def _conv(method, cin=64, cout=64):
    return CONV_MAKERS[method](nn.Conv3d(cin, cout, 3, padding=1), 4)


#: Paper-preset input shapes (bf16 under autocast): the top level and the bottom of the UNet.
TOP, BOTTOM = (1, 32, 128, 128, 96), (1, 256, 16, 16, 12)


@pytest.mark.parametrize("mode", ["host", "replay"])
@pytest.mark.parametrize("method", ["tenvoo-l", "tenvoo-q", "lora", "loha", "lokr"])
def test_triton_merged_is_predicted_fastest_on_the_paper_shapes(method, mode):
    for shape in (TOP, BOTTOM):
        layer = _conv(method, shape[1], shape[1])
        with tenvoo_fast.use_launch_cost(mode):
            assert gpu_costs.ranking(layer, shape, torch.bfloat16)[0] == "triton"
            assert strategy.conv_strategy(layer, shape, shape[2:], "triton", "cuda",
                                          torch.bfloat16) == "merged"


def test_without_triton_the_counts_order_torch_and_the_reference():
    """TenVOO's torch path issues fewer launches than the reference's autograd (41-53 against
    61), LoRA's more (6 against 4): at equal device work the counts decide."""
    assert gpu_costs.ranking(_conv("tenvoo-l"), BOTTOM, torch.bfloat16)[1:] == (
        "torch", "reference")
    assert gpu_costs.ranking(_conv("lora"), BOTTOM, torch.bfloat16)[1:] == (
        "reference", "torch")


def test_a_replayed_launch_costs_a_kernel_floor_not_the_host():
    layer = _conv("tenvoo-l")
    args = gpu_costs.layer_args(layer, BOTTOM, torch.bfloat16)
    host = gpu_costs.seconds(*args)
    with tenvoo_fast.use_launch_cost("replay"):
        replay = gpu_costs.seconds(*gpu_costs.layer_args(layer, BOTTOM, torch.bfloat16))
    for key, n in gpu_costs.LAUNCHES[("conv3d", "tenvoo-l")].items():
        saved = host[key] - replay[key]
        assert saved == pytest.approx(
            n * (gpu_costs.HOST_S_PER_LAUNCH - gpu_costs.seconds_per_launch("replay")))


def test_factorized_wins_where_its_activation_passes_are_cheaper_than_the_weight():
    """A wide Linear on one token: the merged weight build and its gradient outweigh seven
    passes over one row once launches cost a kernel floor; eagerly, its 56 launches do not."""
    layer = LINEAR_MAKERS["quanta"](nn.Linear(4096, 4096), 4)
    with tenvoo_fast.use_launch_cost("replay"):
        assert strategy.linear_strategy(layer, 1, "triton", "cuda", torch.bfloat16) == \
            "factorized"
    assert strategy.linear_strategy(layer, 1, "triton", "cuda", torch.bfloat16) == "merged"


def test_the_choice_is_made_once_per_shape():
    gpu_costs._ranking_cached.cache_clear()
    layer = _conv("tenvoo-l")
    for _ in range(3):
        gpu_costs.ranking(layer, BOTTOM, torch.bfloat16)
    assert gpu_costs._ranking_cached.cache_info().misses == 1


def test_launch_cost_names_are_checked():
    with pytest.raises(ValueError, match="launch cost 'graph'"):
        with tenvoo_fast.use_launch_cost("graph"):
            pass
