"""inject / merge_and_unload / save_adapter / load_adapter on MONAI's DiffusionModelUNet."""
import os
import re

import pytest
import torch
from torch import nn

from tests.ddpm_shapes import paper_unet, tiny_unet
from tests.oracle import SPEC_TABLE, eq6, quanta_params
import tenvoo_fast
from tenvoo_fast import (AdapterConfig, AdapterError, adapter_layers, count_parameters, inject,
                         load_adapter, merge_and_unload, presets, save_adapter)
from tenvoo_fast.model.presets import PAPER_DDPM_TARGETS


def expected_paper_trainable(model, variant, rank, joint=False):
    """Derived from the specs alone: Eq. (6) for the adapted convs, §4's gate shapes for the
    adapted linears, plus adapted biases and 'norm' parameters (or, joint, everything but the
    adapted layers' weights and biases)."""
    pats = [re.compile(p) for p in PAPER_DDPM_TARGETS]
    cores, adapted_w, adapted_b = 0, 0, 0
    for name, m in model.named_modules():
        if not name or not any(p.search(name) for p in pats):
            continue
        if isinstance(m, nn.Conv3d):
            if m.in_channels == 1 or m.out_channels == 1:
                continue
            cores += eq6(variant, SPEC_TABLE[m.in_channels], SPEC_TABLE[m.out_channels],
                         m.kernel_size, rank)
        else:
            cores += quanta_params(SPEC_TABLE[m.in_features], SPEC_TABLE[m.out_features], rank)
        adapted_w += m.weight.numel()
        adapted_b += m.bias.numel() if m.bias is not None else 0
    if joint:
        total = sum(p.numel() for p in model.parameters())
        return cores + total - adapted_w - adapted_b
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n.lower())
    return cores + adapted_b + norms


@pytest.mark.parametrize("method,published", [("tenvoo-l", 601_024), ("tenvoo-q", 603_904)])
def test_paper_ddpm_trainable_counts(method, published):
    base = paper_unet("meta")
    assert sum(p.numel() for p in base.parameters()) == 166_669_313
    expected = expected_paper_trainable(base, method[-1].upper(), 4)
    model = inject(paper_unet("meta"), presets.paper_ddpm(method, 4))
    layers = adapter_layers(model)
    assert sum(isinstance(m, nn.Conv3d) for m in layers.values()) == 60
    assert sum(isinstance(m, nn.Linear) for m in layers.values()) == 51
    assert count_parameters(model) == expected == published


@pytest.mark.parametrize("method,published", [("tenvoo-l", 47_364_225), ("tenvoo-q", 47_367_105)])
def test_paper_ddpm_joint_counts(method, published):
    """Table 2's joint fine-tuning (47.36 M for TenVOO-L in the paper)."""
    expected = expected_paper_trainable(paper_unet("meta"), method[-1].upper(), 4, joint=True)
    model = inject(paper_unet("meta"), presets.paper_ddpm(method, 4, joint=True))
    assert count_parameters(model) == expected == published


def test_middle_block_is_not_adapted():
    model = inject(paper_unet("meta"), presets.paper_ddpm("tenvoo-l", 4))
    assert not any(n.startswith("middle_block") for n in adapter_layers(model))


@pytest.mark.parametrize("method", ["tenvoo-l", "tenvoo-q", "lora", "loha", "lokr"])
def test_inject_reproduces_base_and_freezes(method):
    base = tiny_unet()
    model = tiny_unet()
    x, t = torch.rand(1, 1, 8, 8, 8), torch.tensor([10])
    y0 = base(x, t)
    inject(model, presets.paper_ddpm(method, 3))
    assert torch.equal(model(x, t), y0)
    for name, p in model.named_parameters():
        is_core = ".cores." in name
        is_adapted_bias = name.endswith(".bias") and name[:-5] in adapter_layers(model)
        assert p.requires_grad == (is_core or is_adapted_bias or "norm" in name.lower()), name


def _train(model, steps=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        x = torch.rand(1, 1, 8, 8, 8, generator=g)
        t = torch.randint(0, 1000, (1,), generator=g)
        loss = model(x, t).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("method", ["tenvoo-l", "tenvoo-q", "lora", "loha", "lokr"])
def test_merge_and_unload_reproduces_adapted_model(method):
    model = inject(tiny_unet(), presets.paper_ddpm(method, 3))
    _train(model)
    x, t = torch.rand(1, 1, 8, 8, 8), torch.tensor([500])
    with torch.no_grad():
        y = model(x, t)
        merge_and_unload(model)
        assert not adapter_layers(model)
        assert all(type(m) in (nn.Conv3d, nn.Linear) for n, m in model.named_modules()
                   if n.endswith("conv1.conv") or n.endswith("to_q"))
        assert torch.allclose(model(x, t), y, rtol=1e-5, atol=1e-6)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("method", ["tenvoo-l", "tenvoo-q", "lora", "loha", "lokr"])
def test_save_load_round_trip_is_exact(method, tmp_path):
    model = inject(tiny_unet(seed=0), presets.paper_ddpm(method, 3))
    _train(model)
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path)
    assert [f for f in os.listdir(tmp_path)] == ["adapter.safetensors"]  # no temp files left
    fresh = tiny_unet(seed=0)  # same base weights, no adapter
    load_adapter(fresh, path)
    x, t = torch.rand(1, 1, 8, 8, 8), torch.tensor([123])
    with torch.no_grad():
        assert torch.equal(fresh(x, t), model(x, t))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {n for n, p in fresh.named_parameters() if p.requires_grad}
    for n, p in model.named_parameters():
        if "norm" in n or n.endswith("conv1.conv.bias"):
            assert torch.equal(p, dict(fresh.named_parameters())[n]), n


def test_joint_save_load_includes_everything_trained(tmp_path):
    model = inject(tiny_unet(), presets.paper_ddpm("tenvoo-l", 2, joint=True))
    _train(model, steps=2)
    save_adapter(model, tmp_path / "a.safetensors")
    fresh = load_adapter(tiny_unet(), tmp_path / "a.safetensors")
    x, t = torch.rand(1, 1, 8, 8, 8), torch.tensor([7])
    with torch.no_grad():
        assert torch.equal(fresh(x, t), model(x, t))


def test_load_into_already_injected_model_with_same_config(tmp_path):
    model = inject(tiny_unet(), presets.paper_ddpm("tenvoo-q", 2))
    _train(model, steps=1)
    save_adapter(model, tmp_path / "a.safetensors")
    other = inject(tiny_unet(), presets.paper_ddpm("tenvoo-q", 2))
    load_adapter(other, tmp_path / "a.safetensors")
    x, t = torch.rand(1, 1, 8, 8, 8), torch.tensor([3])
    with torch.no_grad():
        assert torch.equal(other(x, t), model(x, t))


def test_load_refuses_other_configuration(tmp_path):
    model = inject(tiny_unet(), presets.paper_ddpm("tenvoo-l", 2))
    save_adapter(model, tmp_path / "a.safetensors")
    other = inject(tiny_unet(), presets.paper_ddpm("tenvoo-l", 3))
    with pytest.raises(AdapterError, match="different adapter configuration.*rank"):
        load_adapter(other, tmp_path / "a.safetensors")


def test_load_refuses_other_base_shape(tmp_path):
    model = inject(tiny_unet(), presets.paper_ddpm("lora", 2))
    save_adapter(model, tmp_path / "a.safetensors")
    with pytest.raises(AdapterError, match="trained on a layer with|base architecture"):
        load_adapter(tiny_unet(channels=(16, 16, 16, 16)), tmp_path / "a.safetensors")


def test_load_refuses_foreign_and_missing_files(tmp_path):
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(AdapterError, match="not a tenvoo_fast adapter"):
        load_adapter(tiny_unet(), tmp_path / "plain.safetensors")
    with pytest.raises(AdapterError, match="does not exist"):
        load_adapter(tiny_unet(), tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file format")
    with pytest.raises(AdapterError, match="not a readable safetensors"):
        load_adapter(tiny_unet(), tmp_path / "junk.safetensors")


def test_save_is_atomic(tmp_path, monkeypatch):
    model = inject(tiny_unet(), presets.paper_ddpm("tenvoo-l", 2))
    path = tmp_path / "a.safetensors"
    save_adapter(model, path)
    before = path.read_bytes()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tenvoo_fast.model.adapter_file, "save_file", boom)
    _train(model, steps=1)
    with pytest.raises(RuntimeError, match="disk full"):
        save_adapter(model, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["a.safetensors"]


def test_save_without_adapters_is_refused(tmp_path):
    with pytest.raises(AdapterError, match="no adapters"):
        save_adapter(tiny_unet(), tmp_path / "a.safetensors")


def test_bad_configs_are_refused():
    with pytest.raises(AdapterError, match="unknown method 'tenvoo-x'"):
        AdapterConfig("tenvoo-x", 4, ["a"])
    with pytest.raises(AdapterError, match="rank"):
        AdapterConfig("lora", 0, ["a"])
    with pytest.raises(AdapterError, match="not a valid regular expression"):
        AdapterConfig("lora", 2, ["conv1("])
    with pytest.raises(AdapterError, match="trainable"):
        AdapterConfig("lora", 2, ["a"], trainable=("biases",))
    with pytest.raises(AdapterError, match=r"factors\[64\]"):
        AdapterConfig("tenvoo-l", 2, ["a"], factors={64: (4, 4, 2)})


def test_pattern_matching_nothing_is_named():
    cfg = AdapterConfig("tenvoo-l", 2, [r".*resnets.*.conv1.conv", r".*to_z$"])
    with pytest.raises(AdapterError, match=r"\['\.\*to_z\$'\] match no module"):
        inject(tiny_unet(), cfg)


def test_non_conv_linear_match_is_refused():
    cfg = AdapterConfig("tenvoo-l", 2, [r"down_blocks.0.resnets.0.conv1$"])
    with pytest.raises(AdapterError, match=r"down_blocks\.0\.resnets\.0\.conv1.*Convolution.*\.conv"):
        inject(tiny_unet(), cfg)
    cfg = AdapterConfig("tenvoo-l", 2, [r"norm1$"])
    with pytest.raises(AdapterError, match="GroupNorm"):
        inject(tiny_unet(), cfg)


def test_inject_twice_is_refused():
    model = inject(tiny_unet(), presets.paper_ddpm("tenvoo-l", 2))
    with pytest.raises(AdapterError, match="already has adapters"):
        inject(model, presets.paper_ddpm("tenvoo-l", 2))


def test_single_channel_convs_are_skipped_unless_asked():
    model = inject(nn.Sequential(nn.Conv3d(1, 8, 3), nn.Conv3d(8, 8, 3), nn.Conv3d(8, 1, 3)),
                   AdapterConfig("tenvoo-l", 2, ["^[012]$"]))
    assert list(adapter_layers(model)) == ["1"] and model.tenvoo_skipped == ["0", "2"]
    model = inject(nn.Sequential(nn.Conv3d(1, 8, 3)),
                   AdapterConfig("tenvoo-l", 2, ["^0$"], skip_single_channel=False))
    assert list(adapter_layers(model)) == ["0"]


def test_grouped_conv_in_model_is_refused():
    model = nn.Sequential(nn.Conv3d(4, 4, 3, groups=2))
    with pytest.raises(AdapterError, match="0: grouped convolution"):
        inject(model, AdapterConfig("tenvoo-l", 2, ["0"]))


def test_layer_and_channel_factor_overrides():
    model = nn.Sequential(nn.Conv3d(8, 8, 3), nn.Conv3d(8, 12, 3))
    cfg = AdapterConfig("tenvoo-l", 2, ["^[01]$"],
                        factors={8: (4, 2, 1), "1": ((2, 2, 2), (3, 2, 2))})
    inject(model, cfg)
    assert model[0].network.meta["in_factors"] == (4, 2, 1)
    assert model[1].network.meta["in_factors"] == (2, 2, 2)
    assert model[1].network.meta["out_factors"] == (3, 2, 2)
    bad = AdapterConfig("tenvoo-l", 2, ["^1$"], factors={"1": ((2, 2, 2), (2, 2, 2))})
    with pytest.raises(AdapterError, match=r"1: output factorisation \[2, 2, 2\].*12"):
        inject(nn.Sequential(nn.Conv3d(8, 8, 3), nn.Conv3d(8, 12, 3)), bad)


def test_config_round_trips_through_dict():
    cfg = presets.paper_ddpm("tenvoo-q", 5, factors={96: (4, 4, 6), "x.conv": ((2, 1, 1), (1, 1, 2))})
    assert AdapterConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()
