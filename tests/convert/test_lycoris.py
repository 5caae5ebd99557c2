"""LyCORIS-applied models converted to tenvoo_fast's layers (tenvoo_fast/convert/): trained with
LyCORIS, converted, the same outputs and gradients (fp32 rounding), LoKr's scale rule included;
options tenvoo_fast does not reproduce are refused naming the layer."""
import copy
import logging

import pytest
import torch

import tenvoo_fast as tf
from tenvoo_fast.errors import AdapterError
from tests.convert.test_peft_lora import Net, _grads, inputs

lycoris = pytest.importorskip("lycoris")
logging.getLogger("LyCORIS").setLevel(logging.ERROR)


def trained_lycoris(algo, rank=4, alpha=2, steps=3, seed=0, dims=3, **options):
    from lycoris import create_lycoris
    torch.manual_seed(seed)
    base = Net(dims)
    model = copy.deepcopy(base)
    network = create_lycoris(model, 1.0, linear_dim=rank, linear_alpha=alpha, conv_dim=rank,
                             conv_alpha=alpha, algo=algo, **options)
    network.apply_to()
    opt = torch.optim.SGD(network.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        model(inputs(2, dims)).square().mean().backward()
        opt.step()
    with torch.no_grad():           # factors away from their initialisation everywhere
        for p in network.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return base, model, network


@pytest.mark.parametrize("dims", [3, 2])
@pytest.mark.parametrize("algo,rank", [("locon", 4), ("loha", 4), ("lokr", 4), ("lokr", 2)])
def test_converted_outputs_and_gradients_are_lycoris_s(algo, rank, dims):
    base, model, network = trained_lycoris(algo, rank, dims=dims)
    model.requires_grad_(False)
    network.requires_grad_(True)
    network.zero_grad()             # the network's factors are not the model's parameters
    x = inputs(3, dims)
    out_peer, dx_peer = _grads(model, x)
    peer_grads = {m.org_module[0]: [p.grad.clone() for p in m.parameters()]
                  for m in network.loras}
    layers_before = {n: m for n, m in model.named_modules() if n in ("conv", "down", "head")}
    ours = tf.convert(model)
    assert ours is model and set(tf.adapter_layers(ours)) == {"conv", "down", "head"}
    assert isinstance(ours.conv, tf.nn.AdaptedConv3d if dims == 3 else tf.nn.AdaptedConv2d)
    out, dx = _grads(ours, x)
    torch.testing.assert_close(out, out_peer, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx, dx_peer, rtol=1e-5, atol=1e-6)
    for name, layer in tf.adapter_layers(ours).items():
        for core, want in zip(layer.cores, peer_grads[layers_before[name]], strict=True):
            torch.testing.assert_close(core.grad, want.reshape(core.shape), rtol=1e-4, atol=1e-6)
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, _ in ours.named_parameters() if ".cores." in n}


@pytest.mark.parametrize("dims", [3, 2])
def test_the_converted_model_saves_loads_and_trains_on(tmp_path, dims):
    base, model, _ = trained_lycoris("lokr", 2, dims=dims)
    ours = tf.convert(model)
    tf.save_adapter(ours, tmp_path / "a.safetensors")
    fresh = copy.deepcopy(base)
    tf.load_adapter(fresh, tmp_path / "a.safetensors")
    x = inputs(2, dims)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), ours(x))
    before = [c.detach().clone() for c in tf.adapter_layers(ours)["conv"].cores]
    ours(x).square().mean().backward()
    torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1).step()
    assert any(not torch.equal(a, b) for a, b in
               zip(before, tf.adapter_layers(ours)["conv"].cores))


def test_tucker_factors_are_refused_naming_the_layer():
    _, model, _ = trained_lycoris("locon", steps=0, use_tucker=True)
    with pytest.raises(AdapterError, match=r"^conv: LyCORIS LoConModule with factors .*"
                                           r"lora_mid.*; tenvoo_fast reproduces the plain"):
        tf.convert(model)
    assert not tf.adapter_layers(model)          # nothing replaced


def test_dropout_is_said():
    _, model, _ = trained_lycoris("loha", steps=0, rank_dropout=0.1)
    with pytest.warns(UserWarning, match=r"rank_dropout=0.1 is not part of tenvoo_fast's"):
        tf.convert(model)
