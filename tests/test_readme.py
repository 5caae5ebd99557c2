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
    first, config = _python_blocks()
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
