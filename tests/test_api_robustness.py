"""The model API under less common conditions: inference mode, low-precision models, the meta
device, bad save paths and memory checks. Each test here failed before its fix."""
import pytest
import torch
from torch import nn

import tenvoo_fast as tf
from tenvoo_fast import AdapterError, QuanTALinear, TenVOOConv3d

FAST = [b for b in tf.available_backends() if b not in ("reference", "auto")]


def _combos(strategies):
    """(backend, strategy) pairs: the reference once, every fast backend with each strategy."""
    return [("reference", "auto"), ("auto", "auto")] + [(b, s) for b in FAST for s in strategies]


# -- 1. inference mode leaves nothing that breaks training ---------------------------------------
def _train(layer, x, steps=2):
    opt = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(steps):
        layer(x.clone().requires_grad_(True)).square().sum().backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("backend,strategy", _combos(["merged", "factorized"]))
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_inference_mode_forward_does_not_break_training(kind, backend, strategy, seeded):
    """One forward under torch.inference_mode must not leave an inference tensor in the layer's
    T(θ0) cache or in the process-wide scratch pool: training that layer, and a second fresh
    layer of the same shape, must work afterwards."""
    if kind == "conv":
        layers = [TenVOOConv3d.from_conv(nn.Conv3d(8, 8, 3, padding=1), rank=2)
                  for _ in range(2)]
        x = torch.randn(1, 8, 4, 4, 3)
    else:
        layers = [QuanTALinear.from_linear(nn.Linear(8, 8), rank=2) for _ in range(2)]
        x = torch.randn(5, 8)
    with tf.use_backend(backend), tf.use_strategy(strategy):
        with torch.inference_mode():
            y_inf = layers[0](x)
        for layer in layers:
            _train(layer, x)
    assert y_inf.is_inference()
