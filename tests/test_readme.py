"""The README's Python examples run as written (the paper UNet's base weights seeded so that
``fresh`` has the same base, as the example says it should)."""
import re
import warnings
from pathlib import Path

import pytest
import torch

import tenvoo_fast

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Using it"):text.index("## Fine-tuning a 3D DDPM")]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_using_it_examples_run(tmp_path, monkeypatch):
    pytest.importorskip("monai")
    first, config, *_ = _python_blocks()
    constructor = re.search(r"model = (DiffusionModelUNet\(.*?\))\n", first, flags=re.S).group(1)
    assert "fresh = DiffusionModelUNet(...)" in first
    code = (first.replace("model = DiffusionModelUNet(", "torch.manual_seed(0); model = "
                          "DiffusionModelUNet(")
            .replace("fresh = DiffusionModelUNet(...)",
                     f"torch.manual_seed(0); fresh = {constructor}"))
    monkeypatch.chdir(tmp_path)
    scope = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", tenvoo_fast.BaseMismatchWarning)   # the same base
        exec(compile(code, "README.md", "exec"), scope)
    tf, fresh = scope["tf"], scope["fresh"]
    assert not tf.adapter_layers(fresh)            # merged back into plain layers
    assert (tmp_path / "adapter.safetensors").is_file()
    exec(compile(config, "README.md", "exec"), scope)
    cfg = scope["cfg"]
    torch.manual_seed(0)
    model = eval(constructor, scope)
    tf.inject(model, cfg)
    layer = tf.adapter_layers(model)["down_blocks.2.resnets.0.conv1.conv"]
    assert (layer.network.meta["in_factors"], layer.network.meta["out_factors"]) == ((4, 4, 2), (8, 4, 2))


def test_the_peft_example_runs(tmp_path, monkeypatch):
    """The "From peft" example, on a small model whose peft LoRA was saved as the example's
    folder; the exported folder loads back into peft with the same outputs."""
    peft = pytest.importorskip("peft")
    _, _, example, _ = _python_blocks()
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Conv3d(2, 3, 3, padding=1), torch.nn.Flatten(),
                               torch.nn.Linear(3 * 27, 4))
    trained = peft.get_peft_model(_copy(base), peft.LoraConfig(r=2, target_modules=["0", "2"]))
    for p in trained.parameters():
        if p.requires_grad:
            p.data.normal_(std=0.1)
    monkeypatch.chdir(tmp_path)
    trained.save_pretrained("my-peft-lora")
    scope = {"base": _copy(base)}
    exec(compile("import tenvoo_fast as tf\n" + example, "README.md", "exec"), scope)
    x = torch.randn(2, 2, 3, 3, 3)
    reloaded = peft.PeftModel.from_pretrained(_copy(base), "back-to-peft")
    with torch.no_grad():
        torch.testing.assert_close(scope["model"](x), trained(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(reloaded(x), trained(x), rtol=1e-5, atol=1e-6)
    assert (tmp_path / "adapter.safetensors").is_file()


def test_the_published_example_runs(tmp_path, monkeypatch):
    """The "From the published TenVOO code" example, on a small model adapted by layers that
    save and compute as the published ones: both lines give the published model's outputs."""
    from tests.convert.published_format import adapt
    *_, example = _python_blocks()
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Conv3d(4, 8, 3, padding=1),
                               torch.nn.AdaptiveAvgPool3d(1), torch.nn.Flatten(),
                               torch.nn.Linear(8, 16))
    published_model = torch.nn.Module()
    published_model.model = adapt(_copy(base), ["0", "3"])
    x = torch.randn(2, 4, 3, 3, 3)
    with torch.no_grad():
        want = published_model.model(x)
    monkeypatch.chdir(tmp_path)
    torch.save(published_model.state_dict(), "published_state_dict.pt")
    scope = {"published_model": published_model, "base": _copy(base)}
    exec(compile("import tenvoo_fast as tf\n" + example, "README.md", "exec"), scope)
    with torch.no_grad():
        torch.testing.assert_close(scope["model"](x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(scope["base"](x), want, rtol=1e-5, atol=1e-5)


def _copy(module):
    import copy
    return copy.deepcopy(module)
