"""Atomic folders and the errors of writes: ``replace_dir`` makes a folder appear whole or not
at all; a failed write, a full or read-only disk, a folder the user may not write is one line."""

import errno
import os

import pytest
from safetensors import SafetensorError

from moorelm.atomic import replace_dir
from moorelm.errors import MoorelmError, disk_full, environment_error


def _tree(root):
    return sorted((p.relative_to(root).as_posix(), p.read_text() if p.is_file() else None)
                  for p in root.rglob("*"))


def test_replace_dir_swaps_the_folder_in_whole(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with replace_dir(target) as tmp:
        assert tmp.parent == tmp_path and not (tmp / "old.txt").exists()
        (tmp / "a.txt").write_text("a")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("b")
    assert _tree(target) == [("a.txt", "a"), ("sub", None), ("sub/b.txt", "b")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left


@pytest.mark.parametrize("error, expected", [
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
     "cannot export to OUT: no space left on the device; free some space and run the same "
     "command again"),
    (OSError(errno.EROFS, os.strerror(errno.EROFS)),
     "cannot export to OUT: Read-only file system"),
    (SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
     "cannot export to OUT: no space left on the device; free some space and run the same "
     "command again"),
    (SafetensorError("Error while serializing: header too large\nmore"),
     "cannot export to OUT: Error while serializing: header too large"),
])
def test_a_failed_write_is_one_line_and_the_old_folder_stays(tmp_path, error, expected):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(MoorelmError) as e:
        with replace_dir(target, "export to OUT") as tmp:
            (tmp / "half.txt").write_text("half")
            raise error
    assert str(e.value) == expected
    assert e.value.__cause__ is None and e.value.__suppress_context__
    assert _tree(target) == [("old.txt", "old")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_other_errors_pass_through_unchanged(tmp_path):
    """Only write failures are worded; a bug or a user's check inside the block is not."""
    for error in (ValueError("a bug"), MoorelmError("the user's mistake"), KeyboardInterrupt()):
        with pytest.raises(type(error)) as e:
            with replace_dir(tmp_path / "out", "export to OUT"):
                raise error
        assert e.value is error
    with pytest.raises(OSError):  # without an action, nothing is translated
        with replace_dir(tmp_path / "out"):
            raise OSError(errno.ENOSPC, "full")
    assert list(tmp_path.iterdir()) == []


def test_disk_full_reads_the_errno_or_the_quoted_os_error():
    assert disk_full(OSError(errno.ENOSPC, "x")) and disk_full(OSError(errno.EDQUOT, "x"))
    assert not disk_full(OSError(errno.EACCES, "x")) and not disk_full(ValueError("x"))
    assert disk_full(SafetensorError("I/O error: No space left on device (os error 28)"))


@pytest.mark.parametrize("error, expected", [
    (OSError(errno.EROFS, os.strerror(errno.EROFS), "/mnt/ro/run"),
     "Read-only file system: /mnt/ro/run"),
    (OSError(errno.EACCES, os.strerror(errno.EACCES), "/home/other/.out.x1y2.tmp"),
     "Permission denied: /home/other"),  # an atomic write's temp file: the folder it was in
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
     "no space left on the device; free some space and run the same command again"),
    (SafetensorError("I/O error: No space left on device (os error 28)"),
     "no space left on the device; free some space and run the same command again"),
])
def test_environment_errors_are_worded(error, expected):
    """What the CLI prints for a disk or permission error no check before it worded."""
    assert str(environment_error(error)) == expected


def test_other_os_errors_are_not_the_environment():
    """A missing file or a bad descriptor may be moorelm's own bug: left as a traceback."""
    for error in (OSError(errno.ENOENT, "No such file or directory", "x"),
                  OSError(errno.EBADF, "Bad file descriptor"), ValueError("x")):
        assert environment_error(error) is None


def test_check_writable_judges_the_nearest_existing_folder(tmp_path, monkeypatch):
    """A path to be written later (maybe under folders not made yet) is refused when the
    nearest folder that exists cannot be written; elsewhere it passes."""
    from moorelm.atomic import check_writable

    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: os.fspath(p) != os.fspath(locked)
                        and real(p, mode, **kw))
    check_writable(tmp_path / "fine" / "deeper" / "out.json")
    check_writable(tmp_path)
    for target in (locked, locked / "out.json", locked / "a" / "b"):
        with pytest.raises(MoorelmError, match=f"cannot write in {locked} "):
            check_writable(target)
