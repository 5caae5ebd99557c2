"""Channel factors ``C = f1 * f2 * f3``, the axes TenVOO and QuanTA split channels into.

The published table (adapters.md §2) is reproduced exactly: it fixes parameter counts and
checkpoint shapes. Channel counts outside it follow :func:`general_factors`.
"""
from __future__ import annotations

from typing import Sequence

from ..errors import AdapterError

#: The published choices, channel count -> (f1, f2, f3).
FACTOR_TABLE: dict[int, tuple[int, int, int]] = {
    1: (1, 1, 1), 2: (2, 1, 1), 4: (2, 2, 1), 6: (3, 2, 1), 8: (2, 2, 2),
    12: (4, 3, 1), 16: (4, 2, 2), 24: (4, 3, 2), 32: (4, 4, 2), 48: (8, 3, 2),
    64: (8, 4, 2), 96: (8, 4, 3), 128: (8, 8, 2), 192: (8, 6, 4), 256: (8, 8, 4),
    384: (8, 8, 6), 512: (16, 8, 4), 768: (16, 8, 6), 1024: (16, 16, 4),
}


def general_factors(channels: int) -> tuple[int, int, int]:
    """The rule for channel counts not in the table.

    Among all ordered factorisations ``f1 >= f2 >= f3`` with ``f1*f2*f3 == channels``, take the
    most balanced one: the smallest ``f1``, then the smallest ``f2``. Every positive integer has
    one (a prime ``p`` gives ``(p, 1, 1)``). Examples: 10 -> (5, 2, 1), 40 -> (5, 4, 2),
    320 -> (8, 8, 5), 1000 -> (10, 10, 10), 7 -> (7, 1, 1).
    """
    if channels < 1:
        raise AdapterError(f"cannot factorise {channels} channels: the count must be >= 1")
    best = None
    for f3 in range(1, round(channels ** (1 / 3)) + 2):
        if channels % f3:
            continue
        rest = channels // f3
        for f2 in range(f3, int(rest ** 0.5) + 1):
            if rest % f2:
                continue
            f1 = rest // f2
            cand = (f1, f2, f3)
            if best is None or (cand[0], cand[1]) < (best[0], best[1]):
                best = cand
    return best if best is not None else (channels, 1, 1)


def default_factors(channels: int, overrides: dict | None = None) -> tuple[int, int, int]:
    """Factors for ``channels``: an override if given, else the published table, else the rule."""
    if overrides and channels in overrides:
        return tuple(int(f) for f in overrides[channels])
    if channels in FACTOR_TABLE:
        return FACTOR_TABLE[channels]
    return general_factors(channels)


def check_factors(factors: Sequence[int], channels: int, *, layer: str, side: str) -> tuple[int, int, int]:
    """Validate an explicit factorisation; the error names the layer and the numbers."""
    fs = tuple(int(f) for f in factors)
    if len(fs) != 3 or any(f < 1 for f in fs):
        raise AdapterError(
            f"{layer}: {side} factorisation {list(factors)} must be three positive integers "
            f"(e.g. {list(default_factors(channels))} for {channels} channels)")
    if fs[0] * fs[1] * fs[2] != channels:
        raise AdapterError(
            f"{layer}: {side} factorisation {list(fs)} multiplies to {fs[0] * fs[1] * fs[2]}, "
            f"but the layer has {channels} {side} channels; pass factors whose product is "
            f"{channels}, e.g. {list(default_factors(channels))}")
    return fs


def resolve_factors(factors, in_channels: int, out_channels: int, *, layer: str,
                    table: dict | None = None) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """``(in_factors, out_factors)`` for a layer: the explicit ``((i1,i2,i3), (o1,o2,o3))`` if
    given (validated), else the table (with ``table`` overrides), else the general rule."""
    if factors is None:
        fin, fout = default_factors(in_channels, table), default_factors(out_channels, table)
    else:
        if len(factors) != 2:
            raise AdapterError(f"{layer}: factors must be ((i1, i2, i3), (o1, o2, o3)), "
                               f"got {factors!r}")
        fin, fout = factors
    return (check_factors(fin, in_channels, layer=layer, side="input"),
            check_factors(fout, out_channels, layer=layer, side="output"))


def factors_for(factors: dict, name: str, in_channels: int, out_channels: int):
    """A layer's ``(in_factors, out_factors)`` under an :class:`~tenvoo_fast.AdapterConfig`'s
    normalised ``factors``: the layer's own override, else the table with the config's
    channel-count overrides, else the general rule."""
    return factors["layers"].get(name) or resolve_factors(
        None, in_channels, out_channels, layer=name, table=factors["channels"])
