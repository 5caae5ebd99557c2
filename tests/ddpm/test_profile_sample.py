"""``tenvoo-fast profile`` (methods side by side) and ``tenvoo-fast sample`` (generation with a
merged adapter)."""
import json

import numpy as np
import pytest
import torch

from tenvoo_fast import load_adapter
from tenvoo_fast.ddpm.cli import main
from tenvoo_fast.ddpm.finetune import base_unet

TINY = ["--preset", "tiny", "--device", "cpu"]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A one-step tiny tenvoo-l finetune run folder."""
    out = tmp_path_factory.mktemp("finetune")
    code = main(["finetune", *TINY, "--method", "tenvoo-l", "--steps", "1", "--accum", "1",
                 "--num-volumes", "3", "--seed", "0", "--out", str(out)])
    assert code == 0
    return out


def test_profile_writes_table_chart_and_json(tmp_path, capsys):
    code = main(["profile", "--methods", "full,tenvoo-l", *TINY, "--steps", "1", "--accum", "1",
                 "--num-volumes", "3", "--out", str(tmp_path)])
    assert code == 0
    profile = json.loads((tmp_path / "profile.json").read_text())
    rows = profile["rows"]
    assert [r["method"] for r in rows] == ["full", "tenvoo-l"]
    for row in rows:
        metrics = json.loads((tmp_path / row["method"] / "metrics.json").read_text())
        assert row["trainable_params"] == metrics["trainable_params"]
        assert row["total_params"] == metrics["total_params"]
        assert row["peak_memory_bytes"] == metrics["peak_memory_bytes"] > 0
        assert metrics["steps"] == 1 and metrics["accum"] == 1
    assert rows[0]["trainable_params"] == rows[0]["total_params"]
    assert rows[1]["trainable_params"] < rows[0]["trainable_params"]
    assert profile["device"] == "cpu" and profile["peak_memory"] == "rss"
    assert {"torch", "monai", "tenvoo_fast"} <= set(profile["versions"]) and profile["date"]

    table = (tmp_path / "profile.md").read_text()
    main_table, _, execution = table.partition("### Execution per layer")
    body = [line for line in main_table.splitlines() if line.startswith("| ")]
    assert len(body) == 3  # header and two rows
    # Every adapted layer of the adapter run is listed with the backend and strategy it ran.
    plan = rows[1]["execution"]
    assert plan and len(plan) == rows[1]["adapted_layers"] and rows[0]["execution"] == []
    for layer in plan:
        assert layer["backend"] in ("torch", "reference")
        assert (layer["strategy"] in ("merged", "factorized")) == (layer["backend"] != "reference")
        assert f"| {layer['layer']} | {layer['method']} |" in execution
    assert f"| tenvoo-l | {rows[1]['trainable_params']:,} |" in table
    assert "vs full" in body[0] and "RSS" in table and "only grows" in table
    assert (tmp_path / "profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".tmp-*"))
    assert "| full | " in capsys.readouterr().out  # the table is printed


def test_profile_rejects_unknown_method(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["profile", "--methods", "full,nope", *TINY, "--out", str(tmp_path)])
    assert e.value.code == 2 and "nope" in capsys.readouterr().err


def _sample(out, *args):
    return main(["sample", *TINY, "--scheduler", "ddim", "--steps", "3", "--num", "2",
                 "--size", "16", "16", "16", "--out", str(out), *args])


def _check_samples(out):
    import nibabel

    for i in range(2):
        image = nibabel.load(out / f"sample_{i:03d}.nii.gz")
        data = np.asarray(image.dataobj)
        assert data.shape == (16, 16, 16) and data.dtype == np.float32
        assert np.isfinite(data).all() and data.std() > 0
        assert np.allclose(image.affine, np.eye(4))
        assert (out / f"sample_{i:03d}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "sample_002.nii.gz").exists() and not list(out.glob(".tmp-*"))


def test_sample_with_adapter(finetuned, tmp_path):
    assert _sample(tmp_path, "--adapter", str(finetuned / "adapter.safetensors")) == 0
    _check_samples(tmp_path)


def test_sample_base_model_is_deterministic(tmp_path):
    import nibabel

    assert _sample(tmp_path / "a") == 0
    _check_samples(tmp_path / "a")
    assert _sample(tmp_path / "b") == 0
    a, b = (np.asarray(nibabel.load(tmp_path / d / "sample_000.nii.gz").dataobj) for d in "ab")
    assert np.array_equal(a, b)


def test_sample_model_matches_the_finetuned_one(finetuned):
    """The merged model sample builds computes what finetune's adapted model computes."""
    from argparse import Namespace

    from tenvoo_fast.ddpm.sample import build_model

    merged = build_model(Namespace(preset="tiny", seed=0, base_weights=None,
                                   adapter=str(finetuned / "adapter.safetensors")))
    torch.manual_seed(0)
    adapted = load_adapter(base_unet("tiny"), finetuned / "adapter.safetensors").eval()
    x, t = torch.randn(1, 1, 16, 16, 16), torch.tensor([500])
    with torch.no_grad():
        a, b = merged(x, t), adapted(x, t)
    # fp32 through ~60 adapted layers whose ΔW is contracted in different orders (merge by the
    # reference, training by recompute). W = W0 + (T - T0) with |T| ~ 50|W0|, so each layer's
    # weight carries ~1e-7 * 50 relative rounding; measured 2.5e-5 at the output. A wrong merge
    # (e.g. a missing T0) is off by O(1).
    assert ((a - b).norm() / b.norm()).item() < 1e-4


def test_sample_missing_adapter_fails_cleanly(tmp_path, capsys):
    missing = tmp_path / "nope" / "adapter.safetensors"
    assert _sample(tmp_path / "out", "--adapter", str(missing)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(missing) in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_sample_other_seed_warns(finetuned, tmp_path, capsys):
    assert main(["sample", *TINY, "--scheduler", "ddim", "--steps", "1", "--size", "8", "8", "8",
                 "--seed", "5", "--adapter", str(finetuned / "adapter.safetensors"),
                 "--out", str(tmp_path)]) == 0
    assert "--seed 0" in capsys.readouterr().err
