"""Generating volumes from a fine-tuned UNet (``tenvoo-fast sample``).

The base UNet is built exactly as ``tenvoo-fast finetune`` builds it (same preset, ``--seed``
and ``--base-weights``), the adapter from a finetune run is loaded and merged, and each volume is
generated from noise with DDPM ancestral sampling or DDIM (ddpm-finetuning.md, "Evaluation"),
with finetune's noise schedule. Writes ``DIR/sample_XXX.nii.gz`` (float32, identity affine) and
``DIR/sample_XXX.png`` (the three mid-slices).

An adapter only reproduces its fine-tuned model on the base it was trained on. The file records
that base (its preset, seed and base-weights file, and a fingerprint of its weights); a base
built here that differs is reported as one ``warning:`` line, or refused with ``--strict-base``.
Every option, the adapter file and ``--out`` are checked before anything is sampled.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import AdapterError, RunError, one_line
from ..files import atomic_path, check_writable_folder
from ..model import BaseMismatchWarning, merge_and_unload
from ..model.adapter_file import FORMAT as ADAPTER_FORMAT, load_adapter, read_adapter_metadata
from . import finetune
from .system import mix_seed

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
    ``opts.adapter`` (if any) loaded and merged; in eval mode.

    A base that differs from the one the adapter was trained on is a ``warning:`` line on
    stderr, or with ``opts.strict_base`` a :class:`RunError`; so is an adapter of another
    preset (always an error: the architectures differ)."""
    strict = bool(getattr(opts, "strict_base", False))
    origin = checks = None
    if opts.adapter is not None:
        path = check_adapter_file(opts.adapter)
        origin, fingerprinted, source = adapter_origin(path)
        if origin and origin.get("preset") not in (None, opts.preset):
            raise RunError(f"--preset {opts.preset}: the adapter {path} was trained on the "
                           f"{origin['preset']} UNet ({source}); pass --preset "
                           f"{origin['preset']}, with --size as in that run")
        checks = fingerprinted
        if not checks:
            # Nothing to compare the built base with: judge from the recorded origin.
            for problem in _origin_mismatches(origin, opts):
                _base_mismatch(f"--adapter {path} ({source}): {problem}", strict)
    torch.manual_seed(opts.seed)  # as finetune does right before building: the same weights
    model = finetune.base_unet(opts.preset, opts.base_weights)
    _check_finite(model, "--base-weights " + str(opts.base_weights) if opts.base_weights
                  else f"the random {opts.preset} UNet")
    if opts.adapter is not None:
        _load(model, path, origin, checks, opts, strict)
        _check_finite(model, f"--adapter {path}",
                      "the run that wrote it diverged; use an earlier checkpoint of it")
        model = merge_and_unload(model)
    return model.eval()


def check_adapter_file(adapter: str | os.PathLike) -> Path:
    """``adapter`` as a path, or a :class:`RunError` naming ``--adapter`` unless it is a
    readable tenvoo_fast adapter file."""
    from safetensors import safe_open

    path = Path(adapter)
    where = f"--adapter {path}"
    if path.is_dir():
        inside = path / finetune.ADAPTER
        raise RunError(f"{where}: is a folder; pass the adapter file"
                       + (f", e.g. {inside}" if inside.is_file() else
                          f" ({finetune.ADAPTER}) a finetune run wrote"))
    if not path.is_file():
        raise RunError(f"{where}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise RunError(f"{where}: not a safetensors file ({one_line(e)}); pass the "
                       f"{finetune.ADAPTER} a finetune run wrote") from e
    if meta.get("format") != ADAPTER_FORMAT:
        hint = (f"; a baseline run's {finetune.TRAINED} (--method full, bias or norm) holds "
                "trained parameters, not an adapter, and cannot be sampled from"
                if path.name == finetune.TRAINED else
                f"; pass the {finetune.ADAPTER} a finetune run wrote")
        raise RunError(f"{where}: a safetensors file but not a tenvoo_fast adapter (no "
                       f"'{ADAPTER_FORMAT}' metadata){hint}")
    try:
        read_adapter_metadata(path)
    except (AdapterError, KeyError, ValueError, TypeError) as e:
        raise RunError(f"{where}: the adapter's configuration cannot be read "
                       f"({_without(one_line(e), path)}); the file is damaged or from an "
                       "incompatible tenvoo_fast version") from e
    return path


def adapter_origin(path: Path) -> tuple[dict | None, bool, str]:
    """What base the adapter in ``path`` was trained on: ``(origin, fingerprinted, source)``.

    ``origin`` holds what is known of ``preset``, ``seed`` and ``base_weights`` (a resolved
    path, or None for random weights), from the file itself
    (:func:`tenvoo_fast.read_adapter_base`) or, for files written before it recorded
    them, from the ``metrics.json`` of the run folder the file is in (None if neither says);
    ``fingerprinted``: whether the file holds a fingerprint of its base weights; ``source``
    names where the origin came from, for messages."""
    base: dict = {}
    try:
        from ..model.adapter_file import read_adapter_base
    except ImportError:  # a tenvoo_fast without base records
        read_adapter_base = None
    if read_adapter_base is not None:
        try:
            base = read_adapter_base(path) or {}
        except (AdapterError, KeyError, ValueError):
            base = {}
    fingerprinted = bool(base.get("fingerprint"))
    if isinstance(base.get("origin"), dict) and base["origin"]:
        return dict(base["origin"]), fingerprinted, "as recorded in the file"
    metrics = path.parent / finetune.METRICS
    try:
        saved = json.loads(metrics.read_text())
    except (OSError, ValueError):
        return None, fingerprinted, ""
    if not isinstance(saved, dict):
        return None, fingerprinted, ""
    origin = {k: saved[k] for k in ("preset", "seed", "base_weights") if k in saved}
    return origin or None, fingerprinted, f"according to {metrics}"


def _origin_mismatches(origin: dict | None, opts) -> list[str]:
    """How the base ``opts`` builds differs from ``origin`` (see :func:`adapter_origin`), each
    with the fix; empty when nothing is known to differ."""
    if not origin:
        return []
    seed, weights = origin.get("seed"), opts.base_weights
    if "base_weights" not in origin:  # only the seed is known, not whether it drew the base
        if weights is None and seed is not None and seed != opts.seed:
            return [f"its run used --seed {seed}; with --seed {opts.seed} and no "
                    "--base-weights the random base UNet differs from the one it was trained "
                    f"on, if that run used random base weights (then pass --seed {seed})"]
        return []
    trained_on = origin["base_weights"]
    if trained_on is None:
        if weights is not None:
            return [f"it was trained on random base weights (--seed {seed}), not on "
                    f"--base-weights {weights}; drop --base-weights"
                    + (f" and pass --seed {seed}" if seed is not None else "")]
        if seed is not None and seed != opts.seed:
            return [f"it was trained on random base weights drawn with --seed {seed}; with "
                    f"--seed {opts.seed} the base UNet differs: pass --seed {seed}"]
        return []
    if weights is None:
        return [f"it was trained on --base-weights {trained_on}, not on random base weights; "
                f"pass --base-weights {trained_on}"]
    if os.path.realpath(weights) != os.path.realpath(str(trained_on)):
        return [f"it was trained on --base-weights {trained_on}, not {weights}; pass "
                f"--base-weights {trained_on} unless these are the same weights"]
    return []


def _load(model, path: Path, origin, checks: bool, opts, strict: bool) -> None:
    """Load the adapter in ``path`` into ``model``; with ``checks``, a base mismatch that
    load_adapter detects is reported (as :func:`_base_mismatch`) with the fix the recorded
    origin gives."""
    mismatch = BaseMismatchWarning if checks else None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if checks:
                load_adapter(model, path, base_mismatch="warn")
            else:
                load_adapter(model, path)
    except AdapterError as e:
        raise RunError(f"--adapter {path}: does not fit the {opts.preset} UNet "
                       f"({_without(one_line(e), path)}); pass the --preset its run used") from e
    for w in caught:
        if mismatch is not None and issubclass(w.category, mismatch):
            # The library's message, less its advice on load_adapter's arguments.
            text = _without(one_line(w.message), path).split(", or pass base_mismatch=")[0]
            fixes = "; ".join(_origin_mismatches(origin, opts))
            if fixes:  # the origin's fix replaces the generic "load it into that base"
                text = text.split(", so its outputs will not be")[0]
            _base_mismatch(f"--adapter {path}: {text}" + (f"; {fixes}" if fixes else ""),
                           strict)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _base_mismatch(message: str, strict: bool) -> None:
    """A base that differs from the adapter's: a :class:`RunError` under ``--strict-base``,
    else one ``warning:`` line on stderr (the samples then come from another model)."""
    if strict:
        raise RunError(f"{message}; --strict-base refuses a base that differs (drop it to "
                       "sample anyway)")
    print(f"warning: {message}; samples from another base do not show the fine-tuned model",
          file=sys.stderr)


def _check_finite(model: torch.nn.Module, what: str,
                  fix: str = "fix or replace the weights") -> None:
    """:class:`RunError` naming ``what`` if any weight of ``model`` is NaN or infinite (every
    sample would be NaN)."""
    bad = [name for name, t in model.state_dict().items()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise RunError(f"{what}: {len(bad)} tensor(s) with NaN or Inf values (e.g. {bad[0]}); "
                       f"{fix}")


def _without(message: str, path: Path) -> str:
    """``message`` without a leading mention of ``path`` (the caller names it already)."""
    for prefix in (str(path), os.fspath(path)):
        if message.startswith(prefix):
            return message[len(prefix):].lstrip(" :") or message
    return message


def run(opts: argparse.Namespace) -> list[Path]:
    """Generate ``opts.num`` volumes as ``opts`` (the ``tenvoo-fast sample`` options) says and
    write them; returns the NIfTI paths."""
    from monai.inferers import DiffusionInferer

    size = finetune.volume_size(opts.preset, opts.size)
    steps = opts.steps or DEFAULT_STEPS[opts.scheduler]
    scheduler = make_scheduler(opts.scheduler, steps)
    check_writable_folder(opts.out, "--out")
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
        seed = mix_seed(opts.seed, i)
        noise = torch.randn((1, 1, *size), generator=torch.Generator().manual_seed(seed))
        torch.manual_seed(seed)  # the DDPM steps' noise
        with torch.no_grad():
            volume = inferer.sample(input_noise=noise.to(device), diffusion_model=model,
                                    scheduler=scheduler, verbose=verbose)
        volume = volume[0, 0].float().cpu().numpy()
        nifti = out / f"sample_{i:03d}.nii.gz"
        bad = int((~np.isfinite(volume)).sum())
        if bad:
            raise RunError(f"sample {i + 1}/{opts.num}: the model produced {bad} non-finite "
                           f"voxel(s) (NaN or Inf), so {nifti} and later samples were not "
                           "written; its weights are finite, so sampling itself diverged: "
                           "check the adapter's run (the losses in its metrics.json)")
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
