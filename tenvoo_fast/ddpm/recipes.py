"""Training recipes: how ``tenvoo-fast finetune`` trains by default, and how the published TenVOO
training script trains (``--recipe published``, or ``--preset published`` for the paper UNet
with it), so that a run can reproduce the authors' or compare the two.

Both share the model, targets, trainables, optimizer, learning rate and DDPM objective; they
differ only in the fields of :class:`Recipe` (the README lists them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Recipe:
    """What differs between the recipes."""
    #: "mean": the micro-batches' losses averaged over the accumulation; "sum": summed (the
    #: published loop backpropagates each micro-batch's loss undivided).
    accumulated_loss: str
    #: An epoch's last optimizer step takes only the micro-batches left in the epoch (the
    #: published loop steps every ``accum`` batches and at the end of each epoch).
    partial_last_step: bool
    #: The run's length when neither --steps nor --epochs is given: (steps, epochs).
    default_length: tuple
    #: Autocast dtype on CUDA when --amp is not given ("fp16" trains with a gradient scaler).
    cuda_amp: str
    #: Validation timesteps: "even" (the same evenly spaced ones every time) or "random"
    #: (uniform, drawn from the run's seed).
    validation_timesteps: str
    #: NIfTI volumes are padded (MONAI's mode "minimum": each border voxel the minimum along
    #: its line) or cropped to this field of view before reorientation, spacing and resizing,
    #: as the published data loader does; None: not.
    field_of_view: Optional[tuple]


RECIPES = {
    "tenvoo_fast": Recipe(accumulated_loss="mean", partial_last_step=False,
                          default_length=(100, None), cuda_amp="bf16",
                          validation_timesteps="even", field_of_view=None),
    "published": Recipe(accumulated_loss="sum", partial_last_step=True,
                        default_length=(None, 10.0), cuda_amp="fp16",
                        validation_timesteps="random", field_of_view=(160, 224, 160)),
}


def micro_batches(step: int, batches_per_epoch: int, accum: int, recipe: Recipe) -> int:
    """How many micro-batches optimizer step ``step`` (1-based) takes."""
    if not recipe.partial_last_step:
        return accum
    index = (step - 1) % steps_per_epoch(batches_per_epoch, accum, recipe)
    return min(accum, batches_per_epoch - index * accum)


def steps_per_epoch(batches_per_epoch: int, accum: int, recipe: Recipe) -> float:
    """Optimizer steps in one epoch (a fraction without partial last steps)."""
    if recipe.partial_last_step:
        return -(-batches_per_epoch // accum)
    return batches_per_epoch / accum


def batches_before(step: int, batches_per_epoch: int, accum: int, recipe: Recipe) -> int:
    """Micro-batches the first ``step`` optimizer steps take."""
    if not recipe.partial_last_step:
        return step * accum
    epochs, rest = divmod(step, steps_per_epoch(batches_per_epoch, accum, recipe))
    return epochs * batches_per_epoch + rest * accum
