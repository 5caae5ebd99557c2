"""A fine-tuning run's checkpoints on disk: one consistent unit per step, published atomically.

A checkpoint is a folder ``OUT/checkpoints/step-NNNNNNNN-XXXXXXXX`` holding every file of one
step (the trained weights and ``state.pt``: optimizer, scaler, step, losses, RNG states, data
position). It is written under a temporary name, its files flushed to disk, and renamed into
place; then the manifest ``OUT/checkpoint.json``, naming that folder, replaces the previous
manifest (write, then rename). The manifest is the commit point: whenever a run is killed, the
manifest names a complete folder, either the new one or the one before. Only after that are
older folders deleted and the latest weights copied to the top of ``OUT`` for users
(``OUT/adapter.safetensors``). Leftovers of a killed write (temporary files and folders, folders
no manifest names) are removed by :func:`clean_stale` when the next run starts.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterable

from ..errors import RunError, one_line

MANIFEST = "checkpoint.json"
FOLDER = "checkpoints"
FORMAT = "tenvoo_fast.finetune_checkpoint"
FORMAT_VERSION = 1
TMP_PREFIX = ".tmp-"


_reached: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Die here, as ``kill -9`` would, when ``TENVOO_FAST_CRASH_AT`` is ``name`` (the first
    time this point is reached) or ``name:N`` (the N-th time): how the tests kill a run at
    each step of a checkpoint write."""
    want = os.environ.get("TENVOO_FAST_CRASH_AT")
    if not want:
        return
    point, _, count = want.partition(":")
    if point == name:
        _reached[name] = _reached.get(name, 0) + 1
        if _reached[name] == int(count or 1):
            os._exit(137)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_file(src: Path, dst: Path) -> None:
    """Put a copy of ``src`` at ``dst`` atomically (a hard link where the file system has them)."""
    tmp = dst.parent / f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}{dst.suffix}"
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_manifest(out: Path) -> dict | None:
    """The manifest of the run in ``out``, or None when there is none; a manifest that is not
    one, or names a folder that is missing, is a :class:`RunError`."""
    path = out / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"{path}: not a readable checkpoint manifest ({one_line(e)}); remove "
                       f"it to start the run in {out} afresh") from e
    if not (isinstance(manifest, dict) and manifest.get("format") == FORMAT
            and isinstance(manifest.get("step"), int) and isinstance(manifest.get("folder"), str)):
        raise RunError(f"{path}: not a tenvoo-fast finetune checkpoint manifest; remove it, or "
                       "use another --out")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise RunError(f"{path}: checkpoint format version {manifest.get('format_version')!r}, "
                       f"this tenvoo_fast reads version {FORMAT_VERSION}")
    folder = out / manifest["folder"]
    if not folder.is_dir():
        raise RunError(f"{path} names {folder}, which is missing; the run folder was changed "
                       "by hand: restore it or start afresh with another --out")
    return manifest


def checkpoint_folder(out: Path, manifest: dict) -> Path:
    return out / manifest["folder"]


def clean_stale(out: Path) -> list[Path]:
    """Remove what a killed checkpoint write left behind in ``out``: temporary files and folders,
    and step folders that the manifest does not name. Returns what was removed."""
    removed = []
    if not out.is_dir():
        return removed
    manifest = read_manifest(out)
    keep = (out / manifest["folder"]).resolve() if manifest else None
    candidates = [p for p in out.iterdir() if p.name.startswith(TMP_PREFIX)]
    folder = out / FOLDER
    if folder.is_dir():
        candidates += [p for p in folder.iterdir()
                       if p.name.startswith(TMP_PREFIX)
                       or (p.is_dir() and p.name.startswith("step-") and p.resolve() != keep)]
    for path in candidates:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def remove(out: Path) -> None:
    """Delete the checkpoint of the run in ``out`` (``finetune --overwrite``): the manifest
    first, so that a kill part-way leaves no checkpoint rather than half of one."""
    (out / MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(out / FOLDER, ignore_errors=True)


def publish(out: Path, step: int, write: Callable[[Path], Iterable[str]],
            top_level: Iterable[str] = ()) -> Path:
    """Write one checkpoint of ``step``: ``write(folder)`` writes its files into a fresh
    temporary folder and returns their names; the folder is renamed into place, the manifest
    published, older folders removed, and the files named in ``top_level`` copied to ``out``.
    Returns the new folder."""
    root = out / FOLDER
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}-{uuid.uuid4().hex[:8]}"
    tmp = root / f"{TMP_PREFIX}{name}"
    tmp.mkdir()
    try:
        files = list(write(tmp))
        for f in files:
            _fsync(tmp / f)
        crash_point("files-written")
        os.rename(tmp, root / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(root)
    crash_point("folder-renamed")
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": step,
                "folder": f"{FOLDER}/{name}", "files": files}
    tmp_manifest = out / f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}.json"
    with open(tmp_manifest, "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    crash_point("manifest-written")
    os.replace(tmp_manifest, out / MANIFEST)
    _fsync(out)
    crash_point("manifest-published")
    for old in root.iterdir():
        if old.name != name and old.is_dir() and old.name.startswith("step-"):
            shutil.rmtree(old, ignore_errors=True)
    for f in top_level:
        _replace_file(root / name / f, out / f)
        crash_point(f"top-level-{f}")
    return root / name
