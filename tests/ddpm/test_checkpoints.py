"""Long runs survive: periodic and on-signal checkpoints, each one consistent unit published
atomically, and a resume that continues exactly as the uninterrupted run would have.

Runs are killed at every point of a checkpoint write (``TENVOO_FAST_CRASH_AT``, which dies as
``kill -9`` does) and at random moments (a real SIGKILL); after each kill the folder must be
loadable, its adapter and state from one step, and the resumed run equal to the straight one.
"""
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tenvoo_fast.ddpm import finetune as finetune_module
from tenvoo_fast.ddpm import run_checkpoint
from tenvoo_fast.ddpm.cli import build_parser, main

# 4 volumes: 3 train, so an epoch is 3 micro-batches and a step of 2 ends mid-epoch.
TINY = ["finetune", "--preset", "tiny", "--device", "cpu", "--num-volumes", "4", "--accum", "2",
        "--lr", "1e-3"]
CRASH_POINTS = ["files-written", "folder-renamed", "manifest-written", "manifest-published",
                "top-level-adapter.safetensors"]


def run_inprocess(out, *args) -> int:
    return main([*TINY, "--out", str(out), *args])


def run_subprocess(out, *args, env=None, timeout=600) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "tenvoo_fast", *TINY, "--out", str(out), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def metrics(out) -> dict:
    return json.loads((Path(out) / "metrics.json").read_text())


def safetensors_content(path):
    """A safetensors file as (header as a dict, data bytes): the writer orders the JSON header's
    keys differently from one process to the next, so equal files are equal in these."""
    raw = Path(path).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def assert_consistent(out) -> int | None:
    """The run folder holds either no checkpoint or one complete, loadable one whose files are
    of the manifest's step; returns that step."""
    manifest = run_checkpoint.read_manifest(Path(out))
    if manifest is None:
        return None
    folder = Path(out) / manifest["folder"]
    state = torch.load(folder / "state.pt", weights_only=True)
    assert state["step"] == manifest["step"] == len(state["losses"])
    with safe_open(folder / "adapter.safetensors", "pt") as f:
        assert len(list(f.keys())) > 0
    return manifest["step"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted 4-step run everything below is compared with."""
    out = tmp_path_factory.mktemp("straight")
    assert run_inprocess(out, "--steps", "4") == 0
    return out


def assert_same_run(out, straight):
    assert metrics(out)["losses"] == metrics(straight)["losses"]
    assert safetensors_content(out / "adapter.safetensors") == \
        safetensors_content(straight / "adapter.safetensors")


def test_resume_continues_bit_for_bit(straight, tmp_path):
    assert run_inprocess(tmp_path, "--steps", "2") == 0
    assert run_inprocess(tmp_path, "--steps", "4", "--resume") == 0
    assert_same_run(tmp_path, straight)
    a = torch.load(next((tmp_path / "checkpoints").iterdir()) / "state.pt", weights_only=True)
    b = torch.load(next((straight / "checkpoints").iterdir()) / "state.pt", weights_only=True)
    for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert [torch.equal(a["rng"][0]["noise"], b["rng"][0]["noise"])] == [True]


def test_baseline_resume_is_bit_for_bit(tmp_path):
    assert run_inprocess(tmp_path / "a", "--method", "bias", "--steps", "3") == 0
    assert run_inprocess(tmp_path / "b", "--method", "bias", "--steps", "1") == 0
    assert run_inprocess(tmp_path / "b", "--method", "bias", "--steps", "3", "--resume") == 0
    assert metrics(tmp_path / "a")["losses"] == metrics(tmp_path / "b")["losses"]
    assert safetensors_content(tmp_path / "a" / "trained.safetensors") == \
        safetensors_content(tmp_path / "b" / "trained.safetensors")


def test_checkpoint_layout_and_one_folder_kept(tmp_path):
    assert run_inprocess(tmp_path, "--steps", "3", "--save-every", "1") == 0
    manifest = json.loads((tmp_path / "checkpoint.json").read_text())
    assert manifest["step"] == 3 and manifest["files"] == ["adapter.safetensors", "state.pt"]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == \
        [Path(manifest["folder"]).name]
    assert safetensors_content(tmp_path / "adapter.safetensors") == \
        safetensors_content(tmp_path / manifest["folder"] / "adapter.safetensors")
    assert not list(tmp_path.rglob(".tmp-*"))
    assert metrics(tmp_path)["status"] == "finished"


def test_periodic_checkpoints_by_steps_and_minutes(tmp_path, monkeypatch):
    defaults = build_parser().parse_args(["finetune"])
    assert (defaults.save_every, defaults.save_every_minutes) == (500, 10.0)  # README
    published = []
    real = run_checkpoint.publish
    monkeypatch.setattr(run_checkpoint, "publish",
                        lambda out, step, *a, **k: published.append(step) or real(out, step, *a,
                                                                                  **k))
    assert run_inprocess(tmp_path / "steps", "--steps", "5", "--save-every", "2") == 0
    assert published == [2, 4, 5]
    published.clear()
    assert run_inprocess(tmp_path / "time", "--steps", "3", "--save-every", "0",
                         "--save-every-minutes", "1e-9") == 0
    assert published == [1, 2, 3]
    published.clear()
    assert run_inprocess(tmp_path / "end", "--steps", "3") == 0
    assert published == [3]


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_killed_inside_a_checkpoint_write_resumes_exactly(point, straight, tmp_path):
    # Killed while writing the checkpoint of step 2 (the first, of step 1, is complete).
    result = run_subprocess(tmp_path, "--steps", "4", "--save-every", "1",
                            env={"TENVOO_FAST_CRASH_AT": f"{point}:2"})
    assert result.returncode == 137, result.stderr
    step = assert_consistent(tmp_path)
    assert step == (2 if point in ("manifest-published", "top-level-adapter.safetensors") else 1)
    if point != "top-level-adapter.safetensors":
        with safe_open(tmp_path / "adapter.safetensors", "pt") as f:  # the previous one
            assert f.keys()
    result = run_subprocess(tmp_path, "--steps", "4", "--save-every", "1", "--resume")
    assert result.returncode == 0, result.stderr
    leftovers = point != "top-level-adapter.safetensors"  # then the old folder is gone too
    assert ("leftover(s) of an interrupted checkpoint write" in result.stderr) == leftovers
    assert not list(tmp_path.rglob(".tmp-*"))
    assert len(list((tmp_path / "checkpoints").iterdir())) == 1
    assert_same_run(tmp_path, straight)


def test_sigkill_at_random_moments(straight, tmp_path):
    rng = random.Random(0)
    command = [sys.executable, "-m", "tenvoo_fast", *TINY, "--out", str(tmp_path),
               "--steps", "4", "--save-every", "1", "--log-every", "1"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the same threads as the straight run
    kills = 0
    for attempt in range(4):
        resume = ["--resume"] if run_checkpoint.read_manifest(tmp_path) else []
        proc = subprocess.Popen(command + resume, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        # Wait for training to start, then kill at a random moment of the next steps.
        for line in proc.stdout:
            if line.startswith("training:"):
                break
        time.sleep(rng.uniform(0.0, 3.0))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.stdout.read()
        code = proc.wait()
        assert_consistent(tmp_path)
        if code == 0:
            break
        assert code == -signal.SIGKILL
    else:
        resume = ["--resume"] if run_checkpoint.read_manifest(tmp_path) else []
        assert subprocess.run(command + resume, env=env, capture_output=True).returncode == 0
    assert kills >= 1
    assert_same_run(tmp_path, straight)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_and_exits_cleanly(signum, straight, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "tenvoo_fast", *TINY, "--out", str(tmp_path), "--steps", "4",
         "--save-every", "0", "--save-every-minutes", "0", "--log-every", "1"],
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step 1/4"):
            proc.send_signal(signum)
            break
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err
    step = assert_consistent(tmp_path)
    assert step in (1, 2, 3)
    assert f"{signal.Signals(signum).name} at step {step}/4: checkpoint saved" in out
    assert metrics(tmp_path)["status"] == f"interrupted by {signal.Signals(signum).name}"
    assert run_inprocess(tmp_path, "--steps", "4", "--resume", "--save-every", "0") == 0
    assert_same_run(tmp_path, straight)


def test_resume_applies_a_new_lr_and_records_it(tmp_path, capsys):
    assert run_inprocess(tmp_path, "--steps", "2") == 0
    assert run_inprocess(tmp_path, "--steps", "3", "--resume", "--lr", "1e-4") == 0
    out = capsys.readouterr().out
    assert "resume: Adam lr 0.0001 from step 3 (it was 0.001)" in out
    assert "Adam lr 0.0001" in out.split("training:")[-1].splitlines()[0]
    assert metrics(tmp_path)["lr_history"] == [[1, 1e-3], [3, 1e-4]]
    state = torch.load(next((tmp_path / "checkpoints").iterdir()) / "state.pt", weights_only=True)
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [1e-4]


@pytest.mark.parametrize("args, flag", [(["--accum", "1"], "--accum"),
                                        (["--num-volumes", "5"], "--num-volumes"),
                                        (["--seed", "3"], "--seed"),
                                        (["--size", "8", "8", "8"], "--size")])
def test_resume_refuses_options_that_change_the_run(args, flag, tmp_path, capsys):
    assert run_inprocess(tmp_path, "--steps", "1") == 0
    capsys.readouterr()
    assert run_inprocess(tmp_path, "--steps", "2", "--resume", *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume:") and f"{flag} (saved" in err
    assert len(err.strip().splitlines()) == 1
    assert metrics(tmp_path)["steps"] == 1


def test_fresh_run_into_a_run_folder_needs_overwrite(tmp_path, capsys):
    assert run_inprocess(tmp_path, "--steps", "1") == 0
    capsys.readouterr()
    assert run_inprocess(tmp_path, "--steps", "1") == 2
    assert "holds a run (checkpoint of step 1); continue it with --resume, replace it with " \
           "--overwrite" in capsys.readouterr().err
    assert run_inprocess(tmp_path, "--steps", "2", "--overwrite") == 0
    assert metrics(tmp_path)["steps"] == 2 and len(metrics(tmp_path)["losses"]) == 2


def test_resume_refuses_a_state_that_is_something_else(tmp_path, capsys):
    assert run_inprocess(tmp_path, "--steps", "1") == 0
    folder = tmp_path / run_checkpoint.read_manifest(tmp_path)["folder"]
    torch.save({"hello": torch.zeros(1)}, folder / "state.pt")
    capsys.readouterr()
    assert run_inprocess(tmp_path, "--steps", "2", "--resume") == 2
    err = capsys.readouterr().err
    assert "is not a tenvoo-fast finetune state" in err and str(folder / "state.pt") in err
    (folder / "state.pt").write_bytes(b"garbage")
    assert run_inprocess(tmp_path, "--steps", "2", "--resume") == 2
    assert "is not readable" in capsys.readouterr().err
    (tmp_path / "checkpoint.json").write_text("{not json")
    assert run_inprocess(tmp_path, "--steps", "2", "--resume") == 2
    assert "not a readable checkpoint manifest" in capsys.readouterr().err


def _poison_after(monkeypatch, steps_before: int, what: str):
    """Make the run go non-finite: after ``steps_before`` good optimizer steps, poison a
    trained parameter (``what='parameters'``) or the next batch (``what='batch'``)."""
    real = finetune_module.optimizer_step
    calls = []

    def poisoned(source):
        for b in source:
            b = b.clone()
            b.view(-1)[0] = float("nan")
            yield b

    def step(model, batches, *args, **kwargs):
        calls.append(1)
        if len(calls) > steps_before and what == "batch":
            batches = poisoned(batches)
        result = real(model, batches, *args, **kwargs)
        if len(calls) == steps_before and what == "parameters":
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).view(-1)[0] = float("inf")
        return result
    monkeypatch.setattr(finetune_module, "optimizer_step", step)


@pytest.mark.parametrize("what, message", [
    ("batch", "the batch holds NaN or Inf voxels"),
    ("parameters", "the parameters are non-finite"),
])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(what, message, tmp_path,
                                                                   monkeypatch, capsys):
    assert run_inprocess(tmp_path, "--steps", "2") == 0
    good = safetensors_content(tmp_path / "adapter.safetensors")
    _poison_after(monkeypatch, 0 if what == "batch" else 1, what)
    capsys.readouterr()
    save_every = "1" if what == "batch" else "0"
    assert run_inprocess(tmp_path, "--steps", "5", "--resume", "--save-every", save_every) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert message in err and "the last good checkpoint (step 2)" in err, err
    assert run_checkpoint.read_manifest(tmp_path)["step"] == 2
    assert safetensors_content(tmp_path / "adapter.safetensors") == good


def test_non_finite_parameters_are_never_checkpointed(tmp_path, monkeypatch, capsys):
    _poison_after(monkeypatch, 1, "parameters")
    assert run_inprocess(tmp_path, "--steps", "3", "--save-every", "1") == 2
    err = capsys.readouterr().err
    assert "step 1: the update made 1 trained tensor(s) non-finite" in err
    assert "no checkpoint was saved before" in err
    assert not (tmp_path / "adapter.safetensors").exists()


def test_resume_checks_the_base_weights(tmp_path, capsys):
    from tenvoo_fast.ddpm.unets import build_tiny_unet
    torch.manual_seed(5)
    base = build_tiny_unet().state_dict()
    torch.save(base, tmp_path / "base.pt")
    out = tmp_path / "run"
    args = ["--base-weights", str(tmp_path / "base.pt")]
    assert run_inprocess(out, "--steps", "1", *args) == 0
    base["conv_in.conv.weight"].view(-1)[0] += 1.0  # the same file name, other weights
    torch.save(base, tmp_path / "base.pt")
    capsys.readouterr()
    assert run_inprocess(out, "--steps", "2", "--resume", "--strict-base", *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "base weights differ" in err and "adapter" in err
    assert metrics(out)["steps"] == 1
    assert run_inprocess(out, "--steps", "2", "--resume", *args) == 0
    err = capsys.readouterr().err
    assert "warning: --resume:" in err and "base weights differ" in err
    assert len([l for l in err.splitlines() if l.startswith("warning:")]) == 1
