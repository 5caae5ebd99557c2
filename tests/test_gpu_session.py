"""The device script (benchmarks/gpu_session.sh) rehearsed on the CPU: the same stages and
commands on the tiny preset, so that the one call a lent GPU gets cannot fail on a typo."""
import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_device_script_runs_every_stage_in_rehearsal(tmp_path):
    env = dict(os.environ, REHEARSAL="1", STAGES="tests,paper,graph,memory", STEPS="3",
               OUT=str(tmp_path))
    done = subprocess.run(["bash", "benchmarks/gpu_session.sh"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    log = (tmp_path / "session.log").read_text()
    for stage in ("paper", "graph", "memory"):
        assert f"{stage}: exit 0" in log, log
    assert "done" in log, log
    assert "commit" in (tmp_path / "environment.txt").read_text()
    assert "deselected" in (tmp_path / "tests.log").read_text()     # the -k subset parsed
    paper = json.loads((tmp_path / "paper" / "profile.json").read_text())
    assert [r["method"] for r in paper["rows"]] == ["full", "tenvoo-l", "tenvoo-q"]
    assert all(r["launches"] for r in paper["rows"])                  # --count-launches
    graph = json.loads((tmp_path / "graph" / "profile.json").read_text())
    assert [r["method"] for r in graph["rows"]] == ["full", "tenvoo-l", "tenvoo-q"]
    assert all(r["graph"] for r in graph["rows"])
    memory = json.loads((tmp_path / "memory" / "profile.json").read_text())
    assert all(r["checkpoint_activations"] for r in memory["rows"])
    plain = {r["method"]: r["saved_for_backward_bytes"] for r in paper["rows"]}
    for r in memory["rows"]:
        assert r["saved_for_backward_bytes"] <= 0.4 * plain[r["method"]]
