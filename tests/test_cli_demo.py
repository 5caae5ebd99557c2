"""``tenvoo-fast demo`` runs end to end, writes loadable outputs, and fails cleanly on bad input."""
import json
import math

import pytest
import torch

import tenvoo_fast
from tenvoo_fast.cli import build_tiny_unet, main
from tenvoo_fast.phantoms import brain_phantoms

METRIC_KEYS = {"method", "rank", "device", "steps", "losses", "step_time_s", "trainable_params",
               "total_params", "adapted_layers", "versions"}


@pytest.mark.parametrize("method", ["tenvoo-l", "tenvoo-q"])
def test_demo_trains_and_saves_a_loadable_adapter(method, tmp_path, capsys):
    assert main(["demo", "--steps", "3", "--out", str(tmp_path), "--method", method]) == 0
    assert "median step time" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert METRIC_KEYS <= set(metrics)
    assert metrics["method"] == method and metrics["steps"] == 3
    assert len(metrics["losses"]) == 3 and all(math.isfinite(v) for v in metrics["losses"])
    assert 0 < metrics["trainable_params"] < metrics["total_params"]
    assert set(metrics["versions"]) == {"torch", "monai", "tenvoo_fast"}
    assert not list(tmp_path.glob(".tmp-*"))  # atomic writes leave no temporaries

    model = tenvoo_fast.load_adapter(build_tiny_unet(), tmp_path / "adapter.safetensors")
    assert len(tenvoo_fast.adapter_layers(model)) == metrics["adapted_layers"] > 0
    config, _ = tenvoo_fast.read_adapter_metadata(tmp_path / "adapter.safetensors")
    assert (config.method, config.rank) == (method, 4)


def test_unknown_method_is_an_argparse_error(tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--method", "nope", "--out", str(tmp_path)])
    assert exc.value.code == 2


def test_adapter_error_is_reported_without_traceback(tmp_path, capsys):
    assert main(["demo", "--rank", "0", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: rank must be") and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_phantoms_are_deterministic_distinct_and_in_unit_range():
    a, b = brain_phantoms(2, 16, seed=3), brain_phantoms(2, 16, seed=3)
    assert a.shape == (2, 1, 16, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, brain_phantoms(2, 16, seed=4))
    assert not torch.equal(a[0], a[1])
    assert a.min() >= 0 and a.max() <= 1 and a.std() > 0.1
    assert torch.equal(brain_phantoms(1, 16, seed=3), a[:1])  # volume i depends on (seed, i)
