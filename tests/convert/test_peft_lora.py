"""peft LoRA models converted to tenvoo_fast's layers and back (tenvoo_fast/convert/): trained
with peft, converted, the same outputs and gradients (fp32 rounding); trained on, exported and
reloaded by peft; what cannot be converted the same way is refused naming the layer."""
import copy

import pytest
import torch
from torch import nn

import tenvoo_fast as tf
from tenvoo_fast.errors import AdapterError

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402


class Net(nn.Module):
    """A Conv3d (3x3x3 and a strided one; Conv2d with ``dims=2``), a Linear and an untouched
    norm."""

    def __init__(self, dims=3):
        super().__init__()
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        self.conv = conv(4, 6, 3, padding=1)
        self.down = conv(6, 8, 3, stride=2, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = self.norm(self.down(torch.relu(self.conv(x))))
        return self.head(h.flatten(2).mean(dim=2))


TARGETS = ["conv", "down", "head"]


def inputs(batch, dims=3):
    return torch.randn(batch, 4, *(6,) * dims)


def trained_peft(seed=0, steps=3, dims=3, **config):
    torch.manual_seed(seed)
    base = Net(dims)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=config.pop("r", 4), lora_alpha=config.pop("lora_alpha", 8), target_modules=TARGETS,
        **config))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(steps):          # B leaves zero: the update is not trivial
        opt.zero_grad()
        model(inputs(2, dims)).square().mean().backward()
        opt.step()
    return base, model


def _grads(model, x):
    model.zero_grad()
    x = x.clone().requires_grad_(True)
    out = model(x)
    out.square().sum().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("dims", [3, 2])
@pytest.mark.parametrize("rslora", [False, True])
def test_converted_outputs_and_gradients_are_peft_s(rslora, dims):
    _, model = trained_peft(use_rslora=rslora, dims=dims)
    model.eval()
    x = inputs(3, dims)
    out_peft, dx_peft = _grads(model, x)
    grads_peft = {n.replace(".lora_A.default", ".down").replace(".lora_B.default", ".up"): p.grad
                  for n, p in model.named_parameters() if p.requires_grad}
    ours = tf.convert(model)
    assert set(tf.adapter_layers(ours)) == set(TARGETS)
    assert type(ours.conv) is (tf.LoRAConv3d if dims == 3 else tf.LoRAConv2d)
    out, dx = _grads(ours, x)
    torch.testing.assert_close(out, out_peft, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx, dx_peft, rtol=1e-5, atol=1e-6)
    for name, layer in tf.adapter_layers(ours).items():
        for core, key in ((layer.down, "down"), (layer.up, "up")):
            want = grads_peft[f"base_model.model.{name}.{key}.weight"]
            torch.testing.assert_close(core.grad.reshape(want.shape), want, rtol=1e-4, atol=1e-6)
    # Only the cores train, as in peft.
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        f"{t}.cores.{i}" for t in TARGETS for i in (0, 1)}


@pytest.mark.parametrize("dims", [3, 2])
def test_convert_train_on_export_and_reload_in_peft(tmp_path, dims):
    base, model = trained_peft(dims=dims)
    ours = tf.convert(model)
    opt = torch.optim.Adam([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        ours(inputs(2, dims)).square().mean().backward()
        opt.step()
    folder = tf.export_peft(ours, tmp_path / "peft-adapter")
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), folder)
    x = inputs(2, dims)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), ours(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(AdapterError, match="exists; choose a new folder"):
        tf.export_peft(ours, folder)


@pytest.mark.parametrize("dims", [3, 2])
def test_a_converted_model_saves_and_loads_as_a_tenvoo_fast_adapter(tmp_path, dims):
    base, model = trained_peft(dims=dims)
    ours = tf.convert(model)
    tf.save_adapter(ours, tmp_path / "a.safetensors")
    fresh = tf.inject(copy.deepcopy(base), tf.model.get_config(ours))
    tf.load_adapter(fresh, tmp_path / "a.safetensors")
    x = inputs(2, dims)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), ours(x))


def test_dropout_is_said():
    _, model = trained_peft(lora_dropout=0.1)
    with pytest.warns(UserWarning, match=r"dropout \(p=\[0.1\]\) .* trains without it"):
        tf.convert(model)


@pytest.mark.parametrize("config,message", [
    (dict(use_dora=True), r"^conv: peft adapter 'default' is a DoRA variant of LoRA"),
    (dict(lora_bias=True), r"^conv: peft adapter 'default' has a LoRA bias"),
])
def test_what_cannot_be_computed_the_same_way_is_refused(config, message):
    _, model = trained_peft(steps=0, **config)
    before = {n for n, _ in model.named_modules()}
    with pytest.raises(AdapterError, match=message):
        tf.convert(model)
    assert {n for n, _ in model.named_modules()} == before      # nothing replaced


def test_other_layer_types_and_other_peft_methods_are_named():
    torch.manual_seed(0)
    one_d = get_peft_model(nn.Sequential(nn.Conv1d(3, 4, 3)),
                           LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(AdapterError, match=r"^0: peft LoRA on a Conv1d; tenvoo_fast adapts "
                                           r"Conv3d, Conv2d and Linear"):
        tf.convert(one_d)
    grouped = get_peft_model(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)),
                             LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(AdapterError, match=r"^0: a grouped Conv2d \(groups=2\)"):
        tf.convert(grouped)
    from peft import LoHaConfig
    loha = get_peft_model(Net(), LoHaConfig(r=2, target_modules=["head"]))
    with pytest.raises(AdapterError,
                       match=r"^head: a peft loha layer \(peft.tuners.loha.layer.Linear\)"):
        tf.convert(loha)


def test_a_hooked_foreign_adapter_is_named_not_dropped():
    net = Net()

    class Hook(nn.Module):
        def __init__(self, org):
            super().__init__()
            self.org_forward = org.forward

        def forward(self, x):
            return self.org_forward(x)
    hook = Hook(net.head)
    net.head.forward = hook.forward          # as LyCORIS's apply_to does
    with pytest.raises(AdapterError, match=r"^convert: head runs a .*Hook's forward"):
        tf.convert(net)


def test_a_model_without_adapters_is_refused():
    with pytest.raises(AdapterError, match="no adapter layers found"):
        tf.convert(Net())
