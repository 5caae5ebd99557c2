"""Fwd+bwd of the published LoRA-family implementations on one Conv3d, in the same run as
test_layers.py: peft's LoRA Conv3d and LyCORIS's LoCon, LoHa and LoKr modules.

Both are optional: without peft or lycoris-lora installed the cases skip. Same shapes, device,
rank-4 adapters (alpha = rank, scale 1) and ``extra_info`` as test_layers.py, with
``backend="peft"`` or ``"lycoris"``; the frozen base conv, the input and the adapter's own
parameters count as owned for ``saved_bytes``. LyCORIS runs its default (weight-rebuild) forward;
LoCon is also run with ``bypass_mode=True`` (``conv(x, W) + up(down(x))``, as peft does).

The ``test_*_matches_*`` tests are not benchmarks: given the same factors, tenvoo_fast's
LoRA/LoHa/LoKr Conv3d layers give the peer's output and factor gradients.
"""
import pytest
import torch
from torch import nn

from tenvoo_fast import LoHaConv3d, LoKrConv3d, LoRAConv3d
from test_layers import DEVICE, SHAPES, _run

RANK = 4
# Our method name -> (LyCORIS module path, class, our layer); LyCORIS builds the same factors.
LYCORIS = {"locon": ("lycoris.modules.locon", "LoConModule", LoRAConv3d),
           "loha": ("lycoris.modules.loha", "LohaModule", LoHaConv3d),
           "lokr": ("lycoris.modules.lokr", "LokrModule", LoKrConv3d)}


def _peft_conv(conv):
    """peft's LoRA on ``conv`` (frozen by peft); returns the model and its lora.Conv3d layer."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(nn.Sequential(conv),
                                peft.LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["0"]))
    layer = model.base_model.model[0]
    assert type(layer).__name__ == "Conv3d" and layer.scaling["default"] == 1.0
    return model, layer


def _lycoris_conv(conv, method, bypass=False, rank=RANK):
    """LyCORIS's ``method`` hooked onto ``conv``'s forward; the base conv is frozen."""
    pytest.importorskip("lycoris")
    import importlib
    path, cls_name, _ = LYCORIS[method]
    cls = getattr(importlib.import_module(path), cls_name)
    conv.requires_grad_(False)
    try:
        module = cls("peer", conv, 1.0, rank, rank, bypass_mode=bypass or None)
    except (ValueError, NotImplementedError) as e:
        pytest.skip(f"LyCORIS {cls_name} refuses Conv3d: {e}")
    if module.module_type != "conv3d":
        pytest.skip(f"LyCORIS {cls_name} does not treat Conv3d as conv3d")
    module.to(conv.weight.device).apply_to()
    return module


def _owned(x, conv, extra):
    return [x, conv.weight, conv.bias, *extra]


@pytest.mark.parametrize("shape", list(SHAPES))
def test_peft_lora_conv(benchmark, shape):
    cin, cout, vol = SHAPES[shape]
    conv = nn.Conv3d(cin, cout, 3, padding=1, device=DEVICE)
    model, _ = _peft_conv(conv)
    x = torch.randn(1, cin, *vol, device=DEVICE, requires_grad=True)
    _run(benchmark, lambda: model(x).sum().backward(), _owned(x, conv, model.parameters()),
         conv.weight, shape=shape, method=f"lora-r{RANK}", backend="peft")


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("method", ["locon", "loha", "lokr", "locon-bypass"])
def test_lycoris_conv(benchmark, shape, method):
    cin, cout, vol = SHAPES[shape]
    conv = nn.Conv3d(cin, cout, 3, padding=1, device=DEVICE)
    algo = method.split("-")[0]
    module = _lycoris_conv(conv, algo, bypass=method.endswith("-bypass"))
    x = torch.randn(1, cin, *vol, device=DEVICE, requires_grad=True)
    name = f"{algo}-r{RANK}" + ("-bypass" if method.endswith("-bypass") else "")
    _run(benchmark, lambda: conv(x).sum().backward(), _owned(x, conv, module.parameters()),
         conv.weight, shape=shape, method=name, backend="lycoris")


# --- parity: same factors in, same output and factor gradients out ------------------------------

CIN, COUT, VOL = 32, 24, (6, 5, 4)


def _pair(seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv3d(CIN, COUT, 3, padding=1, device=DEVICE)
    twin = nn.Conv3d(CIN, COUT, 3, padding=1, device=DEVICE)
    twin.load_state_dict(conv.state_dict())
    return conv, twin


def _randomize(cores):
    """Non-zero factors (the zero-initialised ones would make the update vanish)."""
    with torch.no_grad():
        for c in cores:
            c.copy_(torch.randn_like(c) * 0.1)


def _check(ours, peer, our_cores, peer_cores):
    x = torch.randn(2, CIN, *VOL, device=DEVICE)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), peer(xb)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ya)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-5)
    for a, b in zip(our_cores, peer_cores, strict=True):
        torch.testing.assert_close(a.grad, b.grad.reshape(a.shape), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["merged", "bypass"])
def test_lora_matches_peft(mode):
    conv, twin = _pair()
    model, layer = _peft_conv(twin)
    ours = LoRAConv3d.from_conv(conv, RANK, mode=mode)  # alpha = rank: scale 1, as peft's here
    ours.weight.requires_grad_(False)
    ours.bias.requires_grad_(False)
    _randomize(ours.cores)
    down, up = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        down.copy_(ours.down)
        up.copy_(ours.up)
    _check(ours, model, [ours.down, ours.up], [down, up])


# LoKr at rank 4 keeps w2 whole here (rank >= max(o2, i2) / 2); rank 2 splits it as w2a @ w2b.
@pytest.mark.parametrize("method, rank", [("locon", RANK), ("loha", RANK), ("lokr", RANK),
                                          ("lokr", 2)])
def test_matches_lycoris(method, rank):
    conv, twin = _pair()
    module = _lycoris_conv(twin, method, rank=rank)
    ours = LYCORIS[method][2].from_conv(conv, rank)
    ours.weight.requires_grad_(False)
    ours.bias.requires_grad_(False)
    # LyCORIS registers the factors in the order of our cores (same shapes, flattened alike).
    peer_cores = list(module.parameters())
    assert [tuple(p.shape) for p in peer_cores] == [tuple(c.shape) for c in ours.cores]
    _randomize(ours.cores)
    with torch.no_grad():
        for p, c in zip(peer_cores, ours.cores):
            p.copy_(c)
    _check(ours, twin, list(ours.cores), peer_cores)
