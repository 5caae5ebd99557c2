"""``--checkpoint-activations``: each block of the UNet keeps only its inputs for backward and
runs its forward again there (``torch.utils.checkpoint``, non-reentrant), trading one more
forward of every block for the activations inside it: what lets a larger volume train on a
memory-limited GPU.

The blocks are MONAI ``DiffusionModelUNet``'s down, middle and up blocks; their forwards are
wrapped in place (no module is added, so state dicts, adapter files and checkpoints do not
change). A block rerun in backward computes exactly what it computed in forward (the same ops
on the same inputs; random state restored), so gradients are those of the plain model.
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..measure import note_kept

#: The ``DiffusionModelUNet`` attributes holding the checkpointed blocks.
BLOCKS = ("down_blocks", "middle_block", "up_blocks")


def checkpoint_blocks(model: nn.Module) -> int:
    """Wrap the forward of every block of ``model`` (a ``DiffusionModelUNet``, maybe under
    DDP) in a checkpoint; returns how many. Idempotent."""
    unet = getattr(model, "module", model)
    wrapped = 0
    for name in BLOCKS:
        found = getattr(unet, name, None)
        if found is None:
            raise ValueError(f"--checkpoint-activations: the model has no {name!r}; it "
                             "checkpoints the blocks of MONAI's DiffusionModelUNet")
        for block in (found if isinstance(found, nn.ModuleList) else [found]):
            if not getattr(block.forward, "checkpointed", False):
                block.forward = _checkpointed(block.forward)
            wrapped += 1
    return wrapped


def _checkpointed(forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        # What the checkpoint keeps (its inputs), for a saved-bytes measurement.
        note_kept(list(args) + list(kwargs.values()))
        # Under CUDA graph capture (--graph) the RNG state cannot be read before torch 2.10;
        # the UNet's blocks draw no random numbers (no dropout), so there is nothing to keep.
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        return checkpoint(forward, *args, use_reentrant=False,
                          preserve_rng_state=not capturing, **kwargs)
    run.checkpointed = True
    return run
