"""Atomic file writes: write to a temporary file in the target folder, then rename it over the
target, so readers (and a resumed run) never see a half-written file; strict JSON (no bare
``NaN``); and checks that an output path can be written, made before the work starts."""
from __future__ import annotations

import json
import math
import os
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import RunError


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success rename it to ``path``, on error
    delete it. The folder is created if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Only a unique name: the writer creates the file, with the usual (umask) permissions.
    tmp = str(path.parent / f".tmp-{os.getpid()}-{uuid.uuid4().hex}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def finite_json(data: Any, where: str = "") -> tuple[Any, list[str]]:
    """``data`` with every non-finite float (NaN, ±Infinity; Python or NumPy floats, nested in
    dicts, lists and tuples) replaced by ``None``, and where each was (``"a.b[2]"``), so that
    callers can say so. NumPy scalars and arrays become plain Python values."""
    if isinstance(data, dict):
        out, bad = {}, []
        for key, value in data.items():
            out[key], inner = finite_json(value, f"{where}.{key}" if where else str(key))
            bad += inner
        return out, bad
    if isinstance(data, (list, tuple)):
        out, bad = [], []
        for i, value in enumerate(data):
            clean, inner = finite_json(value, f"{where}[{i}]")
            out.append(clean)
            bad += inner
        return out, bad
    if hasattr(data, "tolist") and type(data).__module__ == "numpy":  # NumPy scalar or array
        return finite_json(data.tolist(), where)
    if isinstance(data, float) and not math.isfinite(data):
        return None, [where]
    return data, []


def write_json_atomic(path: str | os.PathLike, data: dict) -> list[str]:
    """Write ``data`` as indented, strict JSON to ``path`` atomically: non-finite floats, which
    JSON cannot hold (``json`` would write a bare ``NaN`` that other readers refuse), are written
    as ``null``. Returns where they were (see :func:`finite_json`); a caller that can have them
    should add a note saying why."""
    clean, bad = finite_json(data)
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(clean, f, indent=2, allow_nan=False)
        f.write("\n")
    return bad


def _probe(folder: Path) -> str | None:
    """Why a file cannot be created in the existing folder ``folder`` (None if it can): creates
    and removes a probe file, which is what counts (permission bits do not stop root, a
    read-only file system stops everyone)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".tenvoo-probe-", dir=folder)
    except OSError as e:
        return e.strerror or type(e).__name__
    os.close(fd)
    os.unlink(name)
    return None


def _check_folder(folder: Path, flag: str, given: str | os.PathLike, what: str) -> None:
    """:class:`RunError` unless ``folder`` is a writable folder, or can be created: its nearest
    existing ancestor is a writable folder. Creates nothing that outlives the check."""
    where = f"{flag} {given}"
    named = "this folder" if str(folder) == str(given) else f"the folder {folder}"
    # os.path's tests, not Path's: they answer False where a parent cannot be searched.
    if os.path.exists(folder):
        if not os.path.isdir(folder):
            file = "" if str(folder) == str(given) else f"{folder} "
            raise RunError(f"{where}: {file}is a file, not a folder; {what}")
        reason = _probe(folder)
        if reason:
            raise RunError(f"{where}: cannot write in {named} ({reason}); choose a folder you "
                           "can write to, or change its permissions")
        return
    parent = folder.parent
    while not os.path.exists(parent) and parent != parent.parent:
        parent = parent.parent
    if not os.path.isdir(parent):
        raise RunError(f"{where}: {parent} is a file, so no folder can be created under it; "
                       "choose another path")
    reason = _probe(parent)
    if reason:
        raise RunError(f"{where}: cannot create {folder}: cannot write in the folder {parent} "
                       f"({reason}); choose a folder you can write to, or change its "
                       "permissions")


def check_writable_folder(path: str | os.PathLike, flag: str) -> None:
    """Check, before any work, that the folder ``path`` (given by the command-line ``flag``) can
    take output files: it is a folder that can be written, or it does not exist yet and its
    nearest existing parent is a writable folder (so it can be created). Raises
    :class:`RunError` naming ``flag``, the path, what is wrong and the fix. Leaves nothing
    behind: a missing folder is not created."""
    _check_folder(Path(path), flag, path, "pass a folder (it is created if missing)")


def check_writable_file(path: str | os.PathLike, flag: str, example: str = "out.json") -> None:
    """Check, before any work, that the file ``path`` (given by ``flag``) can be written
    atomically: it is not a folder, and its folder is writable or can be created (see
    :func:`check_writable_folder`). An existing file is fine: it will be replaced. ``example``
    is the file name the message suggests when ``path`` is a folder."""
    path = Path(path)
    if os.path.isdir(path):
        raise RunError(f"{flag} {path}: is a folder; pass a file path, e.g. "
                       f"{path / example}")
    _check_folder(path.parent, flag, path, "pass a file path in a folder")
