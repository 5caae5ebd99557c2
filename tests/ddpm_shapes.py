"""The paper DDPM's layer shapes and test models, written from the spec (not from the package)."""
import torch

#: Distinct (Cin, Cout) of the paper DDPM's 60 adapted 3x3x3 Conv3d layers.
DDPM_CONV_SHAPES = [(32, 32), (32, 64), (64, 32), (64, 64), (64, 128), (96, 32), (96, 64),
                    (128, 64), (128, 128), (128, 256), (192, 64), (192, 128), (256, 128),
                    (256, 256), (256, 512), (384, 128), (384, 256), (512, 256), (512, 512),
                    (768, 256), (768, 512), (1024, 512)]
#: Distinct (in, out) of its 51 adapted Linear layers.
DDPM_LINEAR_SHAPES = [(128, 128), (128, 32), (128, 64), (128, 256), (128, 512), (256, 256),
                      (512, 512)]


def paper_unet(device="cpu"):
    from monai.networks.nets import DiffusionModelUNet
    with torch.device(device):
        return DiffusionModelUNet(
            spatial_dims=3, in_channels=1, out_channels=1, num_res_blocks=2,
            channels=(32, 32, 64, 128, 256, 512),
            attention_levels=(False, False, False, False, True, True), norm_num_groups=32,
            norm_eps=1e-6, num_head_channels=(0, 0, 0, 0, 256, 512))


def tiny_unet(seed=0, channels=(8, 8, 16, 16)):
    """Same block structure as the paper model (attention in the last two levels), tiny."""
    from monai.networks.nets import DiffusionModelUNet
    torch.manual_seed(seed)
    return DiffusionModelUNet(
        spatial_dims=3, in_channels=1, out_channels=1, num_res_blocks=2, channels=channels,
        attention_levels=(False, False, True, True), norm_num_groups=8, norm_eps=1e-6,
        num_head_channels=(0, 0, channels[2], channels[3]))
