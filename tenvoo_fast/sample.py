"""Generating volumes from a fine-tuned UNet (``tenvoo-fast sample``).

The base UNet is built exactly as ``tenvoo-fast finetune`` builds it (same preset, ``--seed``
and ``--base-weights``), the adapter from a finetune run is loaded and merged, and each volume is
generated from noise with DDPM ancestral sampling or DDIM (ddpm-finetuning.md, "Evaluation"),
with finetune's noise schedule. Writes ``DIR/sample_XXX.nii.gz`` (float32, identity affine) and
``DIR/sample_XXX.png`` (the three mid-slices).
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

import numpy as np
import torch

from . import finetune
from .checkpoint import load_adapter
from .errors import RunError
from .io import atomic_path
from .model import merge_and_unload

#: Default number of sampling steps per scheduler.
DEFAULT_STEPS = {"ddpm": 1000, "ddim": 250}


def make_scheduler(name: str, steps: int):
    """A MONAI scheduler with finetune's training schedule, set to ``steps`` sampling steps."""
    from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

    if steps > finetune.SCHEDULER["num_train_timesteps"]:
        raise RunError(f"--steps {steps}: at most {finetune.SCHEDULER['num_train_timesteps']} "
                       "(the number of training timesteps)")
    scheduler = (DDPMScheduler if name == "ddpm" else DDIMScheduler)(**finetune.SCHEDULER)
    scheduler.set_timesteps(steps)
    return scheduler


def build_model(opts: argparse.Namespace) -> torch.nn.Module:
    """The base UNet as finetune builds it (seeded by ``opts.seed``), with the adapter of
    ``opts.adapter`` (if any) loaded and merged; in eval mode."""
    if opts.adapter is not None and not Path(opts.adapter).is_file():
        raise RunError(f"--adapter {opts.adapter}: no such file")
    _warn_if_other_seed(opts)
    torch.manual_seed(opts.seed)  # as finetune does right before building: the same weights
    model = finetune.base_unet(opts.preset, opts.base_weights)
    if opts.adapter is not None:
        load_adapter(model, opts.adapter)
        model = merge_and_unload(model)
    return model.eval()


def _warn_if_other_seed(opts) -> None:
    """Random base weights depend on the seed: warn when the adapter's run used another one."""
    if opts.adapter is None or opts.base_weights:
        return
    metrics = Path(opts.adapter).parent / finetune.METRICS
    try:
        saved = json.loads(metrics.read_text())
    except (OSError, ValueError):
        return
    if saved.get("seed") is not None and saved.get("seed") != opts.seed:
        print(f"warning: {metrics} says the adapter was trained with --seed {saved['seed']}; "
              f"with --seed {opts.seed} and no --base-weights the random base UNet differs "
              f"from the one it was trained on (pass --seed {saved['seed']} if that run used "
              "random base weights)", file=sys.stderr)


def run(opts: argparse.Namespace) -> list[Path]:
    """Generate ``opts.num`` volumes as ``opts`` (the ``tenvoo-fast sample`` options) says and
    write them; returns the NIfTI paths."""
    from monai.inferers import DiffusionInferer

    size = finetune.volume_size(opts.preset, opts.size)
    steps = opts.steps or DEFAULT_STEPS[opts.scheduler]
    scheduler = make_scheduler(opts.scheduler, steps)
    device = torch.device(opts.device)
    model = build_model(opts).to(device)
    inferer = DiffusionInferer(scheduler)
    out = Path(opts.out)
    print(f"tenvoo-fast sample: {opts.num} volume(s) of {'x'.join(map(str, size))} from the "
          f"{opts.preset} UNet" + (f" + {opts.adapter} (merged)" if opts.adapter else
                                   " (base model, no adapter)")
          + f", {opts.scheduler} {steps} steps, seed {opts.seed}, {device}")
    paths = []
    verbose = sys.stderr.isatty()
    for i in range(opts.num):
        # Each volume's noise depends only on the seed and its index.
        seed = finetune._mix(opts.seed, i)
        noise = torch.randn((1, 1, *size), generator=torch.Generator().manual_seed(seed))
        torch.manual_seed(seed)  # the DDPM steps' noise
        with torch.no_grad():
            volume = inferer.sample(input_noise=noise.to(device), diffusion_model=model,
                                    scheduler=scheduler, verbose=verbose)
        volume = volume[0, 0].float().cpu().numpy()
        nifti = out / f"sample_{i:03d}.nii.gz"
        save_nifti(volume, nifti)
        save_mid_slices(volume, out / f"sample_{i:03d}.png", title=nifti.name)
        paths.append(nifti)
        print(f"sample {i + 1}/{opts.num}: {nifti} (min {volume.min():.3f}, max "
              f"{volume.max():.3f}, mean {volume.mean():.3f})", flush=True)
    print(f"wrote {opts.num} volume(s) (.nii.gz and .png) to {out}")
    return paths


def save_nifti(volume: np.ndarray, path: Path) -> None:
    """Write ``volume`` as a gzipped NIfTI-1 file (float32, identity affine) atomically."""
    import nibabel

    image = nibabel.Nifti1Image(np.asarray(volume, dtype=np.float32), np.eye(4))
    data = image.to_bytes()
    if str(path).endswith(".gz"):
        data = gzip.compress(data)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def save_mid_slices(volume: np.ndarray, path: Path, title: str = "") -> None:
    """Write the three mid-slices of ``volume`` (D, H, W) side by side as a PNG, atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d, h, w = volume.shape
    slices = [(f"D = {d // 2}", volume[d // 2]), (f"H = {h // 2}", volume[:, h // 2]),
              (f"W = {w // 2}", volume[:, :, w // 2])]
    low, high = float(volume.min()), float(volume.max())
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.4))
    for ax, (label, image) in zip(axes, slices):
        ax.imshow(image, cmap="gray", vmin=low, vmax=high if high > low else low + 1)
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
