"""Bad input to ``tenvoo-fast sample``, ``evaluate`` and ``finetune --data``: each is refused
before the work starts (where it can be known then) with exit status 2 and one ``error: ...``
line on stderr that names the file or flag, says what is wrong and the fix; no traceback, no
half-written output, no bare NaN in JSON.

The CLI cases run the real command in a subprocess, so stderr is exactly what a user sees.
"""
import gzip
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tenvoo_fast import AdapterConfig, adapter_layers, inject, presets, save_adapter
from tenvoo_fast.ddpm.data import VolumeError, nifti_files, split
from tenvoo_fast.errors import RunError
from tenvoo_fast.ddpm.finetune import base_unet
from tenvoo_fast.files import check_writable_file, check_writable_folder, write_json_atomic
from tenvoo_fast.ddpm.phantoms import brain_phantom
from tenvoo_fast.ddpm.sample import save_nifti

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ["sample", "--preset", "tiny", "--device", "cpu", "--scheduler", "ddim", "--steps", "1",
          "--size", "16", "16", "16"]
EVAL_SIZE = (48, 48, 48)  # the smallest 5-scale MS-SSIM takes
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", "tenvoo_fast", *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def one_error_line(result: subprocess.CompletedProcess, *named) -> str:
    """The single ``error:`` line of a run that exited with 2; it must name each of ``named``."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    for name in named:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# --------------------------------------------------------------------------------------------
# Fixtures: adapters and volume folders, made in-process (no finetune run needed)


def _adapter(path: Path, seed: int = 0, poison: bool = False, origin: bool = False) -> Path:
    torch.manual_seed(seed)
    model = base_unet("tiny")
    inject(model, AdapterConfig(method="tenvoo-l", rank=2,
                                target_modules=list(presets.PAPER_DDPM_TARGETS),
                                trainable=("bias",)))
    if poison:
        with torch.no_grad():
            next(iter(adapter_layers(model).values())).cores[0].view(-1)[0] = float("nan")
    path.parent.mkdir(parents=True, exist_ok=True)
    if origin:  # as finetune records it
        save_adapter(model, path, base_origin={"preset": "tiny", "seed": seed,
                                               "base_weights": None})
    else:
        save_adapter(model, path)
    return path


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"good": _adapter(root / "good" / "adapter.safetensors"),
            "nan": _adapter(root / "nan" / "adapter.safetensors", poison=True),
            "origin": _adapter(root / "origin" / "adapter.safetensors", origin=True)}


def _volumes(folder: Path, n: int = 2, size=EVAL_SIZE, seed: int = 0) -> Path:
    for i in range(n):
        save_nifti(brain_phantom(i, size, seed).numpy(), folder / f"vol_{i:03d}.nii.gz")
    return folder


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    root = tmp_path_factory.mktemp("volumes")
    good = _volumes(root / "good")
    nan = _volumes(root / "nan", seed=1)
    volume = brain_phantom(0, EVAL_SIZE, 1).numpy()
    volume[3, 4, 5] = np.nan
    volume[0, 0, 0] = np.inf
    save_nifti(volume, nan / "vol_000.nii.gz")
    return {"good": good, "nan": nan, "bad_file": nan / "vol_000.nii.gz"}


# --------------------------------------------------------------------------------------------
# io: the output checks and strict JSON


def test_check_writable_folder_accepts_new_folders_and_creates_nothing(tmp_path):
    check_writable_folder(tmp_path, "--out")
    check_writable_folder(tmp_path / "a" / "b" / "c", "--out")  # created later, by the writer
    check_writable_file(tmp_path / "x" / "e.json", "--out")
    check_writable_file(tmp_path / "x.json", "--out")
    (tmp_path / "exists.json").write_text("{}")
    check_writable_file(tmp_path / "exists.json", "--out")  # replaced atomically later
    assert listing(tmp_path) == ["exists.json"]  # no folder, no probe file left behind


def test_check_writable_refuses_files_and_paths_under_files(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [(check_writable_folder, afile, "is a file, not a folder"),
             (check_writable_folder, afile / "sub" / "dir", f"{afile} is a file"),
             (check_writable_file, tmp_path, "is a folder; pass a file path"),
             (check_writable_file, afile / "e.json", f"{afile} is a file")]
    for check, path, words in cases:
        with pytest.raises(RunError) as e:
            check(path, "--out")
        assert str(e.value).startswith(f"--out {path}: ") and words in str(e.value)
    assert listing(tmp_path) == ["afile"]


@pytest.mark.skipif(IS_ROOT, reason="root writes into a 0o500 folder; the probe-file check "
                                    "then rightly passes (see the /proc case below)")
def test_check_writable_refuses_a_read_only_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        for check, path in ((check_writable_folder, locked),
                            (check_writable_folder, locked / "new"),
                            (check_writable_file, locked / "e.json")):
            with pytest.raises(RunError, match="cannot write in"):
                check(path, "--out")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_check_writable_refuses_a_folder_nobody_can_write():
    """/proc takes no new files even from root: the unwritable-folder case as root."""
    for check, path in ((check_writable_folder, "/proc/tenvoo-fast-test"),
                        (check_writable_file, "/proc/self/tenvoo-fast-test.json")):
        with pytest.raises(RunError, match="cannot write in"):
            check(path, "--out")


def test_write_json_atomic_writes_strict_json(tmp_path):
    path = tmp_path / "m.json"
    data = {"a": float("nan"), "ok": 1.5, "b": [1.0, np.float32("inf"), {"c": -math.inf}],
            "d": np.float64("nan"), "e": np.arange(2), "f": np.float32(0.25), "s": "NaN"}
    bad = write_json_atomic(path, data)
    assert bad == ["a", "b[1]", "b[2].c", "d"]

    def refuse(constant):
        raise AssertionError(f"bare {constant} in JSON")
    loaded = json.loads(path.read_text(), parse_constant=refuse)
    assert loaded == {"a": None, "ok": 1.5, "b": [1.0, None, {"c": None}], "d": None,
                      "e": [0, 1], "f": 0.25, "s": "NaN"}
    assert data["a"] != data["a"]  # the caller's data is left as it was
    assert listing(tmp_path) == ["m.json"]


# --------------------------------------------------------------------------------------------
# sample


def test_sample_out_is_a_file(tmp_path):
    out = tmp_path / "afile"
    out.write_text("x")
    # The default 1000 DDPM steps on 2 volumes: only a check before sampling returns quickly.
    result = cli("sample", "--preset", "tiny", "--device", "cpu", "--num", "2", "--out", out)
    one_error_line(result, f"--out {out}", "is a file")
    assert result.stdout == "" and out.read_text() == "x"


def test_sample_out_under_a_file(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    out = afile / "samples"
    result = cli("sample", "--preset", "tiny", "--device", "cpu", "--num", "2", "--out", out)
    one_error_line(result, f"--out {out}", f"{afile} is a file")
    assert result.stdout == "" and listing(tmp_path) == ["afile"]


def unwritable(tmp_path, name):
    """A path ``name`` in a folder this process cannot write: a 0o500 folder for other users;
    as root, which writes there, under /proc (the one folder a test can rely on)."""
    if IS_ROOT:
        return Path("/proc/tenvoo-fast-test") / name
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    return locked / name


def test_sample_out_not_writable(tmp_path):
    """An unwritable parent: a 0o500 folder for other users; as root, which writes there, /proc
    (the only folder root cannot write that a test can rely on)."""
    out = unwritable(tmp_path, "samples")
    try:
        result = cli(*SAMPLE, "--out", out)
        one_error_line(result, f"--out {out}", "cannot write in")
        assert result.stdout == ""
    finally:
        if not IS_ROOT:
            out.parent.chmod(0o700)


@pytest.mark.parametrize("case", ["garbage", "folder", "plain-safetensors", "trained",
                                  "missing"])
def test_sample_bad_adapter_file(tmp_path, case):
    from safetensors.torch import save_file

    path = {"folder": tmp_path / "run", "trained": tmp_path / "trained.safetensors",
            "missing": tmp_path / "nope" / "adapter.safetensors"}.get(
        case, tmp_path / "adapter.safetensors")
    if case == "garbage":
        path.write_bytes(b"this is not a safetensors file")
    elif case == "folder":
        path.mkdir()
    elif case in ("plain-safetensors", "trained"):
        save_file({"w": torch.zeros(2)}, str(path))
    out = tmp_path / "out"
    result = cli(*SAMPLE, "--adapter", path, "--out", out)
    words = {"garbage": "not a safetensors file", "folder": "is a folder",
             "plain-safetensors": "not a tenvoo_fast adapter",
             "trained": "holds trained parameters, not an adapter",
             "missing": "no such file"}[case]
    one_error_line(result, f"--adapter {path}", words)
    assert result.stdout == "" and not out.exists()


def test_sample_adapter_with_nan_weights(adapters, tmp_path):
    out = tmp_path / "out"
    result = cli(*SAMPLE, "--adapter", adapters["nan"], "--out", out)
    one_error_line(result, f"--adapter {adapters['nan']}", "NaN or Inf")
    assert "sample 1/" not in result.stdout and not out.exists()


def test_sample_size_not_a_multiple_of_the_unet_factor(tmp_path):
    result = cli("sample", "--preset", "tiny", "--device", "cpu", "--size", "12", "16", "16",
                 "--out", tmp_path / "out")
    one_error_line(result, "--size 12 16 16", "multiple of 8")


def test_sample_other_seed_is_one_warning_line_or_refused_with_strict_base(adapters, tmp_path):
    """The adapter's run folder says --seed 0 (its metrics.json): sampling with --seed 3 warns
    in one line; with --strict-base it is refused before anything is sampled."""
    run = tmp_path / "run"
    run.mkdir()
    adapter = run / "adapter.safetensors"
    adapter.write_bytes(adapters["good"].read_bytes())
    (run / "metrics.json").write_text(json.dumps({"preset": "tiny", "seed": 0}))
    result = cli(*SAMPLE, "--seed", "3", "--adapter", adapter, "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: "), result.stderr
    assert f"--adapter {adapter}" in lines[0] and "pass --seed 0" in lines[0]
    assert (tmp_path / "out" / "sample_000.nii.gz").is_file()

    strict = cli(*SAMPLE, "--seed", "3", "--strict-base", "--adapter", adapter,
                 "--out", tmp_path / "strict")
    one_error_line(strict, f"--adapter {adapter}", "--strict-base", "pass --seed 0")
    assert strict.stdout == "" and not (tmp_path / "strict").exists()

    same = cli(*SAMPLE, "--seed", "0", "--strict-base", "--adapter", adapter,
               "--out", tmp_path / "same")
    assert same.returncode == 0 and same.stderr == "", same.stderr[-3000:]


def test_sample_uses_the_base_recorded_in_the_adapter_file(adapters, tmp_path):
    """An adapter copied away from its run folder (no metrics.json beside it) still says what
    base it was trained on; a base that differs is one warning line with the fix, refused under
    --strict-base, and other weights equal to that base (same fingerprint) pass."""
    assert not (adapters["origin"].parent / "metrics.json").exists()
    adapter = adapters["origin"]
    torch.manual_seed(5)
    other = tmp_path / "seed5.pt"
    torch.save(base_unet("tiny").state_dict(), other)
    torch.manual_seed(0)
    same = tmp_path / "seed0.pt"
    torch.save(base_unet("tiny").state_dict(), same)

    for args, fix in ((["--seed", "3"], "pass --seed 0"),
                      (["--base-weights", other], "drop --base-weights and pass --seed 0")):
        result = cli(*SAMPLE, *args, "--adapter", adapter, "--out", tmp_path / "out")
        assert result.returncode == 0, result.stderr[-3000:]
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("warning: "), result.stderr
        assert f"--adapter {adapter}" in lines[0] and fix in lines[0]
        assert "base_mismatch=" not in lines[0]  # library advice is not CLI advice
        strict = cli(*SAMPLE, *args, "--strict-base", "--adapter", adapter,
                     "--out", tmp_path / "strict")
        one_error_line(strict, f"--adapter {adapter}", fix, "--strict-base")
        assert strict.stdout == "" and not (tmp_path / "strict").exists()
    result = cli(*SAMPLE, "--base-weights", same, "--strict-base", "--adapter", adapter,
                 "--out", tmp_path / "same")
    assert result.returncode == 0 and result.stderr == "", result.stderr[-3000:]


def test_sample_adapter_of_another_preset_recorded_in_the_file(adapters, tmp_path):
    result = cli("sample", "--preset", "paper", "--device", "cpu", "--size", "32", "32", "32",
                 "--adapter", adapters["origin"], "--out", tmp_path / "out")
    one_error_line(result, "--preset paper", str(adapters["origin"]), "pass --preset tiny")
    assert result.stdout == "" and not (tmp_path / "out").exists()


def test_sample_adapter_of_another_preset(adapters, tmp_path):
    """The run folder says the adapter is the tiny UNet's: --preset paper is refused before the
    (large) paper UNet is built."""
    run = tmp_path / "run"
    run.mkdir()
    adapter = run / "adapter.safetensors"
    adapter.write_bytes(adapters["good"].read_bytes())
    (run / "metrics.json").write_text(json.dumps({"preset": "tiny", "seed": 0}))
    result = cli("sample", "--preset", "paper", "--device", "cpu", "--size", "32", "32", "32",
                 "--adapter", adapter, "--out", tmp_path / "out")
    one_error_line(result, "--preset paper", str(adapter), "pass --preset tiny")


# --------------------------------------------------------------------------------------------
# evaluate


def _evaluate(generated, reference, out, *args):
    return cli("evaluate", "--generated", generated, "--reference", reference, "--out", out,
               *args)


def test_evaluate_out_is_a_folder(volumes, tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    result = _evaluate(volumes["good"], volumes["good"], out)
    one_error_line(result, f"--out {out}", "is a folder", "evaluation.json")
    assert result.stdout == "" and listing(out) == []


def test_evaluate_out_under_a_file(volumes, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    out = afile / "evaluation.json"
    result = _evaluate(volumes["good"], volumes["good"], out)
    one_error_line(result, f"--out {out}", f"{afile} is a file")
    assert result.stdout == "" and listing(tmp_path) == ["afile"]


def test_evaluate_out_not_writable(volumes, tmp_path):
    """As in sample: a 0o500 folder for other users, /proc as root."""
    out = unwritable(tmp_path, "evaluation.json")
    try:
        result = _evaluate(volumes["good"], volumes["good"], out)
        one_error_line(result, f"--out {out}", "cannot write in")
        assert result.stdout == ""
    finally:
        if not IS_ROOT:
            out.parent.chmod(0o700)


@pytest.mark.parametrize("flag", ["--generated", "--reference"])
def test_evaluate_folder_flag_given_a_file(volumes, tmp_path, flag):
    afile = volumes["good"] / "vol_000.nii.gz"
    folders = {"--generated": volumes["good"], "--reference": volumes["good"], flag: afile}
    result = _evaluate(folders["--generated"], folders["--reference"], tmp_path / "e.json")
    one_error_line(result, f"{flag} {afile}", "is a file, not a folder")


def test_evaluate_feature_weights_a_folder(volumes, tmp_path):
    result = _evaluate(volumes["good"], volumes["good"], tmp_path / "e.json",
                       "--feature-weights", tmp_path)
    one_error_line(result, f"--feature-weights {tmp_path}", "is a folder")


@pytest.mark.parametrize("side", ["generated", "reference"])
def test_evaluate_refuses_a_volume_with_non_finite_voxels(volumes, tmp_path, side):
    """Today's bug: one NaN voxel made MS-SSIM NaN and the JSON a bare NaN. Now the file is
    named (with its count of NaN/Inf voxels) and nothing is written."""
    out = tmp_path / "e.json"
    folders = (volumes["nan"], volumes["good"]) if side == "generated" else \
        (volumes["good"], volumes["nan"])
    result = _evaluate(*folders, out)
    line = one_error_line(result, volumes["bad_file"], "2 non-finite voxel(s) (NaN or Inf)",
                          "fix or remove this file")
    assert line == (f"error: {volumes['bad_file']}: 2 non-finite voxel(s) (NaN or Inf); "
                    "fix or remove this file")
    assert not out.exists()


def test_evaluate_non_finite_metric_is_null_with_a_note(volumes, tmp_path, monkeypatch, capsys):
    """Should a metric still come out NaN (MS-SSIM can break down on finite volumes), the JSON
    holds null (strict JSON) and says which pairs and why."""
    from tenvoo_fast.ddpm import evaluate
    from tenvoo_fast.ddpm.cli import main

    real = evaluate.ms_ssim

    def with_a_nan(*args, **kwargs):
        scores = real(*args, **kwargs)
        scores[1, 0] = float("nan")
        return scores
    monkeypatch.setattr(evaluate, "ms_ssim", with_a_nan)
    out = tmp_path / "e.json"
    assert main(["evaluate", "--generated", str(volumes["good"]), "--reference",
                 str(volumes["good"]), "--out", str(out)]) == 0
    def refuse(constant):
        raise AssertionError(f"bare {constant} in {out}")
    result = json.loads(out.read_text(), parse_constant=refuse)
    assert result["ms_ssim"] is None and result["ms_ssim_detail"]["mean"] is None
    assert result["ms_ssim_detail"]["pairs"] == 4
    assert {"ms_ssim", "ms_ssim_detail.mean"} <= set(result["non_finite"]["fields"])
    assert "1 of 4 pairs" in result["non_finite"]["note"]
    assert "vol_001.nii.gz vs vol_000.nii.gz" in result["non_finite"]["note"]
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("warning: ms_ssim")


# --------------------------------------------------------------------------------------------
# NIfTI data: truncated files, non-finite voxels, errors from DataLoader workers


def _nifti_folder(folder: Path, n: int = 3, size=(12, 14, 10), suffix=".nii.gz") -> Path:
    import nibabel

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        volume = (brain_phantom(i, size).numpy() * 100.0).astype(np.float32)
        nibabel.save(nibabel.Nifti1Image(volume, np.diag([1.2, 1.0, 1.5, 1.0])),
                     folder / f"vol{i}{suffix}")
    return folder


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_truncated_files_are_found_up_front(tmp_path, suffix):
    folder = _nifti_folder(tmp_path / "data", suffix=suffix)
    victim = folder / f"vol1{suffix}"
    data = victim.read_bytes()
    nifti_files(folder)  # complete files pass
    victim.write_bytes(data[:len(data) // 2] if suffix == ".nii.gz" else data[:-10])
    with pytest.raises(RunError, match="truncated") as e:
        nifti_files(folder)
    assert str(e.value).startswith(f"{victim}: ") and "copy the file again" in str(e.value)


def test_valid_gzip_variants_pass_the_size_check(tmp_path):
    """Multi-member gzip (as bgzip writes), zero padding and trailing bytes are valid files that
    the cheap size check (gzip's recorded size) cannot confirm: they are decompressed instead."""
    from tenvoo_fast.ddpm.data import NiftiVolumes

    folder = _nifti_folder(tmp_path / "data", n=1)
    path = folder / "vol0.nii.gz"
    raw = gzip.decompress(path.read_bytes())
    for data in (gzip.compress(raw[:500]) + gzip.compress(raw[500:]),
                 gzip.compress(raw) + b"\0" * 16, gzip.compress(raw + b"extra")):
        path.write_bytes(data)
        assert nifti_files(folder)[0] == [path]
        assert NiftiVolumes([path], (8, 8, 8))[0].shape == (1, 8, 8, 8)


def test_non_finite_voxels_are_refused_when_read(tmp_path):
    import nibabel

    from tenvoo_fast.ddpm.data import NiftiVolumes

    folder = _nifti_folder(tmp_path / "data", n=1)
    volume = np.asarray(nibabel.load(folder / "vol0.nii.gz").dataobj).copy()
    volume[1, 2, 3] = np.nan
    path = folder / "vol0.nii.gz"
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), path)
    with pytest.raises(VolumeError) as e:
        NiftiVolumes([path], (8, 8, 8))[0]
    assert str(e.value) == f"{path}: 1 non-finite voxel(s) (NaN or Inf); fix or remove this file"


def test_volume_error_keeps_its_message_across_the_worker_boundary():
    """torch re-raises a worker's exception as type(e)(text with the worker's traceback)."""
    from torch._utils import ExceptionWrapper

    try:
        try:
            raise OSError("deep cause")
        except OSError as cause:
            raise VolumeError("/data/v.nii.gz: could not be loaded (x); copy it") from cause
    except VolumeError:
        wrapper = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(VolumeError) as e:
        wrapper.reraise()
    assert str(e.value) == "/data/v.nii.gz: could not be loaded (x); copy it"
    assert str(VolumeError("plain message")) == "plain message"


def _finetune(data, out):
    return cli("finetune", "--preset", "tiny", "--device", "cpu", "--num-volumes", "3",
               "--accum", "1", "--steps", "2", "--workers", "1", "--data", data, "--out", out)


def test_finetune_truncated_nifti_with_a_worker(tmp_path):
    folder = _nifti_folder(tmp_path / "data")
    victim = folder / "vol1.nii.gz"
    data = victim.read_bytes()
    victim.write_bytes(data[:len(data) // 2])
    one_error_line(_finetune(folder, tmp_path / "out"), victim, "truncated")


def test_finetune_nan_volume_read_by_a_worker(tmp_path):
    """A volume only its reading can refuse (a NaN voxel), read in a DataLoader worker: the
    error reaches the user as one line naming the file, not torch's wrapped traceback."""
    import nibabel

    folder = _nifti_folder(tmp_path / "data")
    train, _ = split(3, 0)
    for i in train:  # the worker reads training volumes (validation is read in the main process)
        path = folder / f"vol{i}.nii.gz"
        volume = np.asarray(nibabel.load(path).dataobj).copy()
        volume[2, 2, 2] = np.nan
        nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), path)
    line = one_error_line(_finetune(folder, tmp_path / "out"), "non-finite voxel(s)")
    assert any(f"{folder / f'vol{i}.nii.gz'}: 1 non-finite" in line for i in train), line
