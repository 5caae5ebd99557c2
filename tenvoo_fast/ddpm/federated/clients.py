"""Each federated client's data: its own NIfTI folder, or by default its own synthetic phantoms
with a client-specific shift (the non-IID case federated fine-tuning is about: hospitals whose
scanners differ in intensity, contrast, noise and field of view)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from ..data import NiftiVolumes, nifti_files, split
from ..phantoms import brain_phantom


@dataclass(frozen=True)
class Shift:
    """How one client's scanner differs: ``scale``·x^``gamma`` intensities, Gaussian ``noise``,
    and a field of view ``zoom`` times the reference one (the head appears 1/zoom as large)."""
    scale: float
    gamma: float
    noise: float
    zoom: float

    def __call__(self, volume: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = volume.clamp(0, 1) ** self.gamma * self.scale
        if self.zoom != 1.0:
            size = x.shape[-3:]
            inner = [max(2, round(s / self.zoom)) for s in size]
            small = F.interpolate(x[None], size=inner, mode="trilinear", align_corners=False)[0]
            pads = [(s - i) for s, i in zip(size, inner)]
            x = F.pad(small, [p for d in reversed(pads) for p in (d // 2, d - d // 2)])
        noise = torch.randn(x.shape, generator=generator) * self.noise
        return (x + noise).clamp(0, 1)


def client_shift(client: int) -> Shift:
    """Client 0 is the reference scanner; each further client is darker, more contrasted,
    noisier and sees a wider field of view."""
    return Shift(scale=1.0 - 0.15 * client, gamma=1.0 + 0.3 * client, noise=0.01 * client,
                 zoom=1.0 + 0.15 * client)


class ShiftedPhantoms(Dataset):
    """``n`` phantoms of ``size`` seen through client ``client``'s :func:`client_shift`;
    volume ``i`` depends only on ``(seed, client, i)``."""

    def __init__(self, n: int, size: Sequence[int], seed: int, client: int):
        self.n, self.size, self.seed, self.client = n, tuple(size), seed, client
        self.shift = client_shift(client)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + self.client) * 1_000_003 + index)
        volume = brain_phantom(index + 1000 * self.client, self.size, self.seed)
        return self.shift(volume.unsqueeze(0), generator)


def client_volumes(client: int, size: Sequence[int], seed: int, *, data: str | None = None,
                   num_volumes: int = 8) -> tuple[Dataset, Dataset, str]:
    """(train, validation, description) of client ``client``: the NIfTI files in ``data``, or
    ``num_volumes`` shifted phantoms; split 90/10 as ``finetune`` splits."""
    if data is None:
        volumes: Dataset = ShiftedPhantoms(num_volumes, size, seed, client)
        what = f"{num_volumes} phantoms, {client_shift(client)}"
    else:
        files, _ = nifti_files(data, flag=f"--client-data (client {client})")
        volumes = NiftiVolumes(files, size)
        what = f"{len(files)} NIfTI files in {data}"
    train, val = split(len(volumes), seed)
    return Subset(volumes, train), Subset(volumes, val), f"client {client}: {what}"
