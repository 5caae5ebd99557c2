"""``--base-weights`` with a MONAI Generative checkpoint (ddpm/generative_bases.py): the old
layout is detected from the keys, converted by MONAI's loader, built without the attention
output projection the old class never applied, and computes what the old model computed.

The old-layout files are written here from the published conventions (attention projections
directly under the block, an unused ``proj_attn``, upsampling convs named ``conv``): a current
UNet built with ``include_fc=False`` computes what the old class computed, so its weights
renamed that way are an old checkpoint with a known output."""
import pytest
import torch

from tenvoo_fast.ddpm.finetune import base_unet
from tenvoo_fast.ddpm.unets import build_unet
from tenvoo_fast.errors import RunError


def old_checkpoint(model) -> dict:
    old = {}
    for k, v in model.state_dict().items():
        old[k.replace(".attn.to_", ".to_").replace(".upsampler.postconv.",
                                                     ".upsampler.conv.")] = v.clone()
    for k in [k for k in old if k.endswith(".to_q.weight")]:
        block, n = k[:-len(".to_q.weight")], old[k].shape[0]
        old[block + ".proj_attn.weight"] = torch.randn(n, n)
        old[block + ".proj_attn.bias"] = torch.randn(n)
    return old


@pytest.mark.parametrize("preset,size", [("tiny", 16), ("paper", 32)])
def test_an_old_checkpoint_loads_and_computes_what_it_computed(preset, size, tmp_path, capsys):
    torch.manual_seed(0)
    source = build_unet(preset, include_fc=False)
    path = tmp_path / "old.pt"
    torch.save(old_checkpoint(source), path)
    model = base_unet(preset, path)
    said = capsys.readouterr().out
    assert "MONAI Generative checkpoint" in said and "include_fc=False" in said
    x, t = torch.randn(1, 1, size, size, size), torch.tensor([10])
    with torch.no_grad():
        assert torch.equal(model(x, t), source(x, t))


def test_a_current_checkpoint_loads_as_before(tmp_path, capsys):
    torch.manual_seed(0)
    source = build_unet("tiny")
    torch.save(source.state_dict(), tmp_path / "new.pt")
    model = base_unet("tiny", tmp_path / "new.pt")
    assert "MONAI Generative" not in capsys.readouterr().out
    assert any(k.endswith("attn.out_proj.weight") for k in model.state_dict())


def test_a_current_checkpoint_without_projection_builds_the_unet_without_it(tmp_path, capsys):
    torch.manual_seed(0)
    source = build_unet("tiny", include_fc=False)
    torch.save(source.state_dict(), tmp_path / "nofc.pt")
    model = base_unet("tiny", tmp_path / "nofc.pt")
    assert "include_fc=False" in capsys.readouterr().out
    x, t = torch.randn(1, 1, 16, 16, 16), torch.tensor([10])
    with torch.no_grad():
        assert torch.equal(model(x, t), source(x, t))


@pytest.mark.parametrize("damage,message", [
    ("drop", r"needs the key '.*to_k.weight'"),
    ("drop_plain", r"1 weights of the tiny UNet are not in it \(e.g. conv_in.conv.bias\)"),
    ("shape", r"conv_in.conv.weight is torch.Size\(\[8, 1, 3, 3, 1\]\), expected "),
    ("extra", r"1 of its keys fit nothing in the tiny UNet \(e.g. stray.weight\)"),
])
def test_a_checkpoint_that_does_not_fit_is_a_clear_error(damage, message, tmp_path):
    torch.manual_seed(0)
    old = old_checkpoint(build_unet("tiny", include_fc=False))
    if damage == "drop":
        del old[next(k for k in old if k.endswith(".to_k.weight"))]
    elif damage == "drop_plain":
        del old["conv_in.conv.bias"]
    elif damage == "shape":
        old["conv_in.conv.weight"] = old["conv_in.conv.weight"][..., :1]
    else:
        old["stray.weight"] = torch.zeros(1)
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(RunError, match=r"^--base-weights .*old.pt: MONAI Generative layout, "
                                       r"but .*" + message):
        base_unet("tiny", tmp_path / "old.pt")
