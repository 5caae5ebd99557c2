"""The federated run on a real Flower deployment: a SuperLink, one SuperNode per hospital, and
``flwr run``. :data:`server` and :data:`client` are the module-level apps a Flower App's
``pyproject.toml`` names; :func:`write_app` writes that folder with a run's options as its run
config (``tenvoo-fast federated --write-app DIR``).

The server reads its options from the run config (keys: ``tenvoo-fast federated``'s flags
without the dashes; ``flwr run -c 'rounds=5'`` overrides one) and checks them as the command
does. A SuperNode says which client it is and where its own data lives in its node config:
``partition-id`` (required), ``data`` (its NIfTI folder; default: its synthetic phantoms),
``base-weights`` (its copy of the base UNet), ``device`` (``cpu`` or ``cuda``). Hospital paths
never reach the server.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Mapping

from ...errors import RunError
from .flags import add_arguments, check, options
from .rounds import FederatedOptions

#: Run-config keys that are flags without a value.
_SWITCHES = ("resume",)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flwr run (tenvoo_fast federated run config)",
                                     exit_on_error=False)
    add_arguments(parser)
    return parser


def _flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Run-config key -> the command's option (``num-volumes`` -> ``--num-volumes``)."""
    return {a.option_strings[-1][2:]: a for a in parser._actions
            if a.option_strings and a.option_strings[-1].startswith("--")
            and a.dest not in ("help", "write_app")}


def options_from_run_config(run_config: Mapping) -> FederatedOptions:
    """The server's :class:`FederatedOptions` from a Flower run config, parsed and checked by
    the command's own parser (unknown keys and bad values are one-line errors)."""
    parser = _parser()
    known = _flags(parser)
    argv = []
    for key, value in run_config.items():
        if key not in known:
            raise RunError(f"run config key {key!r} is not a tenvoo-fast federated option; "
                           f"use one of {sorted(known)}")
        if key in _SWITCHES:
            argv += [f"--{key}"] if value else []
        elif value != "":          # "" leaves the default (TOML has no None)
            argv += [f"--{key}", *str(value).split()]
    try:
        args = parser.parse_args(argv)
    except (argparse.ArgumentError, SystemExit) as e:
        raise RunError(f"run config: {e}") from None
    opts = options(args)
    check(opts)
    return opts


def _server():
    from flwr.serverapp import ServerApp

    from .flower_app import run_rounds
    app = ServerApp()

    @app.main()
    def main(grid, context):
        opts = options_from_run_config(context.run_config)
        run_rounds(grid, opts)

    return app


def _client():
    from .flower_app import client_app
    return client_app()


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def run_config(args: argparse.Namespace) -> dict:
    """The run config that gives ``tenvoo-fast federated``'s parsed ``args`` (paths made
    absolute: the ServerApp runs where the SuperLink runs)."""
    parser = _parser()
    config = {}
    for key, action in _flags(parser).items():
        value = getattr(args, action.dest)
        if key in ("out", "base-weights") and value:
            value = str(Path(value).resolve())
        if isinstance(value, (list, tuple)):
            value = " ".join(map(str, value)) if key == "size" else ",".join(map(str, value))
        config[key] = "" if value is None else value
    return config


def write_app(folder: str | os.PathLike, config: dict) -> Path:
    """Write the Flower App folder (``pyproject.toml`` naming :data:`server` and
    :data:`client`, ``config`` as its run config) for ``flwr run FOLDER CONNECTION``; the
    folder appears whole or not at all."""
    folder = Path(folder)
    if folder.exists():
        raise RunError(f"--write-app {folder}: exists; choose a new folder")
    lines = ["[build-system]", 'requires = ["hatchling"]', 'build-backend = "hatchling.build"',
             "", "[project]", 'name = "tenvoo-fast-federated"', 'version = "1.0.0"',
             'description = "tenvoo_fast federated DDPM fine-tuning (installed on every node)"',
             "dependencies = []", "", "[tool.hatch.build.targets.wheel]",
             'packages = ["."]', "", "[tool.flwr.app]", 'publisher = "tenvoo_fast"', "",
             "[tool.flwr.app.components]",
             f'serverapp = "{__name__}:server"', f'clientapp = "{__name__}:client"', "",
             "[tool.flwr.app.config]"]
    lines += [f"{key} = {_toml_value(value)}" for key, value in config.items()]
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.") as tmp:
        Path(tmp, "pyproject.toml").write_text("\n".join(lines) + "\n")
        os.rename(tmp, folder)
        os.makedirs(tmp)      # for TemporaryDirectory's cleanup
    return folder


#: The apps ``pyproject.toml`` names (Flower finds them as module attributes).
server = _server()
client = _client()
