"""A corpus folder holds what is inside it: links leading out are skipped, with a warning."""

from __future__ import annotations

import os
import warnings

import pytest

from moorelm.cli import main
from moorelm.corpus import load_corpus
from moorelm.errors import MoorelmError


def _folder(tmp_path):
    root = tmp_path / "docs"
    (root / "a").mkdir(parents=True)
    (root / "a" / "one.txt").write_text("inside one\n")
    (root / "two.txt").write_text("inside two\n")
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "passwd.txt").write_text("root:x:0:0\n")
    os.symlink(secret / "passwd.txt", root / "passwd.txt")  # a file link leading out
    os.symlink(secret, root / "out")  # a folder link leading out
    os.symlink(root / "two.txt", root / "a" / "again.txt")  # a file link that stays inside
    os.symlink(root, root / "a" / "loop")  # a loop: never descended
    return root


def test_links_out_of_the_corpus_root_are_skipped(tmp_path):
    """Files reached through links that leave the root are not read; links inside it are;
    one warning names what was skipped."""
    root = _folder(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        c = load_corpus(root)
    names = [d.name for d in c.documents]
    assert names == ["a/again.txt", "a/one.txt", "two.txt"]
    assert all("root:x" not in d.read() for d in c.documents)
    assert len(caught) == 1 and "skipped 2 link(s)" in str(caught[0].message)


def test_cli_prints_the_skip_as_one_warning_line(tmp_path, capsys):
    """On the command line the skip is one 'moorelm: warning:' line."""
    root = _folder(tmp_path)
    assert main(["corpus", "--corpus", str(root)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("moorelm: warning: skipped 2 link(s)")


def test_only_links_leading_out_means_no_files(tmp_path):
    """A folder whose only text is behind outward links is reported as having no files."""
    root = tmp_path / "docs"
    root.mkdir()
    (tmp_path / "x.txt").write_text("outside\n")
    os.symlink(tmp_path / "x.txt", root / "x.txt")
    with pytest.warns(UserWarning, match="skipped 1"), pytest.raises(MoorelmError, match="no files"):
        load_corpus(root)


def test_a_device_or_pipe_is_not_a_corpus(tmp_path):
    """--corpus naming a FIFO (or /dev/zero) is one line, without blocking on a read."""
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    with pytest.raises(MoorelmError, match="not a regular file"):
        load_corpus(fifo)
    with pytest.raises(MoorelmError, match="not a regular file"):
        load_corpus("/dev/zero")
