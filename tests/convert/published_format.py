"""Layers that save and compute as the published TenVOO code's do, written here from its
conventions (issue 17 and adapters.md), not from its code: the cores in ``tenvoo_weights``
(``quanta_weights`` with keys '-1 -2', '-1 -3', '-2 -3'), a frozen copy in buffers under
``tenvoo_weights2`` (``quanta_weights2``), two flags saved as ``merged.merged`` and
``frozen_merged.merged``; the first forward folds -T(θ0) into the weight, eval mode folds
+T(θ) too and train mode takes it out again. ΔW comes from the spec's einsum strings in the
weight's dtype, like the published layers'."""
import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

CONV = {
    "L": "bade,cefg,xghi,yijk,zklm,Cmno,BopA,fdqh,lrpn,jqr->abcxyzABC",
    "Q": "bade,cefg,xghi,yijk,zjlm,Cmop,BpqA,oqrs,dftr,hlst->abcxyzABC",
}
GATES = "efbc,diaf,ghde->ghiabc"
PAIRS = ("-1 -2", "-1 -3", "-2 -3")
#: adapters.md §2's table, which the published code's per_dim_list holds.
FACTORS = {1: (1, 1, 1), 2: (2, 1, 1), 4: (2, 2, 1), 6: (3, 2, 1), 8: (2, 2, 2), 12: (4, 3, 1),
           16: (4, 2, 2), 24: (4, 3, 2), 32: (4, 4, 2), 48: (8, 3, 2), 64: (8, 4, 2),
           96: (8, 4, 3), 128: (8, 8, 2), 192: (8, 6, 4), 256: (8, 8, 4), 384: (8, 8, 6),
           512: (16, 8, 4), 768: (16, 8, 6), 1024: (16, 16, 4)}


class Flag(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("merged", torch.tensor(False))

    def __bool__(self):
        return bool(self.merged.item())

    def set(self, value):
        self.merged.fill_(value)


class Frozen(nn.Module):
    def __init__(self, tensors: dict):
        super().__init__()
        for k, v in tensors.items():
            self.register_buffer(k, v.detach().clone())

    def __getitem__(self, k):
        return getattr(self, k)


def conv_shapes(variant, fin, fout, kernel, r):
    (i1, i2, i3), (o1, o2, o3), (kd, kh, kw) = fin, fout, kernel
    last = (r, r, r) if variant == "L" else (r, r, r, r)
    return [(i2, i1, r, r), (i3, r, r, r), (kd, r, r, r),
            (kh, r, r, r) if variant == "L" else (kh, 1, r, r), (kw, r, r, r), (o3, r, r, r),
            (o2, r, r, o1), (r, r, r, r), (r, r, r, r), last]


def gate_shapes(fin, fout, r):
    (n1, n2, n3), (m1, m2, m3) = fin, fout
    if fin == fout:
        return [(n2, n3, n2, n3), (n1, n3, n1, n3), (n1, n2, n1, n2)]
    return [(r, r, n2, n3), (r, m3, n1, r), (m1, m2, r, r)]


def _uniform(shape, bound):
    return (torch.rand(shape) * 2 - 1) * bound


class _Published:
    """Shared by both layers: folds per the flags, as the published layers do."""

    def _setup(self, params: dict):
        setattr(self, self.group, nn.ParameterDict({k: nn.Parameter(v) for k, v in params.items()}))
        setattr(self, self.group + "2", Frozen(params))
        self.merged, self.frozen_merged = Flag(), Flag()
        self.weight.requires_grad_(False)

    def cores(self, group):
        return [getattr(self, group)[k] for k in self.keys]

    def train(self, mode=True):
        super().train(mode)
        if hasattr(self, "merged") and bool(self.merged) != (not mode):
            if not self.frozen_merged:
                self._fold_frozen()
            with torch.no_grad():
                self.weight += (-1 if mode else 1) * self.delta(self.cores(self.group))
            self.merged.set(not mode)
        return self

    def _fold_frozen(self):
        with torch.no_grad():
            self.weight -= self.delta(self.cores(self.group + "2"))
        self.frozen_merged.set(True)

    def effective(self):
        if not self.frozen_merged:
            self._fold_frozen()
        if self.merged:
            return self.weight
        return self.weight + self.delta(self.cores(self.group))


class PublishedConv3d(_Published, nn.Conv3d):
    group, keys = "tenvoo_weights", [str(i) for i in range(10)]

    def __init__(self, conv: nn.Conv3d, rank=4, variant="L"):
        nn.Conv3d.__init__(self, conv.in_channels, conv.out_channels, conv.kernel_size,
                           stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                           bias=conv.bias is not None)
        with torch.no_grad():
            self.weight.copy_(conv.weight)
            if conv.bias is not None:
                self.bias.copy_(conv.bias)
        self.variant = variant
        shapes = conv_shapes(variant, FACTORS[conv.in_channels], FACTORS[conv.out_channels],
                             conv.kernel_size, rank)
        self._setup({str(i): _uniform(s, math.sqrt(6 / (s[-2] * s[-1] if len(s) == 4
                                                       else 2 * rank)))
                     for i, s in enumerate(shapes)})

    def delta(self, cores):
        cout, cin, kd, kh, kw = self.weight.shape
        t = torch.einsum(CONV[self.variant], *[c.to(self.weight.dtype) for c in cores])
        return t.reshape(cin, kd, kh, kw, cout).permute(4, 0, 1, 2, 3)

    def forward(self, x):
        return F.conv3d(x, self.effective(), self.bias, self.stride, self.padding,
                        self.dilation)


class PublishedLinear(_Published, nn.Linear):
    group, keys = "quanta_weights", list(PAIRS)

    def __init__(self, linear: nn.Linear, rank=4):
        nn.Linear.__init__(self, linear.in_features, linear.out_features,
                           bias=linear.bias is not None)
        with torch.no_grad():
            self.weight.copy_(linear.weight)
            if linear.bias is not None:
                self.bias.copy_(linear.bias)
        shapes = gate_shapes(FACTORS[linear.in_features], FACTORS[linear.out_features], rank)
        self._setup({k: _uniform(s, math.sqrt(3 / (s[2] * s[3])))
                     for k, s in zip(PAIRS, shapes)})

    def delta(self, gates):
        return torch.einsum(GATES, *[g.to(self.weight.dtype) for g in gates]).reshape(
            self.weight.shape)

    def forward(self, x):
        return F.linear(x, self.effective(), self.bias)


def adapt(model: nn.Module, names, rank=4, variant="L") -> nn.Module:
    """Replace the named Conv3d/Linear modules of ``model`` by published-format layers."""
    for name in names:
        m = model.get_submodule(name)
        new = (PublishedConv3d(m, rank, variant) if isinstance(m, nn.Conv3d)
               else PublishedLinear(m, rank))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return model


def exact(model: nn.Module, base: nn.Module) -> nn.Module:
    """A copy of the published-format ``model`` in fp64 computing its math without the folds'
    roundings: each adapted layer back on ``base``'s weight, nothing folded (the oracle)."""
    model = copy.deepcopy(model).double()
    for name, m in model.named_modules():
        if isinstance(m, _Published):
            with torch.no_grad():
                m.weight.copy_(base.get_submodule(name).weight)
            m.merged.set(False)
            m.frozen_merged.set(False)
    return model


def save_peft_state(model: nn.Module) -> dict:
    """What the published ``save_peft`` keeps: the cores and frozen copies, nothing else."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if "tenvoo" in k or "quanta" in k}
