"""``--checkpoint-activations``: the UNet's blocks keep only their inputs for backward and rerun
there; the same loss and gradients bit for bit, a fraction of the bytes saved for backward,
reported by finetune and profile."""
import json

import pytest
import torch
from torch import nn

from tenvoo_fast import AdapterConfig, inject
from tenvoo_fast.ddpm.activation_checkpoints import checkpoint_blocks
from tenvoo_fast.ddpm.cli import main
from tenvoo_fast.ddpm.unets import build_tiny_unet
from tenvoo_fast.measure import SavedBytes, held_by
from tenvoo_fast.model.presets import PAPER_DDPM_TARGETS


def _model(method, checkpointed):
    torch.manual_seed(0)
    model = build_tiny_unet()
    if method != "full":
        inject(model, AdapterConfig(method=method, rank=4, target_modules=list(PAPER_DDPM_TARGETS),
                                    trainable=("bias", "norm")))
    if checkpointed:
        assert checkpoint_blocks(model) == 9     # 4 down, the middle, 4 up
    return model


def _step(model):
    torch.manual_seed(1)
    x, t = torch.randn(1, 1, 16, 16, 16), torch.randint(0, 1000, (1,))
    with SavedBytes(held_by(model)) as saved:
        y = model(x, timesteps=t)
    loss = y.square().mean()
    loss.backward()
    return saved.bytes, loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("method", ["full", "tenvoo-l", "tenvoo-q"])
def test_the_same_gradients_for_a_tenth_of_the_saved_bytes(method):
    plain_bytes, plain_loss, plain_grads = _step(_model(method, False))
    bytes_, loss, grads = _step(_model(method, True))
    assert torch.equal(loss, plain_loss)
    assert len(grads) == len(plain_grads)
    assert all(torch.equal(a, b) for a, b in zip(grads, plain_grads))
    assert bytes_ <= 0.4 * plain_bytes, (bytes_, plain_bytes)     # measured: ~0.1x


def test_the_blocks_inputs_are_counted():
    """Inside a checkpointed block the checkpoint's own hooks take the saved tensors; what it
    keeps instead (the block's inputs) is counted, so the measurement is not empty."""
    model = _model("full", True)
    bytes_, _, _ = _step(model)
    assert bytes_ >= 1 * 16 ** 3 * 8 * 4      # at least the first block's 8-channel input


def test_wrapping_is_idempotent_and_inference_is_untouched():
    model = _model("tenvoo-l", True)
    checkpoint_blocks(model)
    assert model.down_blocks[0].forward.__wrapped__.__self__ is model.down_blocks[0]
    x, t = torch.randn(1, 1, 16, 16, 16), torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        y = model(x, timesteps=t)
        plain = _model("tenvoo-l", False)(x, timesteps=t)
    assert torch.equal(y, plain)


def test_a_model_without_unet_blocks_is_refused():
    with pytest.raises(ValueError, match="has no 'down_blocks'.*DiffusionModelUNet"):
        checkpoint_blocks(nn.Sequential(nn.Conv3d(1, 1, 3)))


def test_finetune_and_profile_report_it(tmp_path):
    common = ["--preset", "tiny", "--device", "cpu", "--num-volumes", "3", "--accum", "1",
              "--steps", "1"]
    assert main(["finetune", *common, "--method", "tenvoo-l", "--checkpoint-activations",
                 "--out", str(tmp_path / "ck")]) == 0
    assert main(["finetune", *common, "--method", "tenvoo-l", "--out", str(tmp_path / "plain")]) == 0
    ck = json.loads((tmp_path / "ck" / "metrics.json").read_text())
    plain = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    assert ck["checkpoint_activations"] is True and plain["checkpoint_activations"] is False
    assert 0 < ck["saved_for_backward_bytes"] <= 0.4 * plain["saved_for_backward_bytes"]
    assert ck["losses"] == plain["losses"]

    assert main(["profile", "--methods", "full", "--preset", "tiny", "--steps", "1",
                 "--num-volumes", "3", "--accum", "1", "--device", "cpu",
                 "--checkpoint-activations", "--out", str(tmp_path / "profile")]) == 0
    table = (tmp_path / "profile" / "profile.md").read_text()
    assert "saved for backward (MiB)" in table and "--checkpoint-activations" in table
    row = json.loads((tmp_path / "profile" / "profile.json").read_text())["rows"][0]
    assert row["checkpoint_activations"] is True and row["saved_for_backward_bytes"] > 0
    command, = json.loads((tmp_path / "profile" / "profile.json").read_text())["commands"]
    assert "--checkpoint-activations" in command.split()
