"""The federated run on a real Flower deployment (issue 18): the Flower App folder that
``tenvoo-fast federated --write-app`` writes, its run config parsed as the command's flags, the
SuperNodes' own data and settings, and one live run (a SuperLink and two SuperNodes on this
machine, ``flwr run``), one of whose clients trains on a NIfTI folder only its node knows."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tenvoo_fast.ddpm.cli import main
from tenvoo_fast.errors import RunError

pytest.importorskip("flwr")
from tenvoo_fast.ddpm.federated import deployment  # noqa: E402
from tenvoo_fast.ddpm.federated.flags import add_arguments, options  # noqa: E402
from tenvoo_fast.ddpm.federated.rounds import FederatedOptions, node_options  # noqa: E402

ARGS = ["--clients", "2", "--num-volumes", "3,4", "--rounds", "1", "--local-steps", "1",
        "--size", "8", "8", "8", "--aggregation", "fedpetuning", "--lambda", "0.3"]


def parsed(argv):
    import argparse
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_the_run_config_gives_the_command_s_options(tmp_path):
    args = parsed([*ARGS, "--out", str(tmp_path / "run"), "--resume"])
    config = deployment.run_config(args)
    assert config["num-volumes"] == "3,4" and config["size"] == "8 8 8"
    assert config["resume"] is True and config["base-weights"] == ""
    assert deployment.options_from_run_config(config) == options(args)


@pytest.mark.parametrize("config,message", [
    ({"rounds": 2, "colour": "red"}, r"run config key 'colour' is not a tenvoo-fast federated "
                                     r"option; use one of \[.*'rounds'"),
    ({"rounds": 0}, r"^run config: argument --rounds: "),
    ({"mode": "average"}, r"^run config: argument --mode: invalid choice"),
    ({"lambda": 1.5}, r"^--lambda 1.5: Rate-My-LoRA's penalty must be in \[0, 1\)"),
])
def test_a_bad_run_config_is_a_one_line_error(config, message):
    with pytest.raises(RunError, match=message):
        deployment.options_from_run_config(config)


def test_a_node_brings_its_own_data_base_and_device():
    opts = FederatedOptions(clients=3)
    assert node_options(opts, 1, {"partition-id": 1, "num-partitions": 3}) is opts
    mine = node_options(opts, 1, {"partition-id": 1, "data": "/site-b/mri",
                                  "base-weights": "/site-b/base.pt", "device": "cuda"})
    assert mine.client_data == [None, "/site-b/mri", None]
    assert (mine.base_weights, mine.device) == ("/site-b/base.pt", "cuda")


def test_the_app_folder_is_a_valid_flower_app_and_never_overwritten(tmp_path, capsys):
    from flwr.cli.config_utils import load_and_validate
    folder = tmp_path / "app"
    assert main(["federated", *ARGS, "--out", str(tmp_path / "run"),
                 "--write-app", str(folder)]) == 0
    assert "flwr run" in capsys.readouterr().out
    config, _ = load_and_validate(folder / "pyproject.toml")    # also imports the components
    app = config["tool"]["flwr"]["app"]
    assert app["components"]["serverapp"].endswith("deployment:server")
    assert deployment.options_from_run_config(app["config"]).num_volumes == [3, 4]
    assert not (tmp_path / "run").exists()                       # written, not run
    assert main(["federated", *ARGS, "--write-app", str(folder)]) == 2
    assert "exists; choose a new folder" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(argv, log: Path, env):
    return subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def test_a_live_superlink_and_two_supernodes(tmp_path):
    """Two SuperNodes (client 1 on a NIfTI folder set only in its node config) and
    ``flwr run`` of the written app: the round is recorded as in a simulation."""
    from tests.ddpm.test_finetune import write_nifti
    bin_dir = Path(sys.executable).parent
    home, out, link = tmp_path / "flwr-home", tmp_path / "run", _free_port()
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "site"\n\n[superlink.site]\naddress = "127.0.0.1:{link}"\n'
        "insecure = true\n")
    env = {**os.environ, "FLWR_HOME": str(home)}
    data = write_nifti(tmp_path / "site-1", n=6, size=(8, 9, 8))
    assert main(["federated", *ARGS, "--out", str(out), "--write-app",
                 str(tmp_path / "app")]) == 0
    processes = [_start([bin_dir / "flower-superlink", "--insecure", "--port", str(link),
                         "--disable-runtime-dependency-installation"], tmp_path / "link.log",
                        env)]
    try:
        time.sleep(3)
        for c, extra in ((0, ""), (1, f' data="{data}"')):
            processes.append(_start(
                [bin_dir / "flower-supernode", "--insecure", "--superlink",
                 f"127.0.0.1:{link}", "--port", str(_free_port()),
                 "--node-config", f"partition-id={c}{extra}"], tmp_path / f"node{c}.log", env))
        run = subprocess.run([bin_dir / "flwr", "run", str(tmp_path / "app"), "site",
                              "--stream"], env=env, capture_output=True, text=True, timeout=400)
        assert run.returncode == 0, run.stdout + run.stderr
    finally:
        for p in processes:
            p.terminate()
        for p in processes:
            p.wait(timeout=30)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "finished" and (out / "round-001.safetensors").is_file()
    (record,) = metrics["rounds"]
    assert record["missing"] == {} and sorted(record["clients"]) == ["0", "1"]
    from tenvoo_fast.ddpm.federated.rounds import _client_data
    opts = deployment.options_from_run_config(deployment.run_config(
        parsed([*ARGS, "--out", str(out)])))
    site_1 = node_options(opts, 1, {"data": str(data)})
    nifti, phantoms = len(_client_data(site_1, 1)[0]), len(_client_data(opts, 1)[0])
    assert record["clients"]["1"]["volumes"] == nifti != phantoms
    assert record["clients"]["0"]["volumes"] == len(_client_data(opts, 0)[0])
    assert all(c["val_loss"] > 0 for c in record["clients"].values())
