"""Loading a user's torch weights file into a model, with errors that name the option and say
what does not fit (``finetune --base-weights``, ``evaluate --feature-weights``)."""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from ..errors import RunError, one_line


def read_state_dict(path: str | Path, flag: str) -> dict[str, torch.Tensor]:
    """The state dict in ``path`` (plain, or under ``"state_dict"`` as in training checkpoints;
    ``module.`` prefixes of DataParallel removed), loaded with ``weights_only=True``."""
    path = Path(path)
    where = f"{flag} {path}"
    if path.is_dir():
        raise RunError(f"{where}: is a folder; pass the weights file (a torch state dict, "
                       "e.g. .pt or .pth) itself")
    if not path.is_file():
        raise RunError(f"{where}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = one_line(e)
        # torch's weights_only refusal is a paragraph; keep its one informative clause.
        unpickler = re.search(r"WeightsUnpickler error: (.*?)(?: Check the documentation|$)",
                              reason)
        if unpickler:
            reason = (f"{unpickler.group(1).rstrip('.')}; only tensors and plain containers "
                      "are loaded (weights_only=True)")
        raise RunError(f"{where}: not a readable torch file ({reason})") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise RunError(f"{where}: expected a state dict (names to tensors), or a checkpoint "
                       f"with one under 'state_dict'; got a {type(state).__name__}")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def load_into(model: nn.Module, path: str | Path, flag: str, what: str) -> nn.Module:
    """Load the weights in ``path`` into ``model`` strictly; a mismatch is a :class:`RunError`
    saying it does not fit ``what``, with the counts and an example of each kind of key."""
    return load_state(model, read_state_dict(path, flag), f"{flag} {path}", what)


def load_state(model: nn.Module, state: dict, where: str, what: str) -> nn.Module:
    """:func:`load_into` for a state dict read from ``where`` (an option and its file)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        detail = [f"{len(missing)} missing keys (e.g. {missing[0]})" if missing else "",
                  f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})"
                  if unexpected else "",
                  f"{len(wrong)} keys of another shape (e.g. {wrong[0]}: "
                  f"{tuple(state[wrong[0]].shape)}, expected {tuple(own[wrong[0]].shape)})"
                  if wrong else ""]
        raise RunError(f"{where}: does not fit {what}: "
                       + ", ".join(d for d in detail if d))
    model.load_state_dict(state, strict=True)
    return model
