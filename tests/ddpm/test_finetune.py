"""``tenvoo-fast finetune``: every method trains and reports, loss falls, NIfTI folders load or fail
cleanly, runs resume, paper counts in a dry run, DDP over two CPU processes, profiling."""
import json
import math
import os
import shutil
import statistics
import subprocess
import sys

import pytest
import torch

import tenvoo_fast
from tenvoo_fast.ddpm.cli import main
from tenvoo_fast.ddpm.finetune import METHODS
from tenvoo_fast.ddpm.phantoms import brain_phantom
from tenvoo_fast.ddpm.unets import build_tiny_unet

METRIC_KEYS = {"trainable_params", "total_params", "step_time_s", "peak_memory_bytes", "losses",
               "val_loss", "world_size", "device", "method", "rank", "amp", "preset", "size",
               "steps", "backend", "versions"}
TINY = ["finetune", "--preset", "tiny", "--device", "cpu", "--num-volumes", "3", "--accum", "1"]


def finetune(out, *args):
    """Run the command in-process; returns (exit code, metrics or None)."""
    code = main([*TINY, "--out", str(out), *args])
    path = out / "metrics.json"
    return code, json.loads(path.read_text()) if path.exists() else None


def write_nifti(folder, n=3, size=(12, 14, 10)):
    import nibabel
    import numpy as np
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        volume = brain_phantom(i, size).numpy() * 100.0
        nibabel.save(nibabel.Nifti1Image(volume.astype(np.float32), np.diag([1.2, 1.0, 1.5, 1.0])),
                     folder / f"vol{i}.nii.gz")
    return folder


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_and_writes_metrics(method, tmp_path, capsys):
    code, metrics = finetune(tmp_path, "--method", method, "--steps", "2")
    assert code == 0
    assert METRIC_KEYS <= set(metrics)
    assert (metrics["method"], metrics["steps"], metrics["world_size"]) == (method, 2, 1)
    assert (metrics["preset"], metrics["size"], metrics["amp"]) == ("tiny", [16, 16, 16], "none")
    assert metrics["backend"] == tenvoo_fast.current_backend()
    assert set(metrics["versions"]) == {"torch", "triton", "monai", "tenvoo_fast"}
    assert len(metrics["losses"]) == 2 and all(math.isfinite(v) for v in metrics["losses"])
    assert math.isfinite(metrics["val_loss"]) and metrics["peak_memory_bytes"] > 0
    assert metrics["step_time_s"] is None  # two steps are both warm-up
    assert 0 < metrics["trainable_params"] <= metrics["total_params"]
    assert (metrics["trainable_params"] == metrics["total_params"]) == (method == "full")
    weights = "trained.safetensors" if method in ("full", "bias", "norm") else "adapter.safetensors"
    assert (tmp_path / weights).exists() and (tmp_path / "checkpoint.json").exists()
    assert not list(tmp_path.glob(".tmp-*"))
    assert "step 2/2" in capsys.readouterr().out  # no terminal: log lines instead of a bar


def test_loss_decreases_on_phantoms(tmp_path):
    code, metrics = finetune(tmp_path, "--method", "tenvoo-l", "--steps", "20", "--lr", "1e-3",
                             "--num-volumes", "4", "--seed", "0")
    assert code == 0
    losses = metrics["losses"]
    assert statistics.fmean(losses[-5:]) < 0.75 * statistics.fmean(losses[:5]), losses
    assert metrics["step_time_s"] > 0 and metrics["volumes_per_s"] > 0


def test_nifti_folder_trains(tmp_path):
    data = write_nifti(tmp_path / "data")
    code, metrics = finetune(tmp_path / "run", "--data", str(data), "--steps", "2")
    assert code == 0
    assert (metrics["num_train"], metrics["num_val"]) == (2, 1)
    assert math.isfinite(metrics["val_loss"])
    code, metrics = finetune(tmp_path / "run2", "--data", str(data), "--steps", "1",
                             "--spacing", "2", "2", "2", "--size", "8", "8", "8")
    assert code == 0 and metrics["size"] == [8, 8, 8]


def _corrupt(tmp_path):
    folder = write_nifti(tmp_path / "data")
    bad = folder / "vol1.nii.gz"
    bad.write_bytes(b"this is not a NIfTI file" * 10)
    return folder, bad


@pytest.mark.parametrize("case", ["missing", "empty", "corrupt"])
def test_bad_data_folder_fails_cleanly(case, tmp_path, capsys):
    if case == "missing":
        folder = named = tmp_path / "nope"
    elif case == "empty":
        folder = named = tmp_path / "empty"
        folder.mkdir()
        (folder / "notes.txt").write_text("no volumes here")
    else:
        folder, named = _corrupt(tmp_path)
    code, metrics = finetune(tmp_path / "run", "--data", str(folder), "--steps", "1")
    err = capsys.readouterr().err
    assert code == 2 and metrics is None
    assert err.startswith("error: ") and str(named) in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["--size", "16", "12", "16"], "multiple of 8"),
    (["--amp", "fp16"], "fp16 needs a CUDA device"),
    (["--rank", "0"], "rank must be"),
    (["--targets", "no_such_layer"], "match no module"),
    (["--base-weights", "missing.pt"], "missing.pt: no such file"),
])
def test_bad_options_fail_cleanly(args, message, tmp_path, capsys):
    code, _ = finetune(tmp_path / "run", *args)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err, err


def test_base_weights_load_and_mismatch_is_refused(tmp_path, capsys):
    torch.manual_seed(7)
    base = build_tiny_unet().state_dict()
    torch.save(base, tmp_path / "base.pt")
    code, metrics = finetune(tmp_path / "run", "--base-weights", str(tmp_path / "base.pt"),
                             "--dry-run")
    assert code == 0
    del base["conv_in.conv.weight"]
    torch.save(base, tmp_path / "bad.pt")
    code, _ = finetune(tmp_path / "run2", "--base-weights", str(tmp_path / "bad.pt"))
    err = capsys.readouterr().err
    assert code == 2 and "does not fit the tiny UNet" in err and "conv_in.conv.weight" in err


@pytest.mark.parametrize("method", ["tenvoo-l", "bias"])
def test_resume_continues_to_the_total(method, tmp_path):
    code, first = finetune(tmp_path, "--method", method, "--steps", "2")
    assert code == 0
    code, resumed = finetune(tmp_path, "--method", method, "--steps", "4", "--resume")
    assert code == 0
    assert resumed["steps"] == 4 and len(resumed["losses"]) == 4
    assert resumed["losses"][:2] == first["losses"]
    assert json.loads((tmp_path / "checkpoint.json").read_text())["step"] == 4


def test_resume_with_other_options_is_refused(tmp_path, capsys):
    assert finetune(tmp_path, "--steps", "1")[0] == 0
    code, metrics = finetune(tmp_path, "--method", "lora", "--steps", "2", "--resume")
    err = capsys.readouterr().err
    assert code == 2 and "--resume" in err and "--method (saved 'tenvoo-l', now 'lora')" in err
    assert metrics["steps"] == 1  # the saved run is untouched
    code, _ = finetune(tmp_path / "fresh", "--resume")
    assert code == 2 and "checkpoint.json not found" in capsys.readouterr().err


@pytest.mark.parametrize("method, trainable", [("tenvoo-l", 601024), ("tenvoo-q", 603904)])
def test_dry_run_paper_preset_counts(method, trainable, tmp_path):
    code = main(["finetune", "--preset", "paper", "--method", method, "--device", "cpu",
                 "--dry-run", "--out", str(tmp_path)])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert code == 0 and metrics["trainable_params"] == trainable
    assert metrics["size"] == [128, 128, 96] and metrics["losses"] == []
    assert metrics["adapted_layers"] == 111 and not (tmp_path / "state.pt").exists()


def test_profile_writes_trace_and_table(tmp_path, capsys):
    code, _ = finetune(tmp_path, "--steps", "2", "--profile")
    assert code == 0
    assert json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    table = (tmp_path / "profile.txt").read_text()
    assert "peak memory" in table and "Self CPU" in table
    assert "top ops by self time" in capsys.readouterr().out


def test_ddp_two_cpu_processes(tmp_path):
    script = shutil.which("tenvoo-fast")
    command = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2"]
               + (["--no-python", script] if script else ["-m", "tenvoo_fast"])
               + ["finetune", "--preset", "tiny", "--device", "cpu", "--steps", "2", "--accum",
                  "1", "--num-volumes", "4", "--out", str(tmp_path)])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and len(metrics["losses"]) == 2
    assert result.stdout.count("tenvoo-fast finetune:") == 1  # only rank 0 reports
