"""What crosses the wire in a federated round: a model's trained tensors (adapter cores, the
biases and norms that train; nothing of the frozen base) as safetensors bytes."""
from __future__ import annotations

import torch
from safetensors.torch import load, save
from torch import nn

from ...errors import RunError
from ...model.inject import unwrap


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter that trains, by name (``<layer>.cores.<i>`` for adapter cores), on the
    CPU."""
    return {n: p.detach().cpu().contiguous() for n, p in unwrap(model).named_parameters()
            if p.requires_grad}


def encode(tensors: dict[str, torch.Tensor]) -> bytes:
    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def decode(data: bytes) -> dict[str, torch.Tensor]:
    return load(data)


def full_model_bytes(model: nn.Module) -> int:
    """What exchanging the whole model would send: every parameter and buffer, as stored."""
    model = unwrap(model)
    return sum(t.numel() * t.element_size() for t in
               list(model.parameters()) + list(model.buffers()))


@torch.no_grad()
def load_trained(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy received trained tensors into ``model``; a tensor the model does not train, or of
    another shape, is an error naming it (an adapter that does not fit the model)."""
    params = {n: p for n, p in unwrap(model).named_parameters() if p.requires_grad}
    unknown = sorted(set(tensors) - set(params))
    missing = sorted(set(params) - set(tensors))
    if unknown or missing:
        raise RunError("the received adapter does not fit this model: "
                       + (f"{len(unknown)} tensors it does not train (e.g. {unknown[0]})"
                          if unknown else f"{len(missing)} of its trained tensors missing "
                          f"(e.g. {missing[0]})"))
    for name, value in tensors.items():
        if tuple(value.shape) != tuple(params[name].shape):
            raise RunError(f"the received adapter does not fit this model: {name} has shape "
                           f"{list(value.shape)}, the model {list(params[name].shape)}")
        params[name].copy_(value.to(params[name].device, params[name].dtype))
