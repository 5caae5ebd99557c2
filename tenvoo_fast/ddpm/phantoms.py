"""Synthetic brain-like phantoms: nested ellipsoids, so demos and examples need no data download.

Each volume is a head (scalp), brain, white matter and two ventricles, drawn with soft edges and
a per-volume random offset, axis scaling and smooth warp, plus a little Gaussian noise. The same
seed gives the same volumes on every machine (they are drawn on the CPU with their own
generator, leaving the global RNG alone); intensities lie in [0, 1].
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

#: (centre, semi-axes, intensity) in normalised coordinates [-1, 1]^3, painted in order.
_ELLIPSOIDS = (
    ((0.0, 0.0, 0.0), (0.90, 0.75, 0.85), 0.35),    # scalp / skull
    ((0.0, 0.0, 0.02), (0.80, 0.65, 0.75), 0.60),   # grey matter
    ((0.0, 0.0, 0.05), (0.60, 0.48, 0.55), 0.85),   # white matter
    ((0.0, 0.16, 0.10), (0.28, 0.10, 0.14), 0.15),  # ventricles
    ((0.0, -0.16, 0.10), (0.28, 0.10, 0.14), 0.15),
)


def brain_phantom(index: int, size: int | Sequence[int] = 16, seed: int = 0,
                  noise: float = 0.02) -> torch.Tensor:
    """Phantom volume ``index`` as a float32 tensor of shape ``size`` (an int for a cube, or
    (D, H, W)); it depends only on ``seed`` and ``index``."""
    shape = (size,) * 3 if isinstance(size, int) else tuple(size)
    if len(shape) != 3 or min(shape) < 2:
        raise ValueError(f"size must be an int or three ints, each >= 2; got {size}")
    axes = [torch.linspace(-1.0, 1.0, n) for n in shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))  # (3, D, H, W)
    sharpness = float(max(shape))  # edges roughly a voxel wide
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    offset = (torch.rand(3, generator=g) - 0.5) * 0.2
    scale = 1.0 + (torch.rand(3, generator=g) - 0.5) * 0.2
    phase = torch.rand(3, generator=g) * 2 * math.pi
    coords = (grid - offset.view(3, 1, 1, 1)) / scale.view(3, 1, 1, 1)
    # A smooth warp: each axis is displaced by a low-frequency sine of the next one.
    warp = 0.05 * torch.sin(math.pi * coords.roll(1, dims=0) + phase.view(3, 1, 1, 1))
    coords = coords + warp
    vol = torch.zeros(shape)
    for centre, axes_, intensity in _ELLIPSOIDS:
        c = torch.tensor(centre).view(3, 1, 1, 1)
        a = torch.tensor(axes_).view(3, 1, 1, 1)
        r = (((coords - c) / a) ** 2).sum(0).sqrt()
        inside = torch.sigmoid((1.0 - r) * sharpness)
        vol = vol * (1 - inside) + intensity * inside
    vol = vol + noise * torch.randn(vol.shape, generator=g)
    return vol.clamp_(0.0, 1.0)


def brain_phantoms(n: int, size: int | Sequence[int] = 16, seed: int = 0,
                   noise: float = 0.02) -> torch.Tensor:
    """Phantoms 0..n-1 as a float32 tensor ``(n, 1, *shape)`` (see :func:`brain_phantom`), so a
    longer run extends a shorter one."""
    if n < 1:
        raise ValueError(f"need n >= 1, got n={n}")
    return torch.stack([brain_phantom(i, size, seed, noise) for i in range(n)]).unsqueeze(1)
