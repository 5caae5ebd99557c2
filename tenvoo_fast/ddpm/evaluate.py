"""Scoring generated volumes against held-out ones (``tenvoo-fast evaluate``).

As in the paper (ddpm-finetuning.md, "Evaluation"):

- **MS-SSIM** between generated and reference (validation) volumes: MONAI's
  ``MultiScaleSSIMMetric`` (3D, data range 1, 5 scales), averaged over every (generated,
  reference) pair. The window is 7 voxels, or 5 (then 3) when the volumes are too small for 5
  scales with a window of 7; MONAI needs every side to be at least ``16 * window`` voxels.
- **FID and MMD** on the global-average-pooled features of a 3D ResNet-50 (MONAI's ``resnet50``
  in Med3D's layout), only when ``--feature-weights`` names its weights: they are not bundled,
  and features of a random network would give numbers that mean nothing. Without weights
  ``fid`` and ``mmd`` are ``null`` and a note says why.

Both folders are read as ``tenvoo-fast finetune --data`` reads a folder (:mod:`tenvoo_fast.ddpm.data`):
RAS orientation, intensities scaled to [0, 1] per volume, and the whole volume resized
(trilinear) to one size: ``--size``, or by default the size of the first generated volume, so
that generated volumes are compared at the size the model produced them.

FID is the Fréchet distance between Gaussian fits of the two feature sets. Its matrix square
root term is computed exactly from the centred feature matrices,
``tr sqrt(S_g S_r) = ||G_c R_c^T||_* / sqrt((n_g - 1)(n_r - 1))`` (the nuclear norm of an
``n_g x n_r`` matrix), instead of ``scipy.linalg.sqrtm`` of a 2048 x 2048 product as MONAI's
``FIDMetric`` does: the result is the same (the tests compare them), but it takes milliseconds
instead of about ten seconds, does not break down when there are fewer volumes than features
(the covariances are then singular), and does not depend on ``sqrtm(..., disp=False)``, which
MONAI 1.6.1 calls and newer SciPy no longer accepts. Features are computed without TF32, so a
GPU gives the CPU's numbers. MMD is MONAI's ``MMDMetric`` (unbiased, linear kernel) on
the same features; being unbiased it can be slightly negative when the sets match.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import math
import sys
from pathlib import Path
from typing import Sequence

import torch

from ..errors import RunError, one_line
from ..files import check_writable_file, finite_json, write_json_atomic
from .system import versions

#: MS-SSIM windows tried, largest first (the paper uses 7, and 5 for small volumes).
MS_SSIM_KERNELS = (7, 5, 3)
#: MONAI's default five MS-SSIM scale weights.
MS_SSIM_SCALES = 5
#: Volumes per batch through MS-SSIM and through the feature network.
BATCH = 4
#: The feature network's output width (ResNet-50 with bottleneck blocks).
FEATURES = 2048
NOT_COMPUTED = ("FID and MMD were not computed: they need the weights of a pretrained 3D "
                "ResNet-50 (Med3D / MedicalNet layout), passed as --feature-weights PATH; "
                "features of a randomly initialised network would not mean anything.")


# --------------------------------------------------------------------------------------------
# Volumes


def ras_shape(path: Path) -> tuple[int, int, int]:
    """The shape of the 3D volume in ``path`` once reoriented to RAS (as data.py loads it)."""
    import nibabel
    from nibabel.orientations import io_orientation

    try:
        image = nibabel.load(path)
        shape = image.header.get_data_shape()[:3]
        order = io_orientation(image.affine)[:, 0]
    except Exception as e:
        raise RunError(f"{path}: not a readable NIfTI file ({one_line(e)})") from e
    out = [0, 0, 0]
    for axis, target in enumerate(order):
        out[int(target)] = int(shape[axis])
    return tuple(out)


def load_volumes(files: Sequence[Path], size: Sequence[int]) -> torch.Tensor:
    """The volumes in ``files`` as one float32 tensor ``(N, 1, *size)`` in [0, 1], loaded as
    finetune loads its data (:class:`tenvoo_fast.ddpm.data.NiftiVolumes`, whole-volume resize); a
    file with a NaN or Inf voxel is refused with a :class:`RunError` naming it."""
    from .data import NiftiVolumes

    volumes = NiftiVolumes(files, size)
    return torch.stack([volumes[i] for i in range(len(volumes))])


def ms_ssim_kernel(size: Sequence[int]) -> int:
    """The largest window of :data:`MS_SSIM_KERNELS` that MONAI's 5-scale MS-SSIM accepts for
    volumes of ``size`` (every side at least ``16 * window``); :class:`RunError` if none."""
    div = (MS_SSIM_SCALES - 1) ** 2
    for kernel in MS_SSIM_KERNELS:
        if all(s // div > kernel - 1 for s in size):
            return kernel
    smallest = MS_SSIM_KERNELS[-1]
    raise RunError(f"volumes of {'x'.join(map(str, size))} are too small for MS-SSIM with "
                   f"{MS_SSIM_SCALES} scales: every side must be at least {div * smallest} "
                   f"voxels (window {smallest}); pass a larger --size")


def ms_ssim(generated: torch.Tensor, reference: torch.Tensor, kernel: int,
            device: torch.device) -> torch.Tensor:
    """MS-SSIM of every (generated, reference) pair, as a ``(G, R)`` tensor."""
    from monai.metrics import MultiScaleSSIMMetric

    metric = MultiScaleSSIMMetric(spatial_dims=3, data_range=1.0, kernel_size=kernel)
    rows = []
    with torch.no_grad():
        for g in generated:
            row = []
            for start in range(0, len(reference), BATCH):
                ref = reference[start:start + BATCH].to(device)
                pred = g.to(device).unsqueeze(0).expand_as(ref)
                row.append(metric(y_pred=pred, y=ref).reshape(-1).double().cpu())
            rows.append(torch.cat(row))
    return torch.stack(rows)


# --------------------------------------------------------------------------------------------
# Features, FID and MMD


def feature_network(path: str | Path, device: torch.device) -> torch.nn.Module:
    """MONAI's 3D ResNet-50 in Med3D's layout (no classifier: it returns the 2048 globally
    average-pooled features), with the weights in ``path``: a state dict, or a checkpoint
    holding one under ``"state_dict"``; ``module.`` prefixes (DataParallel) are removed."""
    from monai.networks.nets import resnet50

    from .weights import load_into

    model = resnet50(spatial_dims=3, n_input_channels=1, feed_forward=False, shortcut_type="B",
                     bias_downsample=False)
    load_into(model, path, "--feature-weights",
              "a 3D ResNet-50 in Med3D's layout (MONAI resnet50, 1 input channel, shortcut B, "
              "no downsample bias)")
    return model.to(device).eval()


def features(model: torch.nn.Module, volumes: torch.Tensor, device: torch.device
             ) -> torch.Tensor:
    """``(N, 2048)`` float64 features of ``volumes`` (each z-scored first, as Med3D's inputs
    were during its pretraining)."""
    out = []
    # Full float32 convolutions (no TF32), so that a GPU gives the CPU's features.
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        for start in range(0, len(volumes), BATCH):
            x = volumes[start:start + BATCH].to(device)
            flat = x.flatten(1)
            mean = flat.mean(1).view(-1, 1, 1, 1, 1)
            std = flat.std(1).clamp_min(1e-6).view(-1, 1, 1, 1, 1)
            out.append(model((x - mean) / std).double().cpu())
    return torch.cat(out)


def frechet_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """FID: the Fréchet distance between Gaussian fits of the rows of ``x`` and ``y``.

    ``|mu_x - mu_y|^2 + tr S_x + tr S_y - 2 tr sqrt(S_x S_y)`` with the unbiased covariances,
    as MONAI's ``FIDMetric``; the last trace is the nuclear norm of ``X_c Y_c^T`` over
    ``sqrt((n_x - 1)(n_y - 1))`` (``S_x S_y`` has the eigenvalues of ``(X_c Y_c^T)(X_c Y_c^T)^T``
    up to that factor and zeros), exact with any number of samples.
    """
    x, y = x.double(), y.double()
    nx, ny = len(x), len(y)
    xc, yc = x - x.mean(0), y - y.mean(0)
    diff = x.mean(0) - y.mean(0)
    tr_x = (xc * xc).sum() / (nx - 1)
    tr_y = (yc * yc).sum() / (ny - 1)
    tr_sqrt = torch.linalg.svdvals(xc @ yc.T).sum() / math.sqrt((nx - 1) * (ny - 1))
    # Non-negative in exact arithmetic; rounding can leave -1e-13 for identical sets.
    return max(0.0, float(diff @ diff + tr_x + tr_y - 2 * tr_sqrt))


def mmd(generated: torch.Tensor, reference: torch.Tensor) -> float:
    """MONAI's unbiased MMD (linear kernel) between the two feature sets."""
    from monai.metrics import MMDMetric

    return float(MMDMetric()(reference.double(), generated.double()))


# --------------------------------------------------------------------------------------------
# The command


def _summary(values: torch.Tensor) -> dict:
    values = values.reshape(-1).double()
    return {"mean": float(values.mean()),
            "std": float(values.std()) if values.numel() > 1 else 0.0,
            "min": float(values.min()), "max": float(values.max()), "pairs": values.numel()}


def run(opts: argparse.Namespace) -> dict:
    """Evaluate ``opts.generated`` against ``opts.reference`` (the ``tenvoo-fast evaluate``
    options), write ``opts.out`` and return what it holds."""
    from .data import nifti_files

    device = torch.device(opts.device)
    check_writable_file(opts.out, "--out", example="evaluation.json")
    gen_files, gen_other = nifti_files(opts.generated, "--generated")
    ref_files, ref_other = nifti_files(opts.reference, "--reference")
    weights = getattr(opts, "feature_weights", None)
    model = feature_network(weights, device) if weights else None  # fail before the slow part
    if model is not None and (len(gen_files) < 2 or len(ref_files) < 2):
        raise RunError(f"FID and MMD need at least 2 volumes in each folder; --generated has "
                       f"{len(gen_files)}, --reference {len(ref_files)}")
    size = tuple(opts.size) if opts.size else ras_shape(gen_files[0])
    kernel = ms_ssim_kernel(size)
    resized = {name: sum(ras_shape(p) != size for p in files)
               for name, files in (("generated", gen_files), ("reference", ref_files))}
    print(f"tenvoo-fast evaluate: {len(gen_files)} generated volume(s) in {opts.generated} vs "
          f"{len(ref_files)} reference volume(s) in {opts.reference}, at "
          f"{'x'.join(map(str, size))} ({resized['generated']} generated and "
          f"{resized['reference']} reference volume(s) resized), {device}")
    generated = load_volumes(gen_files, size)
    reference = load_volumes(ref_files, size)

    scores = ms_ssim(generated, reference, kernel, device)
    summary = _summary(scores)
    non_finite = []  # notes on any value that is not a finite number (written as null)
    bad = (~torch.isfinite(scores)).nonzero().tolist()
    if bad:
        g, r = bad[0]
        non_finite.append(f"MS-SSIM was NaN or infinite for {len(bad)} of {scores.numel()} "
                          f"pairs (e.g. {gen_files[g].name} vs {ref_files[r].name}), so its "
                          "mean and spread are null (the volumes themselves are finite: "
                          "they were checked when read)")
    print(f"MS-SSIM (window {kernel}, mean over {summary['pairs']} generated-reference pairs): "
          f"{summary['mean']:.4f} (std {summary['std']:.4f}, min {summary['min']:.4f}, "
          f"max {summary['max']:.4f})")

    result = {
        "generated": {"folder": str(opts.generated), "count": len(gen_files),
                      "resized": resized["generated"], "ignored": len(gen_other)},
        "reference": {"folder": str(opts.reference), "count": len(ref_files),
                      "resized": resized["reference"], "ignored": len(ref_other)},
        "size": list(size),
        "size_from": "--size" if opts.size else f"first generated volume ({gen_files[0].name})",
        "preprocessing": "RAS orientation, intensities scaled to [0, 1] per volume, whole "
                         "volume resized (trilinear) to size",
        "ms_ssim": summary["mean"],
        "ms_ssim_detail": {**summary, "kernel_size": kernel, "scales": MS_SSIM_SCALES,
                           "data_range": 1.0,
                           "pairs_of": "every (generated, reference) pair"},
        "fid": None, "mmd": None,
        "feature_weights": str(weights) if weights else None,
    }
    if model is None:
        result["note"] = NOT_COMPUTED
        print(NOT_COMPUTED)
    else:
        gen_features = features(model, generated, device)
        ref_features = features(model, reference, device)
        result["fid"] = frechet_distance(gen_features, ref_features)
        result["mmd"] = mmd(gen_features, ref_features)
        result["features"] = {"network": "MONAI resnet50 (3D, 1 channel, shortcut B, Med3D "
                                         "layout), global average pool",
                              "dim": int(gen_features.shape[1]),
                              "input": "each volume z-scored (mean 0, std 1)"}
        print(f"FID: {result['fid']:.4f}  MMD: {result['mmd']:.6f} (ResNet-50 features, "
              f"{weights})")
    result.update(device=str(device), versions=versions(),
                  date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    _, fields = finite_json(result)
    if fields:
        if not non_finite:
            non_finite.append("these values were NaN or infinite, which JSON cannot hold")
        result["non_finite"] = {"fields": fields, "written_as": None, "note": " ".join(non_finite)}
        print(f"warning: {', '.join(fields)} not finite (written as null in {opts.out}): "
              f"{' '.join(non_finite)}", file=sys.stderr)
    write_json_atomic(opts.out, result)
    print(f"wrote {opts.out}")
    return result
