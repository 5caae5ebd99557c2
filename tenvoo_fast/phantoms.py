"""Synthetic brain-like phantoms: nested ellipsoids, so demos and examples need no data download.

Each volume is a head (scalp), brain, white matter and two ventricles, drawn with soft edges and
a per-volume random offset, axis scaling and smooth warp, plus a little Gaussian noise. The same
seed gives the same volumes on every machine (they are drawn on the CPU with their own
generator, leaving the global RNG alone); intensities lie in [0, 1].
"""
from __future__ import annotations

import math

import torch

#: (centre, semi-axes, intensity) in normalised coordinates [-1, 1]^3, painted in order.
_ELLIPSOIDS = (
    ((0.0, 0.0, 0.0), (0.90, 0.75, 0.85), 0.35),    # scalp / skull
    ((0.0, 0.0, 0.02), (0.80, 0.65, 0.75), 0.60),   # grey matter
    ((0.0, 0.0, 0.05), (0.60, 0.48, 0.55), 0.85),   # white matter
    ((0.0, 0.16, 0.10), (0.28, 0.10, 0.14), 0.15),  # ventricles
    ((0.0, -0.16, 0.10), (0.28, 0.10, 0.14), 0.15),
)


def brain_phantoms(n: int, size: int = 16, seed: int = 0, noise: float = 0.02) -> torch.Tensor:
    """``n`` phantom volumes of ``size``^3 voxels as a float32 tensor ``(n, 1, size, size, size)``.

    Volume ``i`` depends only on ``seed`` and ``i``, so a longer run extends a shorter one.
    """
    if n < 1 or size < 2:
        raise ValueError(f"need n >= 1 and size >= 2, got n={n}, size={size}")
    axis = torch.linspace(-1.0, 1.0, size)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"))  # (3, S, S, S)
    sharpness = float(size)  # edges roughly a voxel wide
    volumes = []
    for i in range(n):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        offset = (torch.rand(3, generator=g) - 0.5) * 0.2
        scale = 1.0 + (torch.rand(3, generator=g) - 0.5) * 0.2
        phase = torch.rand(3, generator=g) * 2 * math.pi
        coords = (grid - offset.view(3, 1, 1, 1)) / scale.view(3, 1, 1, 1)
        # A smooth warp: each axis is displaced by a low-frequency sine of the next one.
        warp = 0.05 * torch.sin(math.pi * coords.roll(1, dims=0) + phase.view(3, 1, 1, 1))
        coords = coords + warp
        vol = torch.zeros(size, size, size)
        for centre, axes, intensity in _ELLIPSOIDS:
            c = torch.tensor(centre).view(3, 1, 1, 1)
            a = torch.tensor(axes).view(3, 1, 1, 1)
            r = (((coords - c) / a) ** 2).sum(0).sqrt()
            inside = torch.sigmoid((1.0 - r) * sharpness)
            vol = vol * (1 - inside) + intensity * inside
        vol = vol + noise * torch.randn(vol.shape, generator=g)
        volumes.append(vol.clamp_(0.0, 1.0))
    return torch.stack(volumes).unsqueeze(1)
