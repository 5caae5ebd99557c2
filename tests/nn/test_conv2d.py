"""Adapted Conv2d layers (LoRA, LoHa, LoKr; what peft and LyCORIS users bring from 2-D models):
forward and gradients against the fp64 oracle for every dtype, drop-in behaviour, and the
dispatch rule that the reference runs them."""
import pytest
import torch
from torch import nn

import tenvoo_fast as tf
from tenvoo_fast import AdapterError, LoHaConv2d, LoKrConv2d, LoRAConv2d
from tests.layer_checks import TOL, check_against_oracle, train_a_little

CONV2D_MAKERS = {
    "lora": lambda c, r: LoRAConv2d.from_conv(c, r),
    "lora-bypass": lambda c, r: LoRAConv2d.from_conv(c, r, mode="bypass"),
    "loha": lambda c, r: LoHaConv2d.from_conv(c, r),
    "lokr": lambda c, r: LoKrConv2d.from_conv(c, r),
}
#: (in, out, kernel, conv options, input spatial size): a square kernel, a 3x1 one with stride,
#: dilation and asymmetric padding, a 1x1 (peft's own merge fails there for Conv3d).
SHAPES = [(12, 10, 3, dict(padding=1), (6, 5)),
          (5, 7, (3, 1), dict(stride=(2, 1), padding=(2, 0), dilation=(2, 1)), (9, 4)),
          (16, 24, 1, {}, (3, 3))]


def conv2d(cin, cout, k, options, dtype):
    conv = nn.Conv2d(cin, cout, k, dtype=dtype, **options)
    with torch.no_grad():
        conv.weight.normal_(0, 0.02)
        conv.bias.normal_(0, 0.02)
    return conv


@pytest.mark.parametrize("shape", SHAPES, ids=["3x3", "3x1-strided-dilated", "1x1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", list(CONV2D_MAKERS))
def test_conv2d_forward_and_grads_against_the_oracle(method, dtype, shape, seeded):
    cin, cout, k, options, spatial = shape
    layer = train_a_little(CONV2D_MAKERS[method](conv2d(cin, cout, k, options, dtype), 3))
    check_against_oracle(layer, torch.randn(2, cin, *spatial, dtype=dtype), "conv", TOL[dtype])


@pytest.mark.parametrize("method", list(CONV2D_MAKERS))
def test_conv2d_identical_to_base_at_init(method, seeded):
    conv = conv2d(8, 6, 3, dict(padding=1), torch.float32)
    layer = CONV2D_MAKERS[method](conv, 4)
    x = torch.randn(2, 8, 5, 5)
    assert torch.equal(layer(x), conv(x))


def test_the_reference_runs_conv2d_and_a_named_fast_backend_says_so(seeded):
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.Conv3d(6, 6, 1))
    tf.inject(model, tf.AdapterConfig(method="lora", rank=2, target_modules=[r"^0$"]))
    x = torch.randn(1, 4, 5, 5)
    with tf.use_backend("auto"):
        model[0](x)
    assert tf.execution_plan(model)[0]["backend"] == "reference"
    with tf.use_backend("torch"), pytest.raises(
            AdapterError, match=r"^0: backend 'torch' cannot run this layer: a Conv2d"):
        model[0](x)


def test_inject_save_load_and_merge_a_conv2d_model(tmp_path, seeded):
    def net():
        torch.manual_seed(1)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.Conv2d(8, 4, 3),
                             nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    config = tf.AdapterConfig(method="loha", rank=2, target_modules=[r"^[024]$"])
    model = tf.inject(net(), config)
    assert [type(m).__name__ for m in tf.adapter_layers(model).values()] == [
        "LoHaConv2d", "LoHaConv2d", "LoHaLinear"]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{i}.cores.{c}" for i in (0, 2, 4) for c in range(4)}
    for layer in tf.adapter_layers(model).values():
        train_a_little(layer, 0.3)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        want = model(x)
    tf.save_adapter(model, tmp_path / "a.safetensors")
    fresh = net()
    tf.load_adapter(fresh, tmp_path / "a.safetensors")
    with torch.no_grad():
        assert torch.equal(fresh(x), want)
        merged = tf.merge_and_unload(fresh)
        assert type(merged[0]) is nn.Conv2d
        torch.testing.assert_close(merged(x), want, rtol=1e-5, atol=1e-6)


def test_conv2d_drop_in_attributes_and_refusals():
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    layer = LoRAConv2d.from_conv(conv, 2)
    assert isinstance(layer, nn.Conv2d) and layer.weight is conv.weight
    assert (layer.stride, layer.padding, layer.in_channels) == ((2, 2), (1, 1), 4)
    assert set(layer.state_dict()) == {"weight", "bias", "cores.0", "cores.1"}
    with pytest.raises(AdapterError, match=r"needs an nn.Conv2d, got Conv3d; adapt Conv3d"):
        LoRAConv2d.from_conv(nn.Conv3d(4, 4, 3), 2)
    with pytest.raises(AdapterError, match=r"grouped convolution \(groups=2\)"):
        LoKrConv2d.from_conv(nn.Conv2d(4, 4, 3, groups=2), 2)
    with pytest.raises(AdapterError, match=r"^0: method 'tenvoo-l' cannot adapt a Conv2d "
                                           r"\(lora, loha, lokr can\)"):
        tf.inject(nn.Sequential(nn.Conv2d(4, 4, 3)),
                  tf.AdapterConfig(method="tenvoo-l", rank=2, target_modules=[r"^0$"]))
