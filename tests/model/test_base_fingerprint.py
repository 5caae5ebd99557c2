"""Adapter files know their base: save_adapter records a fingerprint of the base weights (and
what the caller says the base was); load_adapter warns, or refuses, when they differ."""
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.ddpm_shapes import tiny_unet
import tenvoo_fast as tf
from tenvoo_fast import AdapterError, BaseMismatchWarning

ORIGIN = {"preset": "tiny", "seed": 0, "base_weights": None}
X, T = torch.rand(1, 1, 8, 8, 8), torch.tensor([10])


def _trained(tmp_path, steps=1, **save):
    """A tiny UNet with the paper's TenVOO-L (adapted biases and norms train), one Adam step,
    saved; returns the model and the file."""
    model = tf.inject(tiny_unet(), tf.presets.paper_ddpm("tenvoo-l", 2))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(X, T).square().mean().backward()
        opt.step()
        opt.zero_grad()
    path = tmp_path / "adapter.safetensors"
    tf.save_adapter(model, path, **save)
    return model, path


def test_same_base_loads_silently_after_training_biases_and_norms(tmp_path):
    """Trained biases and norms are in the file, so they are not part of the fingerprint: a
    fresh copy of the base loads without a warning and reproduces the trained model."""
    model, path = _trained(tmp_path, base_origin=ORIGIN)
    assert tf.read_adapter_base(path) == {"fingerprint": tf.base_fingerprint(model),
                                          "origin": ORIGIN}
    with warnings.catch_warnings():
        warnings.simplefilter("error", BaseMismatchWarning)
        fresh = tf.load_adapter(tiny_unet(), path)
        with torch.no_grad():
            assert torch.equal(fresh(X, T), model(X, T))
        tf.load_adapter(model, path, base_mismatch="error")     # into the trained model itself
    assert tf.base_fingerprint(fresh) == tf.base_fingerprint(model)


def test_changed_base_warns_and_errors_on_request(tmp_path):
    _, path = _trained(tmp_path, base_origin=ORIGIN)
    other = tiny_unet()
    with torch.no_grad():
        other.conv_in.conv.weight[0, 0, 0, 0, 0] += 1e-3    # one weight of a frozen layer
    with pytest.warns(BaseMismatchWarning, match="base weights differ") as record:
        tf.load_adapter(other, path)
    message = str(record[0].message)
    assert str(path) in message and json.dumps(ORIGIN) in message
    assert "base_mismatch='error'" in message and "\n" not in message
    other = tiny_unet(seed=1)
    with pytest.raises(AdapterError, match="base weights differ.*base_mismatch='ignore'"):
        tf.load_adapter(other, path, base_mismatch="error")
    with warnings.catch_warnings():
        warnings.simplefilter("error", BaseMismatchWarning)
        tf.load_adapter(tiny_unet(seed=1), path, base_mismatch="ignore")


def test_changed_adapted_layer_weight_is_a_mismatch(tmp_path):
    """The adapted layers' own frozen weights are part of the base too."""
    model, path = _trained(tmp_path)
    other = tiny_unet()
    name = next(iter(tf.adapter_layers(model)))
    with torch.no_grad():
        other.get_submodule(name).weight.mul_(1.5)
    with pytest.raises(AdapterError, match=r"base weights differ.*the file's base: not recorded"):
        tf.load_adapter(other, path, base_mismatch="error")


def test_into_an_already_injected_model(tmp_path):
    _, path = _trained(tmp_path)
    same = tf.inject(tiny_unet(), tf.presets.paper_ddpm("tenvoo-l", 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", BaseMismatchWarning)
        tf.load_adapter(same, path)
    changed = tf.inject(tiny_unet(seed=3), tf.presets.paper_ddpm("tenvoo-l", 2))
    with pytest.warns(BaseMismatchWarning):
        tf.load_adapter(changed, path)


def test_file_without_fingerprint_loads_silently(tmp_path):
    """Files written before fingerprints (no base_* metadata) still load, without a check."""
    model, path = _trained(tmp_path)
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if not k.startswith("base_")}
    old = tmp_path / "old.safetensors"
    save_file(load_file(str(path)), str(old), metadata=meta)
    assert tf.read_adapter_base(old) == {"fingerprint": None, "origin": None}
    with warnings.catch_warnings():
        warnings.simplefilter("error", BaseMismatchWarning)
        fresh = tf.load_adapter(tiny_unet(seed=5), old, base_mismatch="error")
    assert tf.adapter_layers(fresh)


def test_bad_arguments_are_clear(tmp_path):
    model, path = _trained(tmp_path)
    with pytest.raises(AdapterError, match="base_mismatch must be one of"):
        tf.load_adapter(tiny_unet(), path, base_mismatch="strict")
    with pytest.raises(AdapterError, match="base_origin is not JSON"):
        tf.save_adapter(model, tmp_path / "b.safetensors", base_origin={"x": object()})
    assert not (tmp_path / "b.safetensors").exists()


def test_fingerprint_covers_bytes_dtype_and_excludes_the_adapter(tmp_path):
    model = tf.inject(tiny_unet(), tf.presets.paper_ddpm("tenvoo-l", 2))
    before = tf.base_fingerprint(model)
    layer = next(iter(tf.adapter_layers(model).values()))
    with torch.no_grad():
        layer.cores[0].add_(1.0)                  # the adapter: not part of the base
        layer.bias.add_(1.0)                      # a trained (saved) bias: not either
    assert tf.base_fingerprint(model) == before
    with torch.no_grad():
        layer.weight.view(-1)[0] = layer.weight.view(-1)[0].item()   # same bytes
    assert tf.base_fingerprint(model) == before
    model.double()
    assert tf.base_fingerprint(model) != before
