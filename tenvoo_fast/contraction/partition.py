"""The factorized form of a Conv3d adapter: its network split into input, tap and output blocks.

A TenVOO network splits into three blocks by what its cores touch: the input block U (the cores
holding the input-channel letters), the output block V (output-channel letters) and the tap
block K (everything else: the kD/kH/kW cores and the cross cores). Contracted separately they
are small: U is (Cin, R_U), V is (Cout, R_V) and K is an R_U -> R_V 3D kernel, with R_U, R_V the
bond dimensions between the blocks (r³ for TenVOO-L and -Q). Then

    conv3d(x, ΔW) = V · conv3d(U · x, K)        (U and V as 1x1x1 convolutions)

exactly (1x1x1 maps commute with the spatial convolution, including its stride, padding and
dilation): the ``factorized`` strategy (:mod:`tenvoo_fast.ops.factorized`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class Partition:
    """The reduced network's U, K and V blocks: core positions and einsum equations."""
    u_cores: tuple[int, ...]
    k_cores: tuple[int, ...]
    v_cores: tuple[int, ...]
    u_equation: str      # -> in letters + U bonds
    k_equation: str      # -> U bonds + tap letters + V bonds
    v_equation: str      # -> out letters + V bonds
    rank_u: int
    rank_v: int


def _letters(equation: str):
    lhs, out = equation.split("->")
    return lhs.split(","), out


@lru_cache(maxsize=None)
def partition(equation: str, shapes: tuple, out_letters: str, in_letters: str,
              tap_letters: str) -> Partition:
    """Split a (reduced) weight network into its U, K and V blocks; ValueError if the network
    does not factor that way (a core touching both channel sides, or U and V sharing a bond)."""
    terms, _ = _letters(equation)
    sizes = {l: n for t, s in zip(terms, shapes) for l, n in zip(t, s)}
    u = tuple(i for i, t in enumerate(terms) if set(t) & set(in_letters))
    v = tuple(i for i, t in enumerate(terms) if set(t) & set(out_letters))
    if set(u) & set(v):
        raise ValueError(f"{equation}: a core holds both input and output channel letters")
    k = tuple(i for i in range(len(terms)) if i not in u and i not in v)

    def block_letters(block):
        return set("".join(terms[i] for i in block))

    lu, lk, lv = block_letters(u), block_letters(k), block_letters(v)
    if (lu & lv) - set(tap_letters):
        raise ValueError(f"{equation}: the input and output blocks share bonds "
                         f"{sorted(lu & lv)}; no factorized form")
    if (lu | lv) & set(tap_letters):
        raise ValueError(f"{equation}: a tap letter sits in a channel block")
    bonds_u = "".join(sorted((lu & lk) - set(in_letters)))
    bonds_v = "".join(sorted((lv & lk) - set(out_letters)))

    def eq(block, out):
        return ",".join(terms[i] for i in block) + "->" + out

    return Partition(u, k, v, eq(u, in_letters + bonds_u),
                     eq(k, bonds_u + tap_letters + bonds_v), eq(v, out_letters + bonds_v),
                     math.prod(sizes[l] for l in bonds_u), math.prod(sizes[l] for l in bonds_v))


def channel_letters(network) -> tuple[str, str, str]:
    """(out, in, tap) letters of a TenVOO network's output (``ABCabcxyz``)."""
    out = network.output
    n_out, n_in = len(network.meta["out_factors"]), len(network.meta["in_factors"])
    return out[:n_out], out[n_out:n_out + n_in], out[n_out + n_in:]
