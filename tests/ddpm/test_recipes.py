"""The published TenVOO script's recipe (``--recipe published``, ``--preset published``;
ddpm/recipes.py) beside this package's: partial last steps of an epoch, the loss summed over
the accumulation, its run length and validation, NIfTI padded/cropped first, and a resume that
is still exact."""
import json
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch

from tenvoo_fast.ddpm.cli import main
from tenvoo_fast.ddpm.finetune import resolve_recipe
from tenvoo_fast.ddpm.recipes import RECIPES, batches_before, micro_batches, steps_per_epoch
from tenvoo_fast.ddpm.run_options import FinetuneOptions
from tenvoo_fast.ddpm.training import optimizer_step
from tests.ddpm.test_checkpoints import safetensors_content

PUBLISHED, OURS = RECIPES["published"], RECIPES["tenvoo_fast"]
# 10 volumes: 9 train, so an epoch of batch 1 x accum 4 is steps of 4, 4 and 1 micro-batches.
TINY = ["finetune", "--preset", "tiny", "--device", "cpu", "--num-volumes", "10",
        "--lr", "1e-3", "--recipe", "published"]


def test_an_epochs_last_step_takes_what_is_left():
    assert steps_per_epoch(9, 4, PUBLISHED) == 3
    assert [micro_batches(s, 9, 4, PUBLISHED) for s in range(1, 8)] == [4, 4, 1, 4, 4, 1, 4]
    assert [batches_before(s, 9, 4, PUBLISHED) for s in range(0, 8)] == [
        0, 4, 8, 9, 13, 17, 18, 22]
    assert [micro_batches(s, 9, 4, OURS) for s in range(1, 4)] == [4, 4, 4]
    assert batches_before(3, 9, 4, OURS) == 12 and steps_per_epoch(9, 4, OURS) == 2.25


def test_the_published_preset_is_the_paper_unet_for_ten_epochs():
    opts = resolve_recipe(FinetuneOptions(preset="published"))
    assert (opts.preset, opts.recipe, opts.steps, opts.epochs) == ("paper", "published", None,
                                                                   10.0)
    assert opts.size == [160, 224, 160]
    assert resolve_recipe(FinetuneOptions()).steps == 100
    assert resolve_recipe(FinetuneOptions(recipe="published", steps=7)).epochs is None


class _Recorder(torch.optim.SGD):
    """Keeps the gradients each step applied."""

    def step(self, closure=None):
        self.seen = [p.grad.clone() for g in self.param_groups for p in g["params"]]
        return super().step(closure)


@pytest.mark.parametrize("accum", [1, 3])
def test_the_published_loss_is_summed_over_the_accumulation(accum):
    from monai.inferers import DiffusionInferer
    from monai.networks.schedulers import DDPMScheduler

    from tenvoo_fast.ddpm.training import SCHEDULER
    from tenvoo_fast.ddpm.unets import build_unet
    torch.manual_seed(0)
    model = build_unet("tiny")
    batches = [torch.rand(1, 1, 16, 16, 16) for _ in range(accum)]
    grads = {}
    for mean in (True, False):
        opt = _Recorder(model.parameters(), lr=0.0)
        optimizer_step(model, iter(batches), DiffusionInferer(DDPMScheduler(**SCHEDULER)), opt,
                       torch.amp.GradScaler("cpu", enabled=False), nullcontext, accum,
                       torch.device("cpu"), 1, torch.Generator().manual_seed(1), mean=mean)
        grads[mean] = opt.seen
    for g_mean, g_sum in zip(grads[True], grads[False]):
        torch.testing.assert_close(g_sum, accum * g_mean, rtol=1e-5, atol=1e-7)


def metrics(out) -> dict:
    return json.loads((Path(out) / "metrics.json").read_text())


def test_a_published_run_steps_by_epoch_and_resumes_exactly(tmp_path, capsys):
    assert main([*TINY, "--out", str(tmp_path / "a"), "--epochs", "2"]) == 0
    straight = metrics(tmp_path / "a")
    assert straight["steps"] == 6 and straight["recipe"] == "published"
    # Stopped after an epoch's partial step, and in the middle of the next epoch, then
    # continued to the same two epochs: the straight run's losses and adapter, bit for bit.
    for stop in ("3", "4"):
        out = tmp_path / f"stop{stop}"
        assert main([*TINY, "--out", str(out), "--steps", stop]) == 0
        assert main([*TINY, "--out", str(out), "--epochs", "2", "--resume"]) == 0
        assert metrics(out)["losses"] == straight["losses"]
        assert safetensors_content(out / "adapter.safetensors") == \
            safetensors_content(tmp_path / "a" / "adapter.safetensors")
    # The recipe is part of what a resume must share.
    capsys.readouterr()
    assert main([*TINY[:-2], "--out", str(tmp_path / "stop3"), "--steps", "8", "--resume"]) == 2
    assert "--recipe (saved published, now tenvoo_fast)" in capsys.readouterr().err


def test_the_published_recipe_trains_with_the_summed_loss(tmp_path, monkeypatch):
    from tenvoo_fast.ddpm import finetune
    seen = []

    def spy(*args, mean=True, **kwargs):
        seen.append(mean)
        return optimizer_step(*args, mean=mean, **kwargs)
    monkeypatch.setattr(finetune, "optimizer_step", spy)
    assert main([*TINY, "--out", str(tmp_path / "p"), "--steps", "1"]) == 0
    assert main([*TINY[:-2], "--out", str(tmp_path / "o"), "--steps", "1"]) == 0
    assert seen == [False, True]


def test_the_published_preset_refuses_another_recipe(tmp_path, capsys):
    assert main(["finetune", "--preset", "published", "--recipe", "tenvoo_fast", "--dry-run",
                 "--device", "cpu", "--out", str(tmp_path)]) == 2
    assert "--preset published trains with the published recipe" in capsys.readouterr().err


def test_nifti_volumes_are_padded_or_cropped_first(tmp_path):
    """In the file's voxel order, before reorientation: a volume stored L-to-R along its first
    axis (odd crop there) gives another result than cropping after reorienting to RAS."""
    import nibabel

    from tenvoo_fast.ddpm.data import NiftiVolumes
    volume = np.random.default_rng(0).uniform(1.0, 2.0, (9, 6, 8)).astype(np.float32)
    path = tmp_path / "v.nii.gz"
    nibabel.save(nibabel.Nifti1Image(volume, np.diag([-1.0, 1.0, 1.0, 1.0])), path)
    got = NiftiVolumes([path], (8, 8, 8), field_of_view=(8, 8, 8))[0]
    # Crop 9 -> 8 (MONAI keeps the first 8), pad 6 -> 8 as numpy's "minimum" mode, then RAS
    # (flip the first axis), then scale to [0, 1]; no resampling.
    want = np.pad(volume[:8], ((0, 0), (1, 1), (0, 0)), mode="minimum")[::-1]
    want = (want - want.min()) / (want.max() - want.min())
    assert got.shape == (1, 8, 8, 8)
    np.testing.assert_allclose(got[0].numpy(), want, atol=1e-6)
    reoriented_first = np.pad(volume[::-1][:8], ((0, 0), (1, 1), (0, 0)), mode="minimum")
    assert not np.allclose(got[0].numpy(), (reoriented_first - reoriented_first.min())
                           / (reoriented_first.max() - reoriented_first.min()), atol=1e-3)
    # Without the field of view the whole volume is resized (interpolated).
    resized = NiftiVolumes([path], (8, 8, 8))[0]
    assert not np.allclose(resized[0].numpy(), want, atol=1e-3)
