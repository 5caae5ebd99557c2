"""Independent oracles for ΔW, written from shared/spec/adapters.md and not from the package.

- ``spec_delta``: the spec's einsum strings, verbatim, evaluated in fp64 with ``torch.einsum``
  (no opt_einsum, no path), then the spec's reshape/permute.
- ``loop_delta``: an explicit loop over every index assignment with the spec's row-major channel
  mapping, independent of einsum; for tiny shapes only.
"""
from __future__ import annotations

import itertools
import math

import torch

TENVOO_L = "bade,cefg,xghi,yijk,zklm,Cmno,BopA,fdqh,lrpn,jqr->abcxyzABC"
TENVOO_Q = "bade,cefg,xghi,yijk,zjlm,Cmop,BpqA,oqrs,dftr,hlst->abcxyzABC"
QUANTA = "efbc,diaf,ghde->ghiabc"

#: adapters.md §2, verbatim.
SPEC_TABLE = {1: (1, 1, 1), 2: (2, 1, 1), 4: (2, 2, 1), 6: (3, 2, 1), 8: (2, 2, 2),
              12: (4, 3, 1), 16: (4, 2, 2), 24: (4, 3, 2), 32: (4, 4, 2), 48: (8, 3, 2),
              64: (8, 4, 2), 96: (8, 4, 3), 128: (8, 8, 2), 192: (8, 6, 4), 256: (8, 8, 4),
              384: (8, 8, 6), 512: (16, 8, 4), 768: (16, 8, 6), 1024: (16, 16, 4)}


def f64(ts):
    return [t.detach().to(torch.float64) if not t.requires_grad or t.dtype != torch.float64
            else t for t in ts]


def spec_delta(layer, cores=None) -> torch.Tensor:
    """ΔW of an adapter layer from its cores (default: its trainable cores), in fp64."""
    method = layer.network.method
    cores = f64(list(layer.cores) if cores is None else cores)
    w_shape = tuple(layer.weight.shape)
    alpha = layer.network.meta.get("alpha")
    if method in ("tenvoo-l", "tenvoo-q"):
        cout, cin, kD, kH, kW = w_shape
        eq = TENVOO_L if method == "tenvoo-l" else TENVOO_Q
        T = torch.einsum(eq, *cores)
        return T.reshape(cin, kD, kH, kW, cout).permute(4, 0, 1, 2, 3)
    if method == "quanta":
        return torch.einsum(QUANTA, *cores).reshape(w_shape)
    r = layer.network.meta["rank"]
    s = (r if alpha is None else alpha) / r
    cout = w_shape[0]
    if method == "lora":
        down, up = cores
        return s * (up.reshape(cout, r) @ down.reshape(r, -1)).reshape(w_shape)
    if method == "loha":
        w1a, w1b, w2a, w2b = cores
        return s * ((w1a @ w1b) * (w2a @ w2b)).reshape(w_shape)
    if method == "lokr":
        (u1, u2), (v1, v2) = layer.network.meta["out_split"], layer.network.meta["in_split"]
        k = w_shape[2:]
        if len(cores) == 2:
            w1, w2 = cores
        else:
            w1, w2a, w2b = cores
            w2 = (w2a @ w2b).reshape(u2, v2, *k)
        w1 = w1.reshape(u1, v1, *(1,) * len(k))
        return s * torch.kron(w1, w2)
    raise AssertionError(method)


def loop_delta(equation: str, cores, in_factors, out_factors, kernel=()) -> torch.Tensor:
    """Explicit sum over all index assignments; output in the layer's weight layout.

    TenVOO letters: input (a,b,c), kernel (x,y,z), output (A,B,C). QuanTA: input (a,b,c),
    output (g,h,i). Size-1 axes broadcast (index 0), as einsum does for TenVOO-Q's core 3.
    """
    lhs, out = equation.split("->")
    terms = lhs.split(",")
    cores = [c.detach().double() for c in cores]
    sizes = {}
    for term, c in zip(terms, cores):
        for letter, n in zip(term, c.shape):
            sizes[letter] = max(sizes.get(letter, 1), n)
    letters = sorted(sizes)
    i1, i2, i3 = in_factors
    o1, o2, o3 = out_factors
    if out == "abcxyzABC":
        in_l, out_l = "abc", "ABC"
    else:
        in_l, out_l = "abc", "ghi"
    W = torch.zeros(o1 * o2 * o3, i1 * i2 * i3, *kernel, dtype=torch.float64)
    lists = [c.tolist() for c in cores]

    def get(nested, idx):
        for v in idx:
            nested = nested[v]
        return nested

    for values in itertools.product(*(range(sizes[l]) for l in letters)):
        env = dict(zip(letters, values))
        p = 1.0
        for term, c, nested in zip(terms, cores, lists):
            p *= get(nested, [env[l] if n > 1 else 0 for l, n in zip(term, c.shape)])
        a, b, c_ = (env[l] for l in in_l)
        A, B, C = (env[l] for l in out_l)
        cin = (a * i2 + b) * i3 + c_
        cout = (A * o2 + B) * o3 + C
        taps = tuple(env[l] for l in "xyz"[:len(kernel)])
        W[(cout, cin) + taps] += p
    return W


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual - expected‖ / ‖expected‖ in fp64."""
    a, e = actual.detach().double(), expected.detach().double()
    return ((a - e).norm() / e.norm().clamp_min(1e-300)).item()


def eq6(variant, fin, fout, k, r) -> int:
    """The paper's Eq. (6)."""
    (i1, i2, i3), (o1, o2, o3), (kD, kH, kW) = fin, fout, k
    if variant == "L":
        return (i1 * i2 + o1 * o2) * r ** 2 + (i3 + o3 + kD + kH + kW + 1) * r ** 3 + 2 * r ** 4
    return (i1 * i2 + o1 * o2 + kH) * r ** 2 + (i3 + o3 + kD + kW) * r ** 3 + 3 * r ** 4


def quanta_params(n, m, r) -> int:
    """adapters.md §4: gate sizes for equal and unequal factorisations."""
    if tuple(n) == tuple(m):
        n1, n2, n3 = n
        return (n2 * n3) ** 2 + (n1 * n3) ** 2 + (n1 * n2) ** 2
    (n1, n2, n3), (m1, m2, m3) = n, m
    return r * r * n2 * n3 + r * m3 * n1 * r + m1 * m2 * r * r


def prod(xs):
    return math.prod(xs)
