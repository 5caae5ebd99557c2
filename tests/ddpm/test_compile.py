"""``--compile``: the training forward and backward under ``torch.compile``; the adapted UNet
traces as one graph under ``auto``, and names, files and validation stay the plain model's."""
import functools
import json

import pytest
import torch
from torch import nn

from tenvoo_fast.ddpm.cli import main
from tenvoo_fast.ddpm.run_options import FinetuneOptions
from tenvoo_fast.ddpm.unets import build_unet
from tenvoo_fast.model import AdapterConfig, inject, unwrap


def test_unwrap_sees_through_compile():
    model = nn.Sequential(nn.Linear(2, 2))
    assert unwrap(torch.compile(model)) is model


@pytest.mark.parametrize("method", ["tenvoo-l", "tenvoo-q"])
def test_auto_traces_the_adapted_unet_in_one_graph(method):
    """On the CPU ``auto`` ranks the reference first for Linear layers; while tracing it must
    not pick it (opt_einsum's path search broke the tiny UNet into 91 graphs)."""
    torch.manual_seed(0)
    model = build_unet("tiny")
    defaults = FinetuneOptions()
    inject(model, AdapterConfig(method=method, rank=4, target_modules=list(defaults.targets),
                                trainable=tuple(defaults.trainable)))
    x, t = torch.randn(1, 1, 16, 16, 16), torch.tensor([10])
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda x, t: model(x, t).square().mean())(x, t)
    assert explained.graph_break_count == 0, [b.reason[:200] for b in explained.break_reasons]


def test_finetune_compiled_trains_like_eager(tmp_path, monkeypatch):
    """The plumbing, through dynamo and AOT autograd (``aot_eager``: inductor's code generation
    of the whole UNet takes minutes on two cores; tests/ops/test_merged.py runs inductor on
    the op)."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    common = ["finetune", "--preset", "tiny", "--device", "cpu", "--num-volumes", "3",
              "--accum", "1", "--steps", "2", "--method", "tenvoo-l"]
    assert main([*common, "--compile", "--out", str(tmp_path / "compiled")]) == 0
    assert main([*common, "--out", str(tmp_path / "eager")]) == 0
    compiled = json.loads((tmp_path / "compiled" / "metrics.json").read_text())
    eager = json.loads((tmp_path / "eager" / "metrics.json").read_text())
    assert compiled["compile"] is True and eager["compile"] is False
    for a, b in zip(compiled["losses"], eager["losses"], strict=True):
        assert abs(a - b) <= 1e-5 * abs(b), (compiled["losses"], eager["losses"])
    assert abs(compiled["val_loss"] - eager["val_loss"]) <= 1e-5 * abs(eager["val_loss"])
    names = set(json.loads((tmp_path / "compiled" / "checkpoint.json").read_text()).keys())
    assert names == set(json.loads((tmp_path / "eager" / "checkpoint.json").read_text()).keys())
    from safetensors import safe_open
    with safe_open(str(tmp_path / "compiled" / "adapter.safetensors"), "pt") as f:
        assert f.keys() and not any("_orig_mod" in k for k in f.keys())
