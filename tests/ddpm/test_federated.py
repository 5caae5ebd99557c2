"""``tenvoo-fast federated`` through Flower's simulation engine (issue 18): 3 clients on the
tiny preset, one round, then resumed to a second in which client 1 drops out; only adapter
tensors cross the wire; a bad client folder is refused before any client starts."""
import json

import pytest

from tenvoo_fast.ddpm.cli import main

pytest.importorskip("flwr")
pytest.importorskip("ray")

RUN = ["federated", "--preset", "tiny", "--clients", "3", "--num-volumes", "4",
       "--local-steps", "2", "--aggregation", "rate-my-lora"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("federated")
    assert main([*RUN, "--rounds", "1", "--out", str(out)]) == 0
    first = json.loads((out / "metrics.json").read_text())
    mp = pytest.MonkeyPatch()
    mp.setenv("TENVOO_FAST_FAIL_CLIENT", "1:2")
    try:
        assert main([*RUN, "--rounds", "2", "--out", str(out), "--resume",
                     "--local-adaptation", "1"]) == 0
    finally:
        mp.undo()
    return out, first, json.loads((out / "metrics.json").read_text())


def test_rounds_are_recorded_and_resumed(run):
    out, first, metrics = run
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    assert metrics["rounds"][0] == first["rounds"][0]          # round 1 kept as it was
    assert (out / "round-001.safetensors").is_file() and (out / "round-002.safetensors").is_file()
    assert (out / "federated.png").is_file() and metrics["status"] == "finished"
    one = metrics["rounds"][0]
    assert sorted(one["clients"]) == ["0", "1", "2"] and one["missing"] == {}
    assert abs(sum(c["weight"] for c in one["clients"].values()) - 1) < 1e-12
    assert all(c["val_loss"] > 0 for c in one["clients"].values())
    assert sorted(metrics["local_adaptation"]["val_loss"]) == ["0", "1", "2"]


def test_a_dropped_client_is_named_and_the_round_goes_on(run):
    _, _, metrics = run
    two = metrics["rounds"][1]
    assert sorted(two["clients"]) == ["0", "2"]
    assert "1" in two["missing"] and "dropped in round 2" in two["missing"]["1"]
    assert abs(sum(c["weight"] for c in two["clients"].values()) - 1) < 1e-12


def test_only_the_adapter_crosses_the_wire(run):
    from tenvoo_fast.ddpm.federated.rounds import FederatedOptions, build_model
    from tenvoo_fast.ddpm.federated.wire import encode, full_model_bytes, trained_state
    _, _, metrics = run
    model = build_model(FederatedOptions(preset="tiny"))
    adapter = len(encode(trained_state(model)))
    for record in metrics["rounds"]:
        for client in record["clients"].values():
            assert client["bytes_received"] == adapter
        assert record["full_model_bytes"] == full_model_bytes(model)
    # The exact mode's payload: the merges so far (round 2 replays round 1's three adapters).
    assert metrics["rounds"][1]["clients"]["0"]["bytes_sent"] > 3 * adapter


def test_a_bad_client_folder_is_refused_before_any_client_starts(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([*RUN, "--client-data", f"{tmp_path},{tmp_path / 'empty'},{tmp_path}",
                 "--out", str(tmp_path / "out")]) == 2
    assert "--client-data (client 0)" in capsys.readouterr().err
    assert main([*RUN, "--client-data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "1 folders for --clients 3" in capsys.readouterr().err
