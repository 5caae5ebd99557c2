"""``tenvoo-fast finetune`` refuses bad input with one ``error:`` line (exit 2, no traceback) that
names the flag or file, what is wrong and the fix, before anything trains. Through a subprocess,
as a user meets them."""
import os
import subprocess
import sys

import pytest

TINY = ["finetune", "--preset", "tiny", "--device", "cpu", "--num-volumes", "3", "--accum", "1",
        "--steps", "1"]


def refused(*args, cwd=None) -> str:
    """Run the command; assert it failed cleanly and return its one error line."""
    result = subprocess.run([sys.executable, "-m", "tenvoo_fast", *args],
                            capture_output=True, text=True, timeout=300, cwd=cwd)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_out_is_a_file(tmp_path):
    (tmp_path / "taken").write_text("mine")
    line = refused(*TINY, "--out", str(tmp_path / "taken"))
    assert "--out" in line and "is a file, not a folder" in line
    assert (tmp_path / "taken").read_text() == "mine"


def test_out_under_a_file(tmp_path):
    (tmp_path / "taken").write_text("mine")
    line = refused(*TINY, "--out", str(tmp_path / "taken" / "run"))
    assert "--out" in line and "is a file, so no folder can be created under it" in line


def test_out_not_writable_is_found_before_training(tmp_path):
    # Permission bits do not stop root, so the folder is made unwritable for everyone: a file
    # system mounted read-only is not at hand, but /proc is.
    line = refused(*TINY, "--out", "/proc/tenvoo-run")
    assert "--out /proc/tenvoo-run" in line and "cannot" in line


@pytest.mark.parametrize("device, message", [
    ("meta", "runs on cpu or cuda devices, not meta"),
    ("mps", "runs on cpu or cuda devices, not mps"),
    ("tpu9", "not a torch device"),
])
def test_device_that_cannot_train(device, message, tmp_path):
    line = refused(*TINY, "--device", device, "--out", str(tmp_path))
    assert f"--device {device}" in line and message in line
    assert not os.listdir(tmp_path)


def test_spacing_without_data(tmp_path):
    line = refused(*TINY, "--spacing", "1", "1", "1", "--out", str(tmp_path))
    assert "--spacing" in line and "needs --data" in line


def test_rank_too_large_for_memory_on_the_paper_preset(tmp_path):
    # 17 GiB of cores and frozen copies: building may fit this 24 GiB machine, training cannot.
    line = refused("finetune", "--preset", "paper", "--rank", "64", "--device", "cpu",
                   "--out", str(tmp_path))
    assert "--rank 64" in line and "GiB" in line and "smaller --rank" in line
    assert not os.listdir(tmp_path)


def test_resume_state_that_is_something_else(tmp_path):
    import json

    import torch
    assert subprocess.run([sys.executable, "-m", "tenvoo_fast", *TINY, "--out",
                           str(tmp_path)], capture_output=True).returncode == 0
    folder = tmp_path / json.loads((tmp_path / "checkpoint.json").read_text())["folder"]
    torch.save([1, 2, 3], folder / "state.pt")
    line = refused(*TINY, "--steps", "2", "--resume", "--out", str(tmp_path))
    assert str(folder / "state.pt") in line and "not a tenvoo-fast finetune state" in line


def test_bad_option_value_is_one_line(tmp_path):
    line = refused(*TINY, "--lr", "inf", "--out", str(tmp_path))
    assert "--lr" in line and "finite number" in line and "--help" in line
