"""fold_frozen: T(θ0) folded into fp32 base weights (no resident copy), low-precision bases
keep their copy and their bits, and a folded model is never silently mixed with unfolded state."""
import copy
import warnings

import pytest
import torch
from torch import nn

import tenvoo_fast as tf
from tenvoo_fast import AdapterError
from tenvoo_fast.contraction import reference

FAST = [b for b in tf.available_backends() if b not in ("reference", "auto")]


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv3d(8, 16, 3, padding=1), nn.GroupNorm(2, 16),
                         nn.Conv3d(16, 8, 3, padding=1), nn.Flatten(1), nn.Linear(8 * 27, 8))


def _injected(seed=0, method="tenvoo-l"):
    model = _model(seed)
    torch.manual_seed(1)
    tf.inject(model, tf.AdapterConfig(method, 2, [r"^0$", r"^2$", r"^4$"],
                                      trainable=("bias", "norm")))
    return model


def _train(model, x, steps=3):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(steps):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()


def _rel(y, oracle):
    return ((y.double() - oracle).norm() / oracle.norm()).item()


@pytest.mark.parametrize("method", ["tenvoo-l", "tenvoo-q"])
def test_fold_keeps_no_copy_and_computes_the_same_function(method):
    model = _injected(method=method)
    unfolded = copy.deepcopy(model)
    oracle = copy.deepcopy(model).double()
    x = torch.randn(2, 8, 3, 3, 3)
    unfolded(x)
    assert all(l.cached_tensors() for l in tf.adapter_layers(unfolded).values())
    layers = tf.adapter_layers(model)
    t0 = {n: reference.delta_weight(l.network, [t.double() for t in l.frozen_cores])
          for n, l in layers.items()}
    assert tf.fold_frozen(model) == list(layers)
    assert tf.folded_layers(model) == list(layers)
    assert tf.fold_frozen(model) == []                       # only once
    for name, layer in layers.items():
        assert layer.frozen_delta_weight() is None
        exact = tf.adapter_layers(unfolded)[name].weight.double() - t0[name].reshape(
            layer.weight.shape)
        # W - T(θ0) rounded once: within half an ulp of its largest entries.
        err = (layer.weight.double() - exact).abs().max()
        assert err <= 0.5 * torch.finfo(torch.float32).eps * exact.abs().max()
    y64 = oracle(x.double())
    for backend in ["reference", "auto", *FAST]:
        with tf.use_backend(backend):
            y = model(x)
        assert not any(l.cached_tensors() for l in layers.values())
        # Not exact at initialisation (measured 1.4-2.4e-5 against the fp64 oracle, where the
        # unfolded model's error is 3e-7): the rounding of W - T(θ0).
        assert _rel(y, y64) < 1e-4


@pytest.mark.parametrize("method", ["tenvoo-l", "tenvoo-q"])
def test_once_cores_move_the_fold_costs_no_accuracy(method):
    """After training, ``T(θ) - T(θ0)`` carries a rounding of the same size as the fold's:
    folded and unfolded models are equally far from the fp64 oracle (measured 0.8-1.1x)."""
    model = _injected(method=method)
    x = torch.randn(2, 8, 3, 3, 3)
    _train(model, x, steps=20)
    folded = copy.deepcopy(model)
    tf.fold_frozen(folded)
    y64 = copy.deepcopy(model).double()(x.double())
    assert _rel(folded(x), y64) < 2 * _rel(model(x), y64)
    opt = torch.optim.Adam([p for p in folded.parameters() if p.requires_grad], lr=1e-3)
    folded(x).square().mean().backward()                     # and it trains on
    opt.step()


def test_folded_layers_run_merged_also_under_bf16_autocast():
    """factorized adds T(θ)·x to conv(x, W - T(θ0)), two large terms after the base conv has
    rounded (in bf16: ~60% off); a folded layer runs merged, which forms the weight in fp32,
    and is then within bf16's rounding under autocast, as the unfolded layer is."""
    model = _injected()
    unfolded = copy.deepcopy(model)
    oracle = copy.deepcopy(model).double()
    tf.fold_frozen(model)
    x = torch.randn(2, 8, 3, 3, 3)
    y64 = oracle(x.double())
    for backend in FAST:
        with tf.use_backend(backend):
            with tf.use_strategy("factorized"), pytest.raises(AdapterError, match="folded"):
                model(x)
            with tf.use_strategy("factorized", strict=False):
                assert _rel(model(x), y64) < 1e-4
            assert model[0].execution_strategy == "merged"
            with torch.autocast("cpu", dtype=torch.bfloat16):
                folded_err, plain_err = _rel(model(x), y64), _rel(unfolded(x), y64)
            # Both at bf16's rounding (4e-3 to 8e-3 here); factorized would be ~0.6.
            assert folded_err < 3 * plain_err, (backend, folded_err, plain_err)


def test_a_shared_weight_is_not_folded_twice():
    shared = nn.Sequential(nn.Conv3d(8, 8, 3, padding=1), nn.Conv3d(8, 8, 3, padding=1))
    shared[1].weight = shared[0].weight
    tf.inject(shared, tf.AdapterConfig("tenvoo-l", 2, [r"^0$", r"^1$"]))
    bits = shared[0].weight.detach().clone()
    assert tf.fold_frozen(shared) == []
    assert torch.equal(shared[0].weight, bits)


def test_low_precision_bases_keep_their_copy_and_bits():
    model = _injected()
    model[2].to(torch.bfloat16)
    bits = model[2].weight.detach().clone()
    folded = tf.fold_frozen(model)
    assert "2" not in folded and folded == ["0", "4"]
    assert torch.equal(model[2].weight, bits) and not model[2].frozen_folded


def test_a_folded_model_refuses_low_precision_casts():
    model = _injected()
    tf.fold_frozen(model)
    with pytest.raises(AdapterError, match="folded"):
        model.to(torch.bfloat16)
    model.double()                                            # a wider cast keeps W - T(θ0)
    assert model[0].weight.dtype == torch.float64


def test_state_dicts_do_not_mix_folded_and_unfolded(tmp_path):
    folded, plain = _injected(), _injected()
    tf.fold_frozen(folded)
    from safetensors.torch import load_file, save_file
    save_file({k: v.contiguous() for k, v in folded.state_dict().items()},
              str(tmp_path / "folded.safetensors"))
    for state in (folded.state_dict(), dict(folded.state_dict()),
                  load_file(str(tmp_path / "folded.safetensors"))):
        with pytest.raises(AdapterError, match="folded"):
            plain.load_state_dict(state)
        again = _injected()
        tf.fold_frozen(again)
        again.load_state_dict(state)                          # folded into folded: fine
    with pytest.raises(AdapterError, match="folded"):
        folded.load_state_dict(plain.state_dict())
    frozen_only = {k: v for k, v in _injected(seed=3).state_dict().items() if "frozen_cores" in k}
    with pytest.raises(AdapterError, match="frozen copy"):
        folded.load_state_dict(frozen_only, strict=False)


def test_adapter_files_of_a_folded_model_load_into_a_fresh_base(tmp_path):
    model = _injected()
    tf.fold_frozen(model)
    x = torch.randn(2, 8, 3, 3, 3)
    _train(model, x)
    tf.save_adapter(model, tmp_path / "a.safetensors")
    fresh = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")                        # the base fingerprint matches
        tf.load_adapter(fresh, tmp_path / "a.safetensors")
    assert _rel(model(x), fresh(x).double()) < 1e-4      # the fold's rounding apart
    with pytest.raises(AdapterError, match="fold"):
        tf.load_adapter(model, tmp_path / "a.safetensors")


def test_finetune_fold_frozen_resumes_exactly(tmp_path):
    """--fold-frozen trains, and a run stopped and resumed folds the same bits: its losses are
    the uninterrupted run's."""
    import json

    from tenvoo_fast.ddpm.cli import main
    common = ["finetune", "--preset", "tiny", "--device", "cpu", "--num-volumes", "3",
              "--accum", "1", "--method", "tenvoo-l", "--fold-frozen"]
    assert main([*common, "--steps", "4", "--out", str(tmp_path / "whole")]) == 0
    assert main([*common, "--steps", "2", "--out", str(tmp_path / "split")]) == 0
    plain = [c for c in common if c != "--fold-frozen"]
    assert main([*plain, "--steps", "4", "--resume", "--out", str(tmp_path / "split")]) != 0
    assert main([*common, "--steps", "4", "--resume", "--out", str(tmp_path / "split")]) == 0
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    split = json.loads((tmp_path / "split" / "metrics.json").read_text())
    assert whole["fold_frozen"] is True
    assert split["losses"] == whole["losses"] and split["val_loss"] == whole["val_loss"]
