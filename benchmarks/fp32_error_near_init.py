"""fp32 error of an adapted layer near initialisation, merged against factorized strategy.

Near θ0 the update T(θ) - T(θ0) is a small difference of two large terms. This measures, for
TenVOO-L/Q at a few DDPM shapes (cores moved by 0.1%, pre-trained-like base weights, 3 seeds),
the relative error against the fp64 oracle of the output, of the adapter's contribution
(output minus the base conv's) and of the input and core gradients, on the ``torch`` backend;
and the same for QuanTA Linear layers at the DDPM's square and widening shapes.

Usage: ``PYTHONPATH=. python benchmarks/fp32_error_near_init.py > table.md``
"""
from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from tests.layer_checks import oracle_forward_and_grads, realistic_conv
from tests.oracle import rel_err
from tenvoo_fast import QuanTALinear, TenVOOConv3d, use_backend, use_strategy
from tenvoo_fast.ddpm.system import versions

SHAPES = [(32, 64), (64, 64), (128, 256), (256, 128)]
SEEDS = range(3)
MOVE = 1e-3


LINEAR_SHAPES = [(128, 128), (512, 512), (256, 512)]


def errors(layer, x, strategy, kind="conv"):
    if kind == "conv":
        base = F.conv3d(x.double(), layer.weight.double(), layer.bias.double(), padding=1)
    else:
        base = F.linear(x.double(), layer.weight.double(), layer.bias.double())
    gy = torch.randn(base.shape, dtype=torch.float64)
    y0, gx0, gc0 = oracle_forward_and_grads(layer, x, gy, kind)
    xx = x.clone().requires_grad_()
    layer.zero_grad()
    with use_backend("torch"), use_strategy(strategy):
        y = layer(xx)
        y.backward(gy.float())
    return (rel_err(y, y0), rel_err(y.double() - base, y0 - base), rel_err(xx.grad, gx0),
            max(rel_err(p.grad, g) for p, g in zip(layer.cores, gc0)))


def main() -> None:
    print(f"torch backend, fp32, r=4, cores moved {MOVE:g} (relative) from θ0, mean of "
          f"{len(SEEDS)} seeds; {versions()}\n")
    print("| variant | shape | strategy | output | adapter term | input grad | core grads (max) |")
    print("|---|---|---|---:|---:|---:|---:|")
    for variant in "LQ":
        for cin, cout in SHAPES:
            rows = {}
            for seed in SEEDS:
                torch.manual_seed(seed)
                layer = TenVOOConv3d.from_conv(realistic_conv(cin, cout), 4, variant)
                with torch.no_grad():
                    for p in layer.cores:
                        p.mul_(1 + MOVE * torch.randn_like(p))
                x = torch.randn(1, cin, 4, 4, 4)
                for strategy in ("merged", "factorized"):
                    # Same gy for both strategies: reseed before each.
                    torch.manual_seed(1000 + seed)
                    rows.setdefault(strategy, []).append(errors(layer, x, strategy))
            for strategy, errs in rows.items():
                cells = " | ".join(f"{statistics.mean(c):.2e}" for c in zip(*errs))
                print(f"| TenVOO-{variant} | {cin}->{cout} | {strategy} | {cells} |")
    for cin, cout in LINEAR_SHAPES:
        rows = {}
        for seed in SEEDS:
            torch.manual_seed(seed)
            linear = torch.nn.Linear(cin, cout)
            with torch.no_grad():
                linear.weight.normal_(0, 0.02)
            layer = QuanTALinear.from_linear(linear, 4)
            with torch.no_grad():
                for p in layer.cores:
                    p.mul_(1 + MOVE * torch.randn_like(p))
            x = torch.randn(16, cin)
            for strategy in ("merged", "factorized"):
                torch.manual_seed(1000 + seed)
                rows.setdefault(strategy, []).append(errors(layer, x, strategy, "linear"))
        for strategy, errs in rows.items():
            cells = " | ".join(f"{statistics.mean(c):.2e}" for c in zip(*errs))
            print(f"| QuanTA | {cin}->{cout} | {strategy} | {cells} |")


if __name__ == "__main__":
    main()
