"""``tenvoo-fast convert`` (issue 17): a published TenVOO checkpoint of the tiny DDPM UNet in
MONAI Generative's layout, and a peft adapter folder, become tenvoo_fast adapter files that
reproduce the source model's outputs; a tenvoo_fast LoRA file becomes a peft folder again."""
import copy
import re

import pytest
import torch
from torch import nn

import tenvoo_fast as tf
from tenvoo_fast.ddpm.cli import main
from tenvoo_fast.ddpm.finetune import base_unet
from tenvoo_fast.ddpm.unets import build_unet
from tenvoo_fast.model.presets import PAPER_DDPM_TARGETS

from ..convert.published_format import adapt, exact, save_peft_state
from .test_generative_bases import old_checkpoint

X, T = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([7])


def targets(model):
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv3d, nn.Linear))
            and any(re.search(p, n) for p in PAPER_DDPM_TARGETS)
            and not (isinstance(m, nn.Conv3d) and 1 in (m.in_channels, m.out_channels))]


class Wrapper(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, t):
        return self.model(x, t)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """(folder, the published model's output on (X, T)): an old-layout base file, the trained
    published model's full state dict (old names, ``model.`` prefix) and its save_peft file."""
    folder = tmp_path_factory.mktemp("published")
    torch.manual_seed(0)
    base = build_unet("tiny", include_fc=False)
    for conv in base.out.modules():          # MONAI's zero output conv would output zeros
        if isinstance(conv, nn.Conv3d):
            conv.reset_parameters()
    torch.save(old_checkpoint(base), folder / "base.pt")
    names = targets(base)
    model = Wrapper(adapt(copy.deepcopy(base), names, rank=3, variant="Q"))
    # What the published training trains: cores, the adapted layers' biases, norms.
    trained = [p for n, p in model.named_parameters() if "_weights." in n or "norm" in n
               or n in {f"model.{t}.bias" for t in names}]
    for p in model.parameters():
        p.requires_grad_(any(p is q for q in trained))
    opt = torch.optim.SGD(trained, lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(1, 1, 16, 16, 16), torch.tensor([3])).square().mean().backward()
        opt.step()
    with torch.no_grad():
        # The published model's fp32 output, and its math in fp64 (without its folds' fp32
        # roundings, which leave W - T(θ0) about an ulp of T(θ0) ~ 10-30 off).
        want = (model(X, T), exact(model.model, base)(X.double(), T).float())
    old = {"model." + k: v for k, v in old_checkpoint(model.model).items()
           if not k.endswith(("proj_attn.weight", "proj_attn.bias")) or "_weights" in k}
    torch.save(old, folder / "published.pt")
    torch.save({k.replace(".attn.to_", ".to_"): v for k, v in save_peft_state(model).items()},
               folder / "save_peft.pt")
    return folder, want


def assert_as_close(got, want):
    """``got`` as close to the published math as the published fp32 model is (x2)."""
    published, oracle = want
    bound = (published - oracle).abs().max().item()
    assert 0 < bound < 1e-3
    assert (got - oracle).abs().max().item() <= 2 * bound + 1e-6


def _output(adapter, base_weights):
    torch.manual_seed(0)                     # the random base of --seed 0, without weights
    model = base_unet("tiny", base_weights, say=lambda *_: None)
    tf.load_adapter(model, adapter)
    with torch.no_grad():
        return model(X, T)


def test_a_published_checkpoint_converts_on_its_base(published, tmp_path, capsys):
    folder, want = published
    out = tmp_path / "adapter.safetensors"
    assert main(["convert", str(folder / "published.pt"), str(out), "--preset", "tiny",
                 "--base-weights", str(folder / "base.pt")]) == 0
    assert "published adapter" in capsys.readouterr().out
    config, layers = tf.read_adapter_metadata(out)
    assert config.method == "tenvoo-q" and config.rank == 3 and len(layers) == len(
        targets(build_unet("tiny")))
    assert_as_close(_output(out, folder / "base.pt"), want)


def test_a_published_checkpoint_converts_with_the_base_it_holds(published, tmp_path, capsys):
    folder, want = published
    out, base = tmp_path / "adapter.safetensors", tmp_path / "base.pt"
    assert main(["convert", str(folder / "published.pt"), str(out), "--preset", "tiny",
                 "--save-base", str(base)]) == 0
    assert "folds undone" in capsys.readouterr().out
    assert_as_close(_output(out, base), want)
    # Without a base to use, the command says what to give.
    assert main(["convert", str(folder / "published.pt"), str(tmp_path / "b.safetensors"),
                 "--preset", "tiny"]) == 2
    assert "give --base-weights" in capsys.readouterr().err


def test_a_save_peft_file_converts_and_says_what_it_lacks(published, tmp_path, capsys):
    folder, _ = published
    out = tmp_path / "adapter.safetensors"
    assert main(["convert", str(folder / "save_peft.pt"), str(out), "--preset", "tiny",
                 "--base-weights", str(folder / "base.pt")]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "save_peft file" in err and "biases and the norms" in err
    config, layers = tf.read_adapter_metadata(out)
    assert config.method == "tenvoo-q" and len(layers) == len(targets(build_unet("tiny")))
    assert main(["convert", str(folder / "save_peft.pt"), str(out), "--preset", "tiny",
                 "--save-base", str(tmp_path / "b.pt")]) == 2
    assert "lacks its weight" in capsys.readouterr().err


def test_a_peft_folder_converts_and_goes_back(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = base_unet("tiny")                 # the random base of --seed 0
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=r".*resnets\.\d+\.conv[12]\.conv"))
    for layer in model.modules():
        if hasattr(layer, "lora_B"):
            torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.01)
    with torch.no_grad():
        want = model(X, T)
    model.save_pretrained(tmp_path / "peft")
    out = tmp_path / "adapter.safetensors"
    assert main(["convert", str(tmp_path / "peft"), str(out), "--preset", "tiny"]) == 0
    torch.testing.assert_close(_output(out, None), want, rtol=1e-4, atol=1e-5)
    assert main(["convert", str(out), str(tmp_path / "back"), "--preset", "tiny"]) == 0
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "back"))
    with torch.no_grad():
        torch.testing.assert_close(again(X, T), want, rtol=1e-4, atol=1e-5)


def test_an_unknown_input_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "x.pt").write_bytes(b"not a checkpoint")
    assert main(["convert", str(tmp_path / "x.pt"), str(tmp_path / "y"), "--preset",
                 "tiny"]) == 2
    assert "not a published TenVOO checkpoint" in capsys.readouterr().err
