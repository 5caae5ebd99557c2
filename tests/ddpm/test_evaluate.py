"""``tenvoo-fast evaluate``: MS-SSIM between folders of NIfTI volumes, FID and MMD on 3D
ResNet-50 features when weights are given, and clean errors."""
import json
import warnings

import numpy as np
import pytest
import torch

from tenvoo_fast.ddpm.cli import main
from tenvoo_fast.ddpm.evaluate import NOT_COMPUTED, frechet_distance, ms_ssim_kernel
from tenvoo_fast.ddpm.phantoms import brain_phantom
from tenvoo_fast.ddpm.sample import save_nifti

SIZE = (48, 48, 48)  # the smallest that 5-scale MS-SSIM takes (window 3)


def _phantoms(folder, n=3, size=SIZE, seed=0):
    for i in range(n):
        save_nifti(brain_phantom(i, size, seed).numpy(), folder / f"vol_{i:03d}.nii.gz")
    return folder


def _noise(folder, n=3, size=SIZE):
    rng = np.random.default_rng(0)
    for i in range(n):
        save_nifti(rng.random(size, dtype=np.float32), folder / f"noise_{i:03d}.nii.gz")
    return folder


def _resnet50():
    from monai.networks.nets import resnet50

    torch.manual_seed(0)
    return resnet50(spatial_dims=3, n_input_channels=1, feed_forward=False, shortcut_type="B",
                    bias_downsample=False)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("volumes")
    a = _phantoms(root / "a")
    copy = _phantoms(root / "copy")  # the same volumes again
    noise = _noise(root / "noise")
    big = _phantoms(root / "big", size=(56, 52, 60))
    return {"a": a, "copy": copy, "noise": noise, "big": big, "root": root}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A random ResNet-50 saved as a MedicalNet-style checkpoint ('state_dict', 'module.')."""
    path = tmp_path_factory.mktemp("weights") / "resnet50.pth"
    state = {"module." + k: v for k, v in _resnet50().state_dict().items()}
    torch.save({"state_dict": state}, path)
    return path


def _evaluate(generated, reference, out, *args):
    return main(["evaluate", "--generated", str(generated), "--reference", str(reference),
                 "--out", str(out), *args])


def test_without_weights_reports_ms_ssim_and_no_fid(folders, tmp_path, capsys):
    out = tmp_path / "sub" / "evaluation.json"
    assert _evaluate(folders["a"], folders["copy"], out) == 0
    result = json.loads(out.read_text())
    assert {"generated", "reference", "size", "ms_ssim", "ms_ssim_detail", "fid", "mmd", "note",
            "device", "versions", "date"} <= set(result)
    assert result["fid"] is None and result["mmd"] is None and result["note"] == NOT_COMPUTED
    assert result["generated"]["count"] == result["reference"]["count"] == 3
    assert result["size"] == list(SIZE) and result["device"] == "cpu"
    detail = result["ms_ssim_detail"]
    assert detail["kernel_size"] == 3 and detail["pairs"] == 9 and detail["scales"] == 5
    # Each volume against its own copy scores 1; the mean covers all 9 pairs.
    assert detail["max"] == pytest.approx(1.0, abs=1e-5)
    assert 0.5 < result["ms_ssim"] < 1.0
    assert {"torch", "monai", "tenvoo_fast"} <= set(result["versions"])
    assert not list(out.parent.glob(".tmp-*"))
    printed = capsys.readouterr().out
    assert "FID and MMD were not computed" in printed and "MS-SSIM" in printed


def test_ms_ssim_of_identical_sets_is_one_and_of_noise_lower(folders, tmp_path):
    single = tmp_path / "single"
    single.mkdir()
    (single / "v.nii.gz").write_bytes((folders["a"] / "vol_000.nii.gz").read_bytes())
    assert _evaluate(single, single, tmp_path / "same.json") == 0
    same = json.loads((tmp_path / "same.json").read_text())["ms_ssim"]
    assert same == pytest.approx(1.0, abs=1e-5)
    assert _evaluate(folders["a"], folders["noise"], tmp_path / "noise.json") == 0
    noise = json.loads((tmp_path / "noise.json").read_text())["ms_ssim"]
    assert noise < 0.3 < same


def test_volumes_are_resized_to_the_generated_size_or_size(folders, tmp_path):
    out = tmp_path / "e.json"
    assert _evaluate(folders["a"], folders["big"], out) == 0
    result = json.loads(out.read_text())
    assert result["size"] == list(SIZE)
    assert result["generated"]["resized"] == 0 and result["reference"]["resized"] == 3
    assert _evaluate(folders["a"], folders["big"], out, "--size", "80", "80", "80") == 0
    result = json.loads(out.read_text())
    assert result["size"] == [80, 80, 80] and result["ms_ssim_detail"]["kernel_size"] == 5
    assert result["generated"]["resized"] == result["reference"]["resized"] == 3


def test_ms_ssim_kernel_choice():
    assert ms_ssim_kernel((112, 128, 112)) == 7
    assert ms_ssim_kernel((112, 96, 112)) == 5
    assert ms_ssim_kernel((48, 64, 80)) == 3


def test_too_small_volumes_fail_cleanly(folders, tmp_path, capsys):
    out = tmp_path / "e.json"
    assert _evaluate(folders["a"], folders["a"], out, "--size", "32", "48", "48") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "48 voxels" in err and "32x48x48" in err
    assert "Traceback" not in err and not out.exists()


def test_fid_and_mmd_with_feature_weights(folders, weights, tmp_path, capsys):
    same, other = tmp_path / "same.json", tmp_path / "other.json"
    assert _evaluate(folders["a"], folders["copy"], same, "--feature-weights", str(weights)) == 0
    assert _evaluate(folders["a"], folders["noise"], other, "--feature-weights",
                     str(weights)) == 0
    same, other = (json.loads(p.read_text()) for p in (same, other))
    assert "note" not in same and same["features"]["dim"] == 2048
    assert same["feature_weights"] == str(weights)
    assert same["fid"] == pytest.approx(0.0, abs=1e-6)
    assert other["fid"] > 1.0
    assert other["mmd"] > same["mmd"]
    assert "FID: " in capsys.readouterr().out


def test_frechet_distance_matches_monai_fid():
    """The nuclear-norm form equals the textbook formula (and MONAI's FIDMetric, where this
    scipy still takes its sqrtm call) when that is well posed, and a set against itself is 0
    even with fewer samples than features."""
    from monai.metrics import FIDMetric

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 12, generator=g, dtype=torch.float64)
    y = 1.3 * torch.randn(150, 12, generator=g, dtype=torch.float64) + 0.2
    sx, sy = torch.cov(x.T), torch.cov(y.T)
    w, v = torch.linalg.eigh(sx)
    root_x = v @ torch.diag(w.clamp_min(0).sqrt()) @ v.T
    tr_sqrt = torch.linalg.eigvalsh(root_x @ sy @ root_x).clamp_min(0).sqrt().sum()
    diff = x.mean(0) - y.mean(0)
    expected = float(diff @ diff + sx.trace() + sy.trace() - 2 * tr_sqrt)
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-9)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy's deprecation of sqrtm(disp=...)
            monai_fid = float(FIDMetric()(x, y))
    except TypeError:  # scipy >= 1.18 dropped sqrtm's disp argument, which MONAI 1.6.1 passes
        monai_fid = expected
    assert frechet_distance(x, y) == pytest.approx(monai_fid, rel=1e-9)
    few = torch.randn(4, 2048, generator=g, dtype=torch.float64).relu()
    assert frechet_distance(few, few) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("case", ["missing", "empty", "corrupt"])
def test_bad_folders_fail_cleanly(folders, tmp_path, capsys, case):
    bad = tmp_path / "bad"
    if case != "missing":
        bad.mkdir()
    if case == "corrupt":
        (bad / "a.nii.gz").write_bytes((folders["a"] / "vol_000.nii.gz").read_bytes())
        (bad / "b.nii.gz").write_bytes(b"not a nifti file")
    out = tmp_path / "e.json"
    assert _evaluate(folders["a"], bad, out) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and len(err.splitlines()) == 1
    if case == "corrupt":
        assert str(bad / "b.nii.gz") in err
    else:
        assert f"--reference {bad}" in err
    assert not out.exists()
    assert _evaluate(bad, folders["a"], out) == 2
    assert "--generated" in capsys.readouterr().err or case == "corrupt"


def test_bad_weights_fail_cleanly(folders, tmp_path, capsys):
    from monai.networks.nets import resnet18

    out = tmp_path / "e.json"
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00 not a checkpoint")
    other = tmp_path / "resnet18.pth"
    torch.save(resnet18(spatial_dims=3, n_input_channels=1).state_dict(), other)
    missing = tmp_path / "nope.pth"
    for path, words in ((garbage, "not a readable"), (other, "missing"),
                        (missing, "no such file")):
        assert _evaluate(folders["a"], folders["a"], out, "--feature-weights", str(path)) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and f"--feature-weights {path}" in err
        assert words in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_fid_needs_two_volumes_per_folder(folders, weights, tmp_path, capsys):
    single = tmp_path / "single"
    single.mkdir()
    (single / "v.nii.gz").write_bytes((folders["a"] / "vol_000.nii.gz").read_bytes())
    assert _evaluate(single, folders["a"], tmp_path / "e.json", "--feature-weights",
                     str(weights)) == 2
    assert "at least 2 volumes" in capsys.readouterr().err
