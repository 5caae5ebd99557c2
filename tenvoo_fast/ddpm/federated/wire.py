"""What crosses the wire in a federated round: a model's trained tensors (adapter cores, the
biases and norms that train; nothing of the frozen base) as safetensors bytes."""
from __future__ import annotations

from typing import Optional

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


def fit_problem(state: dict, reference: dict) -> Optional[str]:
    """Why trained tensors ``state`` do not fit a model training ``reference`` (name -> shape),
    or None."""
    unknown = sorted(set(state) - set(reference))
    missing = sorted(set(reference) - set(state))
    if unknown or missing:
        return (f"{len(unknown)} tensors the model does not train, {len(missing)} missing "
                f"(e.g. {(unknown or missing)[0]})")
    for name, shape in reference.items():
        if tuple(state[name].shape) != tuple(shape):
            return f"{name} has shape {list(state[name].shape)}, the model's {list(shape)}"
    return None


@torch.no_grad()
def load_trained(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy received trained tensors into ``model``; a tensor the model does not train, or of
    another shape, is an error naming it (an adapter that does not fit the model)."""
    params = {n: p for n, p in unwrap(model).named_parameters() if p.requires_grad}
    problem = fit_problem(tensors, {n: p.shape for n, p in params.items()})
    if problem is not None:
        raise RunError(f"the received adapter does not fit this model: {problem}")
    for name, value in tensors.items():
        params[name].copy_(value.to(params[name].device, params[name].dtype))
