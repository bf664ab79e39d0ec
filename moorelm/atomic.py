"""Atomic writes: temp file (or folder) beside the target, fsync, rename, fsync the parent.

A process killed at any instant leaves either the old file or the new one, never a torn one.
``replace_dir`` does the same for a whole folder (a checkpoint, an exported model, a run
replaced by an import): the files appear together or not at all.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moorelm.errors import MoorelmError, from_write_error


def check_writable(path: Path) -> None:
    """Refuse ``path`` (a file or folder about to be written) when this process could not
    write where it goes (a read-only disk, a folder of another user's), judged on its nearest
    existing folder: for work whose result is written only at the end (an evaluation, a
    classifier trained in memory), so it is refused before the work, not lost after it."""
    place = Path(path)
    while not place.exists() and place != place.parent:
        place = place.parent
    if place.is_dir() and not os.access(place, os.W_OK | os.X_OK):
        raise MoorelmError(f"cannot write in {place} (read-only or not yours); choose "
                           "another place")


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def _fsync_tree(root: Path) -> None:
    for folder, _, names in os.walk(root):
        for name in names:
            fsync_file(Path(folder) / name)
        fsync_dir(Path(folder))


@contextlib.contextmanager
def replace_dir(path: Path, action: str | None = None,
                again: str | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; when the block ends without error, fsync
    everything in it and rename it to ``path`` (replacing what was there). On error the
    temporary folder is removed and ``path`` is untouched. With ``action`` ("export to
    out/"), a failed write (a full disk, a read-only folder, safetensors' own write error) is
    raised as one ``MoorelmError`` line naming it (``errors.from_write_error``; ``again``:
    what to do once there is room, by default "run the same command again")."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    except OSError as e:  # a read-only or full disk, a parent that is a file
        if action:
            raise from_write_error(e, action, again) from None
        raise
    try:
        yield tmp
        _fsync_tree(tmp)
        if path.exists() or path.is_symlink():
            old = tmp.with_name(tmp.name[: -len(".tmp")] + ".old.tmp")
            os.replace(path, old)
            os.replace(tmp, path)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
        else:
            os.replace(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        error = from_write_error(e, action, again) if action else None
        if error is not None:
            raise error from None
        raise
    fsync_dir(path.parent)
