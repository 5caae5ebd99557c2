"""tf.autotune: measured (backend, strategy) per layer shape, consulted by ``auto`` only."""
import json

import pytest
import torch
from torch import nn

import tenvoo_fast as tf
from tenvoo_fast import QuanTALinear, TenVOOConv3d, autotune, use_backend, use_strategy
from tenvoo_fast.ddpm.cli import main


@pytest.fixture(autouse=True)
def fresh_cache():
    autotune.clear()
    yield
    autotune.clear()


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        TenVOOConv3d.from_conv(nn.Conv3d(16, 16, 3, padding=1), 2, "L"),
        TenVOOConv3d.from_conv(nn.Conv3d(16, 16, 3, padding=1), 2, "L"),   # same key as above
        TenVOOConv3d.from_conv(nn.Conv3d(16, 8, 3, padding=1), 2, "Q"),
        nn.Flatten(1), QuanTALinear.from_linear(nn.Linear(8 * 4 * 4 * 3, 12), 2))


def test_tune_times_every_candidate_once_per_layer_shape(seeded):
    model = _model()
    x = torch.randn(2, 16, 4, 4, 3)
    chosen = autotune.tune(model, lambda: model(x), repeats=1)
    assert len(chosen) == 3                       # the two identical layers share a decision
    for d in chosen:
        assert d["choice"] in d["ms"] and d["ms"][d["choice"]] == min(d["ms"].values())
        assert "reference/merged" in d["ms"] and "torch/merged" in d["ms"]
        if d["method"] in ("tenvoo-l", "tenvoo-q", "quanta"):
            assert "torch/factorized" in d["ms"]
        assert not any(k.startswith("triton") for k in d["ms"])   # never the interpreter
    # The model follows the decisions, and its output is still the reference's.
    with use_backend("reference"):
        want = model(x)
    got = model(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    plan = {p["layer"]: p for p in tf.execution_plan(model)}
    for d in chosen:
        backend, strategy = d["choice"].split("/")
        layer = next(p for p in plan.values() if p["method"] == d["method"])
        assert layer["backend"] == backend
        assert layer["strategy"] == (None if backend == "reference" else strategy)


def test_auto_follows_the_measurement_and_explicit_choices_still_win(monkeypatch, seeded):
    preferred = {"torch/factorized": 1.0, "reference/merged": 2.0}
    monkeypatch.setattr(autotune, "_time",
                        lambda layer, x, b, s, repeats: preferred.get(f"{b}/{s}", 9.0))
    layer = TenVOOConv3d.from_conv(nn.Conv3d(8, 8, 3, padding=1), 2, "L", name="blk.conv")
    x = torch.randn(1, 8, 4, 4, 4)
    assert autotune.tune(layer, lambda: layer(x))[0]["choice"] == "torch/factorized"
    layer(x)
    assert (layer.execution_backend, layer.execution_strategy) == ("torch", "factorized")
    with use_strategy("merged"):
        layer(x)
        assert layer.execution_strategy == "merged"
    with use_backend("reference"):
        layer(x)
        assert layer.execution_backend == "reference"
    layer(torch.randn(1, 8, 5, 4, 4))              # another shape: not tuned, the flop model
    assert layer.execution_backend == "torch"
    autotune.clear()
    assert autotune.decisions() == []


def test_finetune_autotune_records_its_decisions(tmp_path):
    code = main(["finetune", "--preset", "tiny", "--device", "cpu", "--num-volumes", "3",
                 "--steps", "1", "--autotune", "--out", str(tmp_path)])
    assert code == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["autotune"] and all(d["choice"] in d["ms"] for d in metrics["autotune"])
    choices = {d["choice"] for d in metrics["autotune"]}
    ran = {p["backend"] + (f"/{p['strategy']}" if p["strategy"] else "/merged")
           for p in metrics["execution"]}
    assert ran <= choices
