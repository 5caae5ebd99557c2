"""The published TenVOO code's layers and checkpoints read as tenvoo_fast's (issue 17 items 1
and 2): a model trained with published-format layers (tests/convert/published_format.py, from
the conventions) converts to one that computes the same outputs and gradients (fp32 rounding);
its full state dict and its save_peft file load with ``load_adapter`` into a fresh base."""
import copy

import pytest
import torch
from torch import nn

import tenvoo_fast as tf
from tenvoo_fast.errors import AdapterError
from tenvoo_fast.model.published_checkpoint import IncompleteAdapterWarning

from .published_format import adapt, save_peft_state


class Net(nn.Module):
    """Convs (3x3x3; strided (3,1,3)), QuanTA Linears with equal (16->16) and unequal (16->32)
    factors, a GroupNorm whose name says norm."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(4, 8, 3, padding=1)
        self.down = nn.Conv3d(8, 16, (3, 1, 3), stride=2, padding=(1, 0, 1))
        self.norm = nn.GroupNorm(4, 16)
        self.mix = nn.Linear(16, 16)
        self.head = nn.Linear(16, 32)

    def forward(self, x):
        h = self.norm(self.down(torch.relu(self.conv(x)))).mean(dim=(2, 3, 4))
        return self.head(torch.tanh(self.mix(h)))


TARGETS = ["conv", "down", "mix", "head"]


class Wrapper(nn.Module):
    """The published PeftModel's shape: the model under ``model`` (keys get ``model.``)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)


def trained_published(variant="L", rank=4, steps=3, seed=0):
    """(the base, a wrapped published-format model trained a few steps: cores, adapted biases,
    norms, as the published training trains)."""
    torch.manual_seed(seed)
    base = Net()
    model = Wrapper(adapt(copy.deepcopy(base), TARGETS, rank, variant))
    for n, p in model.named_parameters():
        p.requires_grad_(any(k in n for k in ("tenvoo_weights.", "quanta_weights.", "norm"))
                         or (n.endswith(".bias") and n.split(".")[1] in TARGETS))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(2, 4, 6, 6, 6)).square().mean().backward()
        opt.step()
    return base, model


def _grads(model, x):
    model.zero_grad()
    x = x.clone().requires_grad_(True)
    out = model(x)
    out.square().sum().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("variant", ["L", "Q"])
def test_converted_outputs_and_gradients_are_the_published_layers(variant):
    _, model = trained_published(variant)
    x = torch.randn(3, 4, 6, 6, 6)
    out_pub, dx_pub = _grads(model, x)
    grads_pub = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    ours = tf.convert(model.model)
    assert set(tf.adapter_layers(ours)) == set(TARGETS)
    assert tf.adapter_layers(ours)["conv"].network.method == f"tenvoo-{variant.lower()}"
    out, dx = _grads(ours, x)
    torch.testing.assert_close(out, out_pub, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx_pub, rtol=1e-4, atol=1e-6)
    for name, layer in tf.adapter_layers(ours).items():
        group = "tenvoo_weights" if name in ("conv", "down") else "quanta_weights"
        keys = ([str(i) for i in range(10)] if group == "tenvoo_weights"
                else ["-1 -2", "-1 -3", "-2 -3"])
        for core, key in zip(layer.cores, keys):
            want = grads_pub[f"model.{name}.{group}.{key}"]
            torch.testing.assert_close(core.grad, want, rtol=1e-4,
                                       atol=1e-5 * want.abs().max().item())
        torch.testing.assert_close(layer.bias.grad, grads_pub[f"model.{name}.bias"],
                                   rtol=1e-4, atol=1e-6)
    # What trained in the published model trains here: cores, the adapted biases, the norm.
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, _ in ours.named_parameters() if ".cores." in n or n.endswith(".bias")
        or n.startswith("norm.")}
    assert ours.tenvoo_config.trainable == ["bias", "norm"]


def test_a_merged_published_model_converts_to_the_same_function():
    _, model = trained_published()
    model.eval()                       # the published layers fold T(θ) into the weight
    assert all(bool(m.merged) for n, m in model.model.named_children() if n in TARGETS)
    x = torch.randn(2, 4, 6, 6, 6)
    with torch.no_grad():
        want = model(x)
        got = tf.convert(model.model)(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_full_state_dict_loads_into_a_fresh_base(mode, tmp_path, recwarn):
    base, model = trained_published("Q")
    getattr(model, mode)()
    x = torch.randn(2, 4, 6, 6, 6)
    with torch.no_grad():
        want = model(x)
    path = tmp_path / "published.pt"
    torch.save(model.state_dict(), path)
    loaded = tf.load_adapter(copy.deepcopy(base), path)
    assert not [w for w in recwarn if issubclass(w.category, tf.BaseMismatchWarning)]
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), want, rtol=1e-5, atol=1e-5)
    # It saves as a tenvoo_fast adapter file and loads again, equal.
    tf.save_adapter(loaded, tmp_path / "ours.safetensors")
    again = tf.load_adapter(copy.deepcopy(base), tmp_path / "ours.safetensors")
    with torch.no_grad():
        assert torch.equal(again(x), loaded(x))


def test_a_full_state_dict_on_another_base_is_a_base_mismatch(tmp_path):
    _, model = trained_published()
    path = tmp_path / "published.pt"
    torch.save(model.state_dict(), path)
    torch.manual_seed(123)
    other = Net()
    with pytest.warns(tf.BaseMismatchWarning, match="differ from the base in this published"):
        tf.load_adapter(copy.deepcopy(other), path)
    with pytest.raises(AdapterError, match=r"published checkpoint \(\d+ tensors differ"):
        tf.load_adapter(copy.deepcopy(other), path, base_mismatch="error")


def test_the_base_is_recovered_by_unfolding(tmp_path):
    """Without the base checkpoint, W is the saved weight with the folds undone (fp64), off by
    the fp32 roundings of the folds (a few ulps of T(θ0) and T(θ), |T| ~ 1-10)."""
    base, model = trained_published()
    model.eval()
    model(torch.randn(1, 4, 6, 6, 6))
    from tenvoo_fast.model.published_checkpoint import published_layers
    layers = published_layers(model.state_dict())
    for name in TARGETS:
        layer = layers[f"model.{name}"]
        w, true = layer.base_weight(layer.network()), base.get_submodule(name).weight
        assert (w - true).abs().max() < 3e-5, name
        assert (w - true).norm() < 1e-4 * true.norm(), name


def test_a_save_peft_file_loads_its_cores_and_says_what_it_lacks(tmp_path):
    base, model = trained_published()
    path = tmp_path / "peft.pt"
    torch.save(save_peft_state(model), path)
    with pytest.warns(IncompleteAdapterWarning, match=r"save_peft file.*4 layers.*not the 6 "
                                                      r"tensors.*e\.g\. conv\.bias"):
        loaded = tf.load_adapter(copy.deepcopy(base), path)
    for name, layer in tf.adapter_layers(loaded).items():
        source = model.model.get_submodule(name)
        cores = source.cores(source.group)
        frozen = source.cores(source.group + "2")
        assert all(torch.equal(a, b) for a, b in zip(layer.cores, cores))
        assert all(torch.equal(a, b) for a, b in zip(layer.frozen_cores, frozen))
    # With the published model's biases and norm put in by hand, its outputs.
    with torch.no_grad():
        for name, p in model.model.named_parameters():
            if name.endswith(".bias") or name.startswith("norm."):
                loaded.get_parameter(name).copy_(p)
        x = torch.randn(2, 4, 6, 6, 6)
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)


def test_custom_factors_and_mixed_ranks(tmp_path):
    """Factors other than the table's become per-layer overrides; layers of two ranks (one
    AdapterConfig holds one) are refused."""
    from .published_format import PublishedConv3d, conv_shapes, _uniform
    torch.manual_seed(0)
    base = Net()
    model = Wrapper(adapt(copy.deepcopy(base), TARGETS))
    conv = model.model.conv
    shapes = conv_shapes("L", (1, 2, 2), (2, 4, 1), conv.kernel_size, 4)   # not the table's
    conv.tenvoo_weights = torch.nn.ParameterDict(
        {str(i): torch.nn.Parameter(_uniform(s, 0.5)) for i, s in enumerate(shapes)})
    conv.tenvoo_weights2 = type(conv.tenvoo_weights2)(
        {k: v.detach() for k, v in conv.tenvoo_weights.items()})
    x = torch.randn(2, 4, 6, 6, 6)
    with torch.no_grad():
        want = model(x)
    torch.save(model.state_dict(), tmp_path / "p.pt")
    loaded = tf.load_adapter(copy.deepcopy(base), tmp_path / "p.pt")
    assert loaded.tenvoo_config.factors["layers"] == {"conv": ((1, 2, 2), (2, 4, 1))}
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), want, rtol=1e-5, atol=1e-5)
    other = Wrapper(adapt(copy.deepcopy(base), TARGETS))
    other.model.down = PublishedConv3d(base.down, rank=3)
    torch.save(other.state_dict(), tmp_path / "q.pt")
    with pytest.raises(AdapterError, match=r"ranks \[3, 4\]"):
        tf.load_adapter(copy.deepcopy(base), tmp_path / "q.pt")


def test_a_checkpoint_for_another_model_is_a_clear_error(tmp_path):
    _, model = trained_published()
    state = {k.replace("model.conv.", "model.stem."): v for k, v in model.state_dict().items()}
    path = tmp_path / "published.pt"
    torch.save(state, path)
    with pytest.raises(AdapterError, match=r"its adapted layer model\.stem .*is not a module"):
        tf.load_adapter(Net(), path)


def test_damaged_cores_are_named(tmp_path):
    _, model = trained_published()
    state = model.state_dict()
    state["model.conv.tenvoo_weights.7"] = torch.zeros(4, 4, 4)
    torch.save(state, tmp_path / "p.pt")
    with pytest.raises(AdapterError, match=r"conv: its TenVOO cores have shapes"):
        tf.load_adapter(Net(), tmp_path / "p.pt")
