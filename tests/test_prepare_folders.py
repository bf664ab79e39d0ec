"""prepare writes only where it may: it never deletes files it did not write."""

from __future__ import annotations

import errno
import os

import pytest

import moorelm.data as data
from moorelm.cli import main
from moorelm.data import PrepareOptions, TokenData, prepare, read_manifest
from moorelm.errors import MoorelmError


def _snapshot(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>"
            for p in sorted(folder.rglob("*"))}


def _user_folder(tmp_path, name="mine"):
    folder = tmp_path / name
    (folder / "sub").mkdir(parents=True)
    (folder / "thesis.txt").write_text("years of work\n")
    (folder / "sub" / "notes.md").write_text("more\n")
    return folder


def test_a_folder_of_user_files_survives(small_corpus, tmp_path, capsys):
    """--out naming a non-empty folder that is not a dataset is refused in one line, and
    every file in it is still there afterwards (it used to be deleted at the end)."""
    folder = _user_folder(tmp_path)
    before = _snapshot(folder)
    assert main(["prepare", "--corpus", str(small_corpus), "--out", str(folder), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("moorelm: error: ") and "not empty" in err
    assert _snapshot(folder) == before


def test_dot_dot_does_not_wipe_the_parent(small_corpus, tmp_path):
    """--out X/sub/.. is X: refused because X holds the user's files, and X is untouched
    (the path used to be taken apart as name '..' and X deleted)."""
    folder = _user_folder(tmp_path)
    before = _snapshot(folder)
    with pytest.raises(MoorelmError, match="not empty"):
        prepare(small_corpus, f"{folder}/sub/..", progress=False)
    assert _snapshot(folder) == before
    assert not (folder / "sub" / "...preparing").exists()


def test_train_data_folder_of_user_files_survives(small_corpus, tmp_path, capsys):
    """train --corpus C --data DIR prepares into DIR: the same refusal protects DIR."""
    folder = _user_folder(tmp_path)
    before = _snapshot(folder)
    assert main(["train", "--corpus", str(small_corpus), "--data", str(folder), "--preset",
                 "tiny", "--max-steps", "1", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert _snapshot(folder) == before


def test_a_dataset_with_foreign_files_is_not_replaced(small_corpus, tmp_path):
    """A dataset folder to which the user added a file is not replaced by a different
    dataset (that would delete the file); the same dataset is still reused."""
    out = tmp_path / "data"
    prepare(small_corpus, out, progress=False)
    (out / "README.txt").write_text("what this data is\n")
    assert prepare(small_corpus, out, progress=False) == out  # same data: reused, untouched
    with pytest.raises(MoorelmError, match="did not write .README.txt"):
        prepare(small_corpus, out, PrepareOptions(val_frac=0.2), progress=False)
    assert (out / "README.txt").read_text() == "what this data is\n"
    assert read_manifest(out)["fingerprint"] == data.dataset_fingerprint(
        data.load_corpus(str(small_corpus)))


def test_an_old_dataset_and_an_empty_folder_are_replaced(small_corpus, tmp_path):
    """What moorelm wrote it may replace: an empty folder, or a dataset of other options
    (its shards and manifest are swapped for the new ones, nothing left over)."""
    out = tmp_path / "data"
    out.mkdir()
    prepare(small_corpus, out, progress=False)
    prepare(small_corpus, out, PrepareOptions(tokenizer="bpe", vocab_size=300), progress=False)
    assert read_manifest(out)["tokenizer"] == "bpe"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "data.lock", "small.txt"]
    TokenData(out)


def test_a_user_folder_named_like_the_temp_folder_survives(small_corpus, tmp_path):
    """DATA.preparing is moorelm's temp folder only when it holds moorelm's files: a user
    folder of that name is refused, not deleted."""
    tmp = tmp_path / "data.preparing"
    tmp.mkdir()
    (tmp / "keep.txt").write_text("x")
    with pytest.raises(MoorelmError, match="keep.txt"):
        prepare(small_corpus, tmp_path / "data", progress=False)
    assert (tmp / "keep.txt").read_text() == "x"


def test_out_is_a_regular_file(small_corpus, tmp_path, capsys):
    """--out naming a file is one line, and the file is unchanged."""
    f = tmp_path / "file.bin"
    f.write_bytes(b"user data")
    assert main(["prepare", "--corpus", str(small_corpus), "--out", str(f), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file" in err
    assert f.read_bytes() == b"user data"


def test_full_disk_is_one_line_and_keeps_the_old_dataset(small_corpus, tmp_path, monkeypatch,
                                                        capsys):
    """ENOSPC while writing shards: one line naming the cause, and the dataset already in
    --out is left whole (the new one was being built in the temp folder)."""
    out = tmp_path / "data"
    prepare(small_corpus, out, progress=False)
    before = _snapshot(out)

    def full(self, ids):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(data._ShardWriter, "write", full)
    assert main(["prepare", "--corpus", str(small_corpus), "--out", str(out), "--quiet",
                 "--val-frac", "0.2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no space left" in err
    assert _snapshot(out) == before
    TokenData(out)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["splits"]["train"]["shards"][0].update(file="../../secret.bin"), "shard entry"),
    (lambda m: m.update(dtype="float64"), "dtype"),
    (lambda m: m.update(vocab_size="322"), "vocab_size"),
    (lambda m: m["splits"].pop("val"), "split 'val'"),
    (lambda m: m["splits"]["train"].update(tokens=-1), "split 'train'"),
])
def test_a_tampered_manifest_is_one_line(small_corpus, tmp_path, edit, message):
    """TokenData never opens a file a manifest names outside its folder, and fields of the
    wrong type or range are refused in one line (they were tracebacks from numpy)."""
    import json

    out = prepare(small_corpus, tmp_path / "data", progress=False)
    (tmp_path / "secret.bin").write_bytes(b"\0" * 4096)
    m = json.loads((out / "manifest.json").read_text())
    edit(m)
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(MoorelmError, match=message):
        TokenData(out)


def test_a_finished_temp_folder_is_moved_into_place(small_corpus, tmp_path, monkeypatch):
    """Killed after the dataset was complete but before the swap, a rerun moves the finished
    temp folder into place (no retokenizing) and the result equals an uninterrupted one."""
    ref = prepare(small_corpus, tmp_path / "ref", progress=False)
    real = data._swap_in

    def killed(tmp, out):
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "_swap_in", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare(small_corpus, tmp_path / "data", progress=False)
    assert (tmp_path / "data.preparing" / "manifest.json").exists()
    monkeypatch.setattr(data, "_swap_in", real)
    monkeypatch.setattr(data, "_tokenize", None)  # would fail if called
    out = prepare(small_corpus, tmp_path / "data", progress=False)
    assert _snapshot(out) == _snapshot(ref)
    assert not (tmp_path / "data.preparing").exists()
