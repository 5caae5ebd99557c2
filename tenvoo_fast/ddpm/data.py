"""Training volumes for ``tenvoo-fast finetune``: built-in synthetic phantoms or a folder of NIfTI
files, and the deterministic 90/10 train/validation split (ddpm-finetuning.md, "Data").

Every item is a float32 tensor ``(1, D, H, W)`` with intensities in [0, 1]. A NIfTI folder is
checked up front (every header is read, and every file's data size compared with it), so a
missing folder, a folder without NIfTI files, an unreadable or truncated file stops the run
before training starts, with a :class:`RunError` naming the path. A volume whose voxels cannot
be used (NaN or Inf, damaged data) is refused when it is read, with a :class:`VolumeError`
naming the file, also from a DataLoader worker process.
"""
from __future__ import annotations

import math
import os
import zlib
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import Dataset, Subset

from ..errors import RunError, one_line
from .phantoms import brain_phantom

NIFTI_SUFFIXES = (".nii", ".nii.gz")
VALIDATION_FRACTION = 0.1


class VolumeError(RunError):
    """A volume file that cannot be used; the message names the file, what is wrong and the fix.

    Raised in a DataLoader worker, it still reaches the user as that one line: torch re-raises
    a worker's exception in the main process as ``type(error)(text)``, where ``text`` is
    "Caught VolumeError in DataLoader worker process N. Original Traceback ..." (see
    ``torch._utils.ExceptionWrapper.reraise``); this class recovers its own message from the
    traceback's last line, so ``tenvoo-fast`` prints ``error: <message>``, not a traceback.
    """

    def __init__(self, message: str):
        if message.startswith(f"Caught {type(self).__name__} ") and "Traceback" in message:
            marker = f"{type(self).__module__}.{type(self).__qualname__}: "
            found = [line[len(marker):] for line in message.splitlines()
                     if line.startswith(marker)]
            if found:
                message = found[-1]
        super().__init__(message)


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
    if folder.is_file():
        raise RunError(f"{flag} {folder}: is a file, not a folder; pass the folder that holds "
                       "the NIfTI files")
    if not folder.is_dir():
        raise RunError(f"{flag} {folder}: no such folder")
    entries = sorted(folder.iterdir())
    files = [p for p in entries if p.is_file() and p.name.lower().endswith(NIFTI_SUFFIXES)]
    if not files:
        raise RunError(f"{flag} {folder}: no NIfTI files (.nii, .nii.gz) in this folder")
    for path in files:
        try:
            image = nibabel.load(path)
            shape = image.header.get_data_shape()
        except Exception as e:
            raise RunError(f"{path}: not a readable NIfTI file ({one_line(e)})") from e
        if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)) or 0 in shape:
            raise RunError(f"{path}: expected one 3D volume, the header says shape {shape}")
        _check_data_size(path, image.dataobj)
    return files, [p for p in entries if p not in files]


def _check_data_size(path: Path, proxy) -> None:
    """:class:`RunError` if ``path`` holds fewer bytes than its header's voxels need (a file cut
    short by an interrupted copy or write: its header reads fine, its data does not).
    ``proxy`` is nibabel's (unread) data of the image: where the voxels start, shape, dtype.

    A ``.nii`` is checked by its size. A ``.nii.gz`` by the uncompressed size gzip records at
    its end (modulo 2^32), which costs nothing; only when that differs (a truncated file ends
    in arbitrary bytes, but multi-member or padded files differ too) is the file decompressed
    to count its bytes, as far as the voxels need.
    """
    try:
        dtype = proxy.dtype
        needed = int(proxy.offset) + math.prod(proxy.shape) * dtype.itemsize
    except AttributeError:  # not nibabel's plain file-backed data: nothing to compare
        return
    compressed = path.name.lower().endswith(".gz")
    if not compressed:
        size = os.path.getsize(path)
    else:
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            if int.from_bytes(f.read(4), "little") == needed % 2**32:
                return
        size = _gunzipped_size(path, needed)
    if size < needed:
        shape = "x".join(map(str, proxy.shape))
        raise RunError(f"{path}: truncated: its header describes {shape} {dtype} voxels "
                       f"({needed:,} bytes with the header), but it holds only {size:,} bytes"
                       f"{' once decompressed' if compressed else ''}; copy the file again or "
                       "remove it")


def _gunzipped_size(path: Path, limit: int) -> int:
    """How many bytes the gzip file ``path`` decompresses to, counting up to where it ends or
    breaks off (members one after another, as gzip reads them), stopping once past ``limit``;
    :class:`RunError` if the compressed data is damaged (zlib checks each member's CRC)."""
    size, member = 0, zlib.decompressobj(16 + zlib.MAX_WBITS)
    with open(path, "rb") as f:
        while size < limit:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            while chunk:
                try:
                    size += len(member.decompress(chunk))
                except zlib.error as e:
                    if size and not chunk.strip(b"\0"):
                        return size  # zero padding after the last member, as gzip allows
                    raise RunError(f"{path}: damaged compressed data after {size:,} bytes "
                                   f"({one_line(e)}); copy the file again or remove it") from e
                chunk = b""
                if member.eof:  # the next member, if any, starts in the unused bytes
                    chunk = member.unused_data
                    member = zlib.decompressobj(16 + zlib.MAX_WBITS)
    return size


class NiftiVolumes(Dataset):
    """NIfTI volumes through MONAI transforms: load, channel first, RAS orientation, optional
    resampling to ``spacing`` (mm), intensity scaled to [0, 1], then brought to ``size``.

    With ``spacing`` the voxel size is fixed, so the volume is padded or cropped to ``size``
    (keeping the physical scale); without it the whole volume is resized to ``size``, as the
    paper does. ``field_of_view``: pad (mode "minimum") or crop to it first, in the
    file's voxel order, as the published recipe does (then a ``size`` equal to it is not
    resampled).
    """

    def __init__(self, files: Sequence[Path], size: Sequence[int],
                 spacing: Sequence[float] | None = None,
                 field_of_view: Sequence[int] | None = None):
        from monai.transforms import (Compose, EnsureChannelFirst, EnsureType, LoadImage,
                                      Orientation, Resize, ResizeWithPadOrCrop, ScaleIntensity,
                                      Spacing)
        self.files = list(files)
        self.load = LoadImage(image_only=True, reader="NibabelReader")
        steps = [EnsureChannelFirst()]
        if field_of_view is not None:      # the published recipe: before anything else
            steps.append(ResizeWithPadOrCrop(tuple(field_of_view), mode="minimum"))
        # NIfTI's world space is RAS; naming the labels keeps that across MONAI versions (the
        # default is changing to "from the image's metadata").
        steps.append(Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))))
        if spacing is not None:
            steps += [Spacing(pixdim=tuple(spacing), mode="bilinear"),
                      ScaleIntensity(minv=0.0, maxv=1.0), ResizeWithPadOrCrop(tuple(size))]
        elif field_of_view is not None and tuple(size) == tuple(field_of_view):
            # Already that size: no interpolation (resized only if reorientation swapped axes).
            steps += [ScaleIntensity(minv=0.0, maxv=1.0), _ResizeIfNeeded(Resize(tuple(size),
                                                                             mode="trilinear"))]
        else:
            steps += [ScaleIntensity(minv=0.0, maxv=1.0), Resize(tuple(size), mode="trilinear")]
        steps.append(EnsureType(data_type="tensor", dtype=torch.float32, track_meta=False))
        self.transform = Compose(steps)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        """Volume ``index``; :class:`VolumeError` naming the file if it cannot be read or has a
        NaN or Inf voxel (which intensity scaling would spread to the whole volume)."""
        path = self.files[index]
        try:
            image = self.load(str(path))
        except Exception as e:
            raise VolumeError(f"{path}: could not be loaded ({one_line(e)}); copy the file "
                              "again or remove it") from e
        bad = int((~torch.isfinite(torch.as_tensor(image))).sum())
        if bad:
            raise VolumeError(f"{path}: {bad} non-finite voxel(s) (NaN or Inf); fix or remove "
                              "this file")
        try:
            return self.transform(image)
        except Exception as e:
            raise VolumeError(f"{path}: could not be loaded ({one_line(e)})") from e


class _ResizeIfNeeded:
    """MONAI's ``Resize``, skipped for a volume that already has its size (Resize would still
    interpolate it)."""

    def __init__(self, resize):
        self.resize = resize

    def __call__(self, volume):
        if tuple(volume.shape[1:]) == tuple(self.resize.spatial_size):
            return volume
        return self.resize(volume)


def split(n: int, seed: int) -> tuple[list[int], list[int]]:
    """Train and validation indices of ``range(n)``: 10% (at least one once n >= 2) chosen at
    random with ``seed`` for validation, the rest (at least one) for training."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = 0 if n < 2 else max(1, round(n * VALIDATION_FRACTION))
    return sorted(order[n_val:]), sorted(order[:n_val])


def training_volumes(size: Sequence[int], seed: int, *, data: str | Path | None = None,
                     num_volumes: int = 20, spacing: Sequence[float] | None = None,
                     field_of_view: Sequence[int] | None = None
                     ) -> tuple[Dataset, Dataset, str]:
    """The train and validation sets and a one-line description of the data.

    ``data=None``: ``num_volumes`` phantoms; otherwise the NIfTI files in the folder ``data``.
    """
    if data is None:
        volumes: Dataset = PhantomVolumes(num_volumes, size, seed)
        description = f"{num_volumes} synthetic phantoms"
    else:
        files, others = nifti_files(data)
        volumes = NiftiVolumes(files, size, spacing, field_of_view)
        description = f"{len(files)} NIfTI files in {data}"
        if others:
            description += f" (ignored {len(others)} other entries, e.g. {others[0].name})"
    train, val = split(len(volumes), seed)
    description += f": {len(train)} train, {len(val)} validation"
    return Subset(volumes, train), Subset(volumes, val), description
