"""The diffusion UNets the command line trains: the paper's 3D DDPM model and a tiny model with
the same block structure (ddpm-finetuning.md, "Model")."""
from __future__ import annotations

from torch import nn

#: MONAI ``DiffusionModelUNet`` arguments of the paper's model: 166,669,313 parameters.
PAPER_UNET = dict(spatial_dims=3, in_channels=1, out_channels=1, num_res_blocks=2,
                  channels=(32, 32, 64, 128, 256, 512),
                  attention_levels=(False, False, False, False, True, True),
                  norm_num_groups=32, norm_eps=1e-6, num_head_channels=(0, 0, 0, 0, 256, 512))

#: The tiny model: the paper's layout (attention in the last two levels, so every
#: ``presets.PAPER_DDPM_TARGETS`` pattern matches) but narrow, ~0.3M parameters.
TINY_UNET = dict(spatial_dims=3, in_channels=1, out_channels=1, num_res_blocks=2,
                 channels=(8, 8, 16, 16), attention_levels=(False, False, True, True),
                 norm_num_groups=8, num_head_channels=(0, 0, 16, 16))

PRESETS = {"paper": PAPER_UNET, "tiny": TINY_UNET}

#: Default volume size (D, H, W) per preset: the paper's 128x128x96, and 16^3 for a CPU.
DEFAULT_SIZES = {"paper": (128, 128, 96), "tiny": (16, 16, 16)}


def build_unet(preset: str, **overrides) -> nn.Module:
    """The randomly initialised ``DiffusionModelUNet`` of ``preset`` ("paper" or "tiny"), with
    ``overrides`` of its arguments (``include_fc=False`` for MONAI Generative bases)."""
    from monai.networks.nets import DiffusionModelUNet
    return DiffusionModelUNet(**{**PRESETS[preset], **overrides})


def paper_unet() -> nn.Module:
    """The paper's 3D DDPM UNet."""
    return build_unet("paper")


def build_tiny_unet() -> nn.Module:
    """The tiny UNet: trains on a CPU in seconds; input sides must be multiples of 8."""
    return build_unet("tiny")


def downsampling_factor(preset: str) -> int:
    """Every input side must be a multiple of this: the UNet halves it once per level but the
    last."""
    return 2 ** (len(PRESETS[preset]["channels"]) - 1)
