"""Training volumes for ``tenvoo-fast finetune``: built-in synthetic phantoms or a folder of NIfTI
files, and the deterministic 90/10 train/validation split (ddpm-finetuning.md, "Data").

Every item is a float32 tensor ``(1, D, H, W)`` with intensities in [0, 1]. A NIfTI folder is
checked up front (every header is read), so a missing folder, a folder without NIfTI files or an
unreadable file stops the run before training starts, with a :class:`RunError` naming the path.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import Dataset, Subset

from .errors import RunError, one_line
from .phantoms import brain_phantom

NIFTI_SUFFIXES = (".nii", ".nii.gz")
VALIDATION_FRACTION = 0.1


class PhantomVolumes(Dataset):
    """``n`` synthetic brain phantoms of ``size``; volume ``i`` depends only on ``(seed, i)``.

    Each volume is generated on first use and kept (they are small and cheap to hold, while
    generating one costs about as much as a GPU training step at the paper's size).
    """

    def __init__(self, n: int, size: Sequence[int], seed: int):
        self.n, self.size, self.seed = n, tuple(size), seed
        self._cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        if index not in self._cache:
            self._cache[index] = brain_phantom(index, self.size, self.seed).unsqueeze(0)
        return self._cache[index]


def nifti_files(folder: str | Path, flag: str = "--data") -> tuple[list[Path], list[Path]]:
    """The ``.nii``/``.nii.gz`` files in ``folder`` (sorted) and the other entries in it.

    Raises :class:`RunError`, naming the command-line ``flag`` that gave the folder, if the
    folder is missing or holds no NIfTI file, or if any NIfTI file's header cannot be read or
    does not describe one 3D volume.
    """
    import nibabel

    folder = Path(folder)
    if not folder.is_dir():
        raise RunError(f"{flag} {folder}: no such folder")
    entries = sorted(folder.iterdir())
    files = [p for p in entries if p.is_file() and p.name.lower().endswith(NIFTI_SUFFIXES)]
    if not files:
        raise RunError(f"{flag} {folder}: no NIfTI files (.nii, .nii.gz) in this folder")
    for path in files:
        try:
            shape = nibabel.load(path).header.get_data_shape()
        except Exception as e:
            raise RunError(f"{path}: not a readable NIfTI file ({one_line(e)})") from e
        if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)):
            raise RunError(f"{path}: expected one 3D volume, the header says shape {shape}")
    return files, [p for p in entries if p not in files]


class NiftiVolumes(Dataset):
    """NIfTI volumes through MONAI transforms: load, channel first, RAS orientation, optional
    resampling to ``spacing`` (mm), intensity scaled to [0, 1], then brought to ``size``.

    With ``spacing`` the voxel size is fixed, so the volume is padded or cropped to ``size``
    (keeping the physical scale); without it the whole volume is resized to ``size``, as the
    paper does.
    """

    def __init__(self, files: Sequence[Path], size: Sequence[int],
                 spacing: Sequence[float] | None = None):
        from monai.transforms import (Compose, EnsureChannelFirst, EnsureType, LoadImage,
                                      Orientation, Resize, ResizeWithPadOrCrop, ScaleIntensity,
                                      Spacing)
        self.files = list(files)
        steps = [LoadImage(image_only=True, reader="NibabelReader"), EnsureChannelFirst(),
                 # NIfTI's world space is RAS; naming the labels keeps that across MONAI
                 # versions (the default is changing to "from the image's metadata").
                 Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))]
        if spacing is not None:
            steps += [Spacing(pixdim=tuple(spacing), mode="bilinear"),
                      ScaleIntensity(minv=0.0, maxv=1.0), ResizeWithPadOrCrop(tuple(size))]
        else:
            steps += [ScaleIntensity(minv=0.0, maxv=1.0), Resize(tuple(size), mode="trilinear")]
        steps.append(EnsureType(data_type="tensor", dtype=torch.float32, track_meta=False))
        self.transform = Compose(steps)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        path = self.files[index]
        try:
            return self.transform(str(path))
        except Exception as e:
            raise RunError(f"{path}: could not be loaded ({one_line(e)})") from e


def split(n: int, seed: int) -> tuple[list[int], list[int]]:
    """Train and validation indices of ``range(n)``: 10% (at least one once n >= 2) chosen at
    random with ``seed`` for validation, the rest (at least one) for training."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = 0 if n < 2 else max(1, round(n * VALIDATION_FRACTION))
    return sorted(order[n_val:]), sorted(order[:n_val])


def training_volumes(size: Sequence[int], seed: int, *, data: str | Path | None = None,
                     num_volumes: int = 20, spacing: Sequence[float] | None = None
                     ) -> tuple[Dataset, Dataset, str]:
    """The train and validation sets and a one-line description of the data.

    ``data=None``: ``num_volumes`` phantoms; otherwise the NIfTI files in the folder ``data``.
    """
    if data is None:
        volumes: Dataset = PhantomVolumes(num_volumes, size, seed)
        description = f"{num_volumes} synthetic phantoms"
    else:
        files, others = nifti_files(data)
        volumes = NiftiVolumes(files, size, spacing)
        description = f"{len(files)} NIfTI files in {data}"
        if others:
            description += f" (ignored {len(others)} other entries, e.g. {others[0].name})"
    train, val = split(len(volumes), seed)
    description += f": {len(train)} train, {len(val)} validation"
    return Subset(volumes, train), Subset(volumes, val), description
