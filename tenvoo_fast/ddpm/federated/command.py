"""``tenvoo-fast federated``: the run (its flags and checks are :mod:`.flags`), a Flower
simulation in this process, or, with ``--write-app``, the Flower App folder for a real
SuperLink and SuperNodes."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .flags import add_arguments, check, options
from .wire import encode, full_model_bytes, trained_state

__all__ = ["add_arguments", "check", "options", "run"]


def run(args: argparse.Namespace) -> dict:
    from .rounds import build_model
    opts = options(args)
    check(opts)
    if args.write_app:
        from .deployment import run_config, write_app
        folder = write_app(args.write_app, run_config(args))
        print(f"wrote the Flower App {folder}: start a SuperLink and one SuperNode per client "
              f"(--node-config 'partition-id=N data=\"DIR\"'), then flwr run {folder} "
              "CONNECTION --stream")
        return {}
    from .flower_app import simulate
    model = build_model(opts)
    adapter, full = len(encode(trained_state(model))), full_model_bytes(model)
    print(f"tenvoo-fast federated: {opts.clients} clients x {opts.rounds} rounds, {opts.method} "
          f"(rank {opts.rank}) on the {opts.preset} UNet, {opts.aggregation} ({opts.mode}); "
          f"an adapter is {adapter / 2**20:.2f} MiB on the wire, the model "
          f"{full / 2**20:.1f} MiB")
    metrics = simulate(opts)
    out = Path(opts.out)
    for record in metrics["rounds"]:
        losses = ", ".join(f"{c}: {v.get('val_loss', float('nan')):.4f}"
                           for c, v in sorted(record["clients"].items()))
        missing = f"; missing {json.dumps(record['missing'])}" if record["missing"] else ""
        print(f"round {record['round']}: validation loss {losses}{missing}")
    print(f"wrote {out / 'metrics.json'}, {out / 'federated.png'} and the round files")
    return metrics
