"""The federated run on Flower: a ``ServerApp`` whose main loop sends each round's payload to
every client, aggregates what comes back (:mod:`.rounds`) and records the round, and a
``ClientApp`` that trains and validates. By default both run in one process through Flower's
simulation engine (:func:`simulate`); :mod:`.deployment` runs the same apps on a real SuperLink
and SuperNodes.

Every message carries safetensors bytes (one uint8 array) and a few numbers; a client that
fails or does not answer in time is left out of the round and named in the metrics.
"""
from __future__ import annotations

import time

import numpy as np

from ...errors import RunError
from .record import Recorder
from .rounds import (FederatedOptions, aggregate, apply_payload, build_model, client_evaluate,
                     client_train, decode_payload, encode_payload, merges_payload,
                     node_options, replay_history, round_weights, tentative_payload)
from .wire import fit_problem, full_model_bytes, trained_state

#: How long the server waits (s) for the clients to connect, for each to answer its first
#: query (a client app first loads torch and the model stack: over two minutes was seen on a
#: loaded 2-core machine), and for each round's replies.
CONNECT_TIMEOUT_S = 120.0
FIRST_QUERY_TIMEOUT_S = 900.0
ROUND_TIMEOUT_S = 3600.0


def _bytes_record(data: bytes):
    from flwr.app import Array, ArrayRecord
    return ArrayRecord({"bytes": Array(np.frombuffer(data, dtype=np.uint8))})


def _record_bytes(record) -> bytes:
    return record["bytes"].numpy().tobytes()


def client_app():
    """The ClientApp: ``train`` (local training on this node's data) and ``evaluate``
    (validation loss of the global state, after optional local adaptation)."""
    from flwr.app import Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    def _client(context: Context) -> int:
        if "partition-id" not in context.node_config:
            raise RunError("this SuperNode has no partition-id in its node config; start it "
                           "with --node-config 'partition-id=N' (N: its client index)")
        return int(context.node_config["partition-id"])

    def _options(config, context: Context, client: int) -> FederatedOptions:
        opts = FederatedOptions.from_json(config["options"])
        if not 0 <= client < opts.clients:
            raise RunError(f"partition-id={client} in this SuperNode's node config, but the run "
                           f"has {opts.clients} clients (0 to {opts.clients - 1})")
        return node_options(opts, client, context.node_config)

    @app.train()
    def train(msg: Message, context: Context):
        _torch_imported()
        config = msg.content["config"]
        client = _client(context)
        opts = _options(config, context, client)
        _maybe_fail(client, int(config["round"]))
        began = time.perf_counter()
        out = client_train(opts, client, int(config["round"]),
                           _record_bytes(msg.content["payload"]))
        metrics = MetricRecord({"client": client, "volumes": out["volumes"],
                                "train_loss": out["train_loss"],
                                "seconds": time.perf_counter() - began})
        return Message(RecordDict({"payload": _bytes_record(out["adapter"]),
                                   "metrics": metrics}), reply_to=msg)

    @app.query()
    def query(msg: Message, context: Context):
        return Message(RecordDict({"metrics": MetricRecord({"client": _client(context)})}),
                       reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context):
        _torch_imported()
        config = msg.content["config"]
        client = _client(context)
        opts = _options(config, context, client)
        out = client_evaluate(opts, client, _record_bytes(msg.content["payload"]),
                              int(config["adapt_steps"]))
        value = out["val_loss"]
        return Message(RecordDict({"metrics": MetricRecord(
            {"client": client, "val_loss": float("nan") if value is None else value})}),
            reply_to=msg)

    return app


def _torch_imported() -> None:
    """Flower's torch helpers check ``sys.modules`` for torch; a client process may not have
    imported it yet when a message arrives."""
    import importlib
    importlib.import_module("torch")


def _maybe_fail(client: int, round_: int) -> None:
    """Test hook: ``TENVOO_FAST_FAIL_CLIENT=C:R`` makes client C fail in round R (a dropped
    client)."""
    import os
    spec = os.environ.get("TENVOO_FAST_FAIL_CLIENT", "")
    if spec and spec == f"{client}:{round_}":
        raise RuntimeError(f"client {client} dropped in round {round_} (TENVOO_FAST_FAIL_CLIENT)")


def server_app(opts: FederatedOptions, result: dict):
    """The ServerApp: :func:`run_rounds` on Flower's grid; the metrics land in ``result``."""
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid, context):
        result.update(run_rounds(grid, opts))

    return app


def _wait_for_nodes(grid, n: int) -> list[int]:
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= n:
            return nodes
        if time.monotonic() > deadline:
            raise RunError(f"federated: {len(nodes)} of {n} clients connected within "
                           f"{CONNECT_TIMEOUT_S:.0f} s; start the others, or pass --clients "
                           f"{len(nodes)}")
        time.sleep(0.5)


def _exchange(grid, nodes: dict, kind: str, payload: bytes, config: dict) -> tuple[dict, dict]:
    """Send ``payload`` and ``config`` to every node (``nodes``: node id -> client); (client ->
    reply content, client -> why it is missing)."""
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict
    message_type = MessageType.TRAIN if kind == "train" else MessageType.EVALUATE
    messages = [Message(RecordDict({"payload": _bytes_record(payload),
                                    "config": ConfigRecord(config)}),
                        dst_node_id=node, message_type=message_type) for node in nodes]
    replies, missing = {}, {nodes[node]: "no reply" for node in nodes}
    for reply in grid.send_and_receive(messages, timeout=ROUND_TIMEOUT_S):
        client = nodes[reply.metadata.src_node_id]
        if reply.has_error():
            reason = reply.error.reason.strip().splitlines() or ["unknown"]
            missing[client] = f"failed: {reason[-1][:200]}"
            continue
        replies[client] = reply.content
        missing.pop(client, None)
    return replies, missing


def _clients(grid, n: int) -> dict[int, int]:
    """Node id -> client index (its partition, which picks its data), asked once."""
    from flwr.app import Message, MessageType, RecordDict
    nodes = _wait_for_nodes(grid, n)
    messages = [Message(RecordDict({}), dst_node_id=node, message_type=MessageType.QUERY)
                for node in nodes]
    found = {}
    for reply in grid.send_and_receive(messages, timeout=FIRST_QUERY_TIMEOUT_S):
        if not reply.has_error():
            found[reply.metadata.src_node_id] = int(reply.content["metrics"]["client"])
    if len(found) < n:
        raise RunError(f"federated: {len(found)} of {n} clients answered the first query")
    if len(set(found.values())) < len(found):
        raise RunError(f"federated: SuperNodes with the same partition-id {sorted(found.values())}"
                       "; give each its own, 0 to clients - 1")
    return found


def run_rounds(grid, opts: FederatedOptions) -> dict:
    """The server's loop: rounds from the last finished one to ``opts.rounds``; each trains on
    every client, weighs and aggregates the replies, has every client validate the result, and
    is recorded before the next starts."""
    nodes = _clients(grid, opts.clients)
    recorder = Recorder(opts)
    done, payload, previous = recorder.start()
    server_model = build_model(opts)
    reference = {k: tuple(v.shape) for k, v in trained_state(server_model).items()}
    history: list = []
    if payload is None:
        payload = (encode_payload(trained_state(server_model), {}) if opts.mode == "factors"
                   else merges_payload([]))
    else:
        apply_payload(server_model, payload, opts.mode)
        if opts.mode == "exact":
            history = replay_history(payload)
    full = full_model_bytes(server_model)
    config = {"options": opts.to_json()}
    for r in range(done + 1, opts.rounds + 1):
        began = time.perf_counter()
        replies, missing = _exchange(grid, nodes, "train", payload, {**config, "round": r})
        states, clients = {}, {}
        for c, content in sorted(replies.items()):
            data = _record_bytes(content["payload"])
            state, _ = decode_payload(data)
            problem = fit_problem(state, reference)
            if problem is not None:
                missing[c] = f"its adapter does not fit the server's model: {problem}"
                continue
            states[c] = state
            m = content["metrics"]
            clients[str(c)] = {"volumes": int(m["volumes"]), "train_loss": float(m["train_loss"]),
                               "train_seconds": float(m["seconds"]),
                               "bytes_received": len(data), "bytes_sent": len(payload)}
        if not states:
            raise RunError(f"federated round {r}: no client answered ({missing})")
        order = sorted(states)
        sizes = [clients[str(c)]["volumes"] for c in order]
        rated = None
        if opts.aggregation == "rate-my-lora":
            equal = [1 / len(order)] * len(order)
            trial = tentative_payload(opts, history, [states[c] for c in order], equal)
            answers, _ = _exchange(grid, nodes, "evaluate", trial,
                                   {**config, "adapt_steps": 0})
            rated = {str(c): float(answers[c]["metrics"]["val_loss"]) for c in order
                     if c in answers}
            before = ([previous.get(str(c)) for c in order] if previous else None)
            now = [rated.get(str(c)) for c in order]
            if before is not None and (None in before or None in now):
                before = None          # a client without both rounds' metric: no rating
            weights = round_weights(opts, r, sizes, before, now)
            previous = rated
        else:
            weights = round_weights(opts, r, sizes, None, None)
        payload = aggregate(opts, r, {c: states[c] for c in order}, history, server_model,
                            weights)
        answers, _ = _exchange(grid, nodes, "evaluate", payload, {**config, "adapt_steps": 0})
        for c in order:
            clients[str(c)]["weight"] = weights[order.index(c)]
            if c in answers:
                clients[str(c)]["val_loss"] = float(answers[c]["metrics"]["val_loss"])
        record = {"round": r, "clients": clients, "missing": {str(k): v for k, v in
                                                               missing.items()},
                  "full_model_bytes": full, "seconds": time.perf_counter() - began}
        if rated is not None:
            record["rated_val_loss"] = rated
        recorder.round(record, payload)
    adaptation = None
    if opts.local_adaptation:
        answers, missing = _exchange(grid, nodes, "evaluate", payload,
                                     {**config, "adapt_steps": opts.local_adaptation})
        adaptation = {"steps": opts.local_adaptation,
                      "val_loss": {str(c): float(a["metrics"]["val_loss"])
                                   for c, a in answers.items()}}
    return recorder.finish(adaptation)


def simulate(opts: FederatedOptions) -> dict:
    """The run as a Flower simulation in this process: one SuperNode per client."""
    from flwr.simulation import run_simulation
    result: dict = {}
    run_simulation(server_app(opts, result), client_app(), num_supernodes=opts.clients,
                   backend_config={"client_resources": {"num_cpus": 1}})
    if not result:
        raise RunError("federated: the Flower simulation ended without finishing the run (see "
                       "its log above)")
    return result
