"""One federated run's model and its rounds, independent of the transport: the options, the
model every party builds identically (same seed: the same base and the same adapter
initialisation, θ0), what a client does with a round's payload (train, validate, adapt), and
what the server does with the replies (:func:`aggregate`). :mod:`.flower_app` carries these
between a Flower server and its clients.

A payload is safetensors bytes. With ``factors`` aggregation it is the global adapter. With
``exact`` aggregation it is every merge so far (each round's clients' adapters and weights),
which a client replays on its own copy of the base: the merged base weights never travel.
"""
from __future__ import annotations

import json
import struct
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import Mapping, Optional

import torch
from safetensors.torch import load, save

from ...model import AdapterConfig, inject
from ...model.presets import PAPER_DDPM_TARGETS
from ..finetune import AMP_DTYPES, base_unet, volume_size
from ..training import SCHEDULER, optimizer_step, validation_loss
from .aggregation import LAMBDA_DECAY, merge_exact, scheme_weights, weighted_mean
from .clients import client_volumes
from .wire import encode, load_trained, trained_state


@dataclass
class FederatedOptions:
    """A federated run's options, with their defaults (what ``tenvoo-fast federated`` parses)."""
    preset: str = "tiny"
    method: str = "tenvoo-l"
    rank: int = 4
    targets: list = field(default_factory=lambda: list(PAPER_DDPM_TARGETS))
    trainable: list = field(default_factory=lambda: ["bias", "norm"])
    base_weights: Optional[str] = None
    clients: int = 3
    client_data: Optional[list] = None
    num_volumes: list = field(default_factory=lambda: [8])   # one for all, or one per client
    size: Optional[list] = None
    rounds: int = 3
    local_steps: int = 4
    local_adaptation: int = 0
    lr: float = 1e-3
    batch_size: int = 1
    aggregation: str = "fedavg"
    mode: str = "exact"
    lam: float = 0.2
    seed: int = 0
    backend: str = "auto"
    strategy: str = "auto"
    amp: str = "none"
    device: str = "cpu"
    out: str = "runs/federated"
    resume: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "FederatedOptions":
        return cls(**json.loads(text))


#: Node-config keys a client's SuperNode may set, and the option each sets.
NODE_KEYS = {"data": "client_data", "base-weights": "base_weights", "device": "device"}


def node_options(opts: FederatedOptions, client: int, node_config: Mapping) -> FederatedOptions:
    """``opts`` as client ``client`` runs them: its node config's data folder, base weights and
    device in place of the server's."""
    changes = {}
    for key, field_name in NODE_KEYS.items():
        value = node_config.get(key)
        if value in (None, ""):
            continue
        if field_name == "client_data":
            folders = list(opts.client_data or [None] * opts.clients)
            folders[client] = str(value)
            value = folders
        changes[field_name] = value
    return replace(opts, **changes) if changes else opts


def build_model(opts: FederatedOptions):
    """The base UNet with the adapters at θ0: identical on every party (seeded)."""
    torch.manual_seed(opts.seed)
    model = base_unet(opts.preset, opts.base_weights, say=lambda *_: None)
    inject(model, AdapterConfig(method=opts.method, rank=opts.rank,
                                target_modules=list(opts.targets),
                                trainable=tuple(opts.trainable)))
    return model.to(opts.device)


def encode_payload(tensors: dict, meta: dict) -> bytes:
    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                metadata={"meta": json.dumps(meta)})


def decode_payload(data: bytes) -> tuple[dict, dict]:
    """(tensors, metadata) of :func:`encode_payload`'s bytes (the metadata from the safetensors
    header: 8 bytes of length, then JSON)."""
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    return load(data), json.loads(header.get("__metadata__", {}).get("meta", "{}"))


def merges_payload(history: list) -> bytes:
    """The ``exact`` payload: every merge so far, ``[(weights, states), ...]``."""
    tensors, meta = {}, []
    for r, (weights, states) in enumerate(history):
        meta.append(weights)
        for c, state in enumerate(states):
            tensors.update({f"m{r}.c{c}.{k}": v for k, v in state.items()})
    return encode_payload(tensors, {"merges": meta})


def replay_history(data: bytes) -> list:
    """The merges in an ``exact`` payload, as :func:`merges_payload` takes them."""
    tensors, meta = decode_payload(data)
    history = []
    for r, weights in enumerate(meta["merges"]):
        states = []
        for c in range(len(weights)):
            prefix = f"m{r}.c{c}."
            states.append({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        history.append((weights, states))
    return history


def tentative_payload(opts: FederatedOptions, history: list, states: list, weights: list) -> bytes:
    """The payload ``states`` aggregated with ``weights`` would give, nothing changed (what
    Rate-My-LoRA has the clients rate)."""
    if opts.mode == "factors":
        return encode_payload(weighted_mean(states, weights), {})
    return merges_payload(history + [(weights, states)])


def apply_payload(model, data: bytes, mode: str) -> None:
    """Bring a freshly built model to the round's global state."""
    if mode == "factors":
        load_trained(model, decode_payload(data)[0])
        return
    for weights, states in replay_history(data):
        merge_exact(model, states, weights)


def _client_data(opts: FederatedOptions, client: int):
    size = volume_size(opts.preset, opts.size)
    data = opts.client_data[client] if opts.client_data else None
    n = opts.num_volumes[client] if len(opts.num_volumes) > 1 else opts.num_volumes[0]
    return client_volumes(client, size, opts.seed, data=data, num_volumes=n)


@contextmanager
def _running(opts: FederatedOptions):
    """The backend and strategy a client trains and validates with (finetune's)."""
    from ...dispatch import use_backend, use_strategy
    with use_backend(opts.backend), use_strategy(opts.strategy, strict=False):
        yield


def _autocast(opts: FederatedOptions):
    dtype = AMP_DTYPES[opts.amp]
    return partial(torch.autocast, torch.device(opts.device).type, dtype=dtype,
                   enabled=dtype is not None)


def _inferer():
    from monai.inferers import DiffusionInferer
    from monai.networks.schedulers import DDPMScheduler
    return DiffusionInferer(DDPMScheduler(**SCHEDULER))


def local_training(model, opts: FederatedOptions, client: int, round_: int, steps: int) -> float:
    """``steps`` optimizer steps of the DDPM objective on the client's data (Adam restarted);
    returns the mean loss."""
    from torch.utils.data import DataLoader
    train, _, _ = _client_data(opts, client)
    device = torch.device(opts.device)
    generator = torch.Generator().manual_seed((opts.seed * 7919 + client) * 7919 + round_)
    loader = DataLoader(train, batch_size=opts.batch_size, shuffle=True, generator=generator)

    def batches():
        while True:
            yield from loader
    stream = batches()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=opts.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    noise = torch.Generator(device).manual_seed(generator.initial_seed() + 1)
    inferer = _inferer()
    with _running(opts):
        losses = [optimizer_step(model, stream, inferer, optimizer, scaler, _autocast(opts), 1,
                                 device, 1, noise)[0] for _ in range(steps)]
    return sum(losses) / len(losses)


def client_validation(model, opts: FederatedOptions, client: int) -> Optional[float]:
    _, val, _ = _client_data(opts, client)
    with _running(opts):
        return validation_loss(model, val, _inferer(), _autocast(opts),
                               torch.device(opts.device), opts.seed)


def client_train(opts: FederatedOptions, client: int, round_: int, payload: bytes) -> dict:
    """A client's round: the global state, ``local_steps`` of training; returns its trained
    tensors (bytes), its number of training volumes and its loss."""
    model = build_model(opts)
    apply_payload(model, payload, opts.mode)
    loss = local_training(model, opts, client, round_, opts.local_steps)
    train, _, _ = _client_data(opts, client)
    return {"adapter": encode(trained_state(model)), "volumes": len(train),
            "train_loss": loss}


def client_evaluate(opts: FederatedOptions, client: int, payload: bytes,
                    adapt_steps: int = 0) -> dict:
    """The client's validation loss of the global state, after ``adapt_steps`` of local
    adaptation (0: as aggregated)."""
    model = build_model(opts)
    apply_payload(model, payload, opts.mode)
    if adapt_steps:
        local_training(model, opts, client, 10_000, adapt_steps)
    return {"val_loss": client_validation(model, opts, client)}


def aggregate(opts: FederatedOptions, round_: int, replies: dict, history: list,
              server_model, weights: list) -> bytes:
    """Fold the clients' trained tensors (``replies``: client -> decoded state), weighted by
    ``weights`` (client order), into the global state; returns the next payload."""
    states = [replies[c] for c in sorted(replies)]
    if opts.mode == "factors":
        mean = weighted_mean(states, weights)
        load_trained(server_model, mean)
        return encode_payload(mean, {})
    history.append((weights, states))
    merge_exact(server_model, states, weights)
    return merges_payload(history)


def round_weights(opts: FederatedOptions, round_: int, sizes: list, previous, current) -> list:
    """This round's weights; Rate-My-LoRA's λ decays 5% a round from ``opts.lam``."""
    lam = opts.lam * LAMBDA_DECAY ** (round_ - 1)
    return scheme_weights(opts.aggregation, sizes, previous=previous, current=current, lam=lam)
