"""Streaming prepare: parallel workers, resume after a kill, bounded memory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import moorelm.corpus as corpus_mod
import moorelm.data as data
from moorelm.cli import main
from moorelm.corpus import load_corpus
from moorelm.data import PrepareOptions, TokenData, prepare, read_manifest
from moorelm.tokenizer import Tokenizer

from .conftest import SMALL_TEXT


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _docs(tmp_path: Path, n: int = 24) -> Path:
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(n):
        (folder / f"{i:02d}.txt").write_text(SMALL_TEXT[: 300 + 41 * i] + "café 😀\n", encoding="utf-8")
    return folder


@pytest.mark.parametrize("kind, source", [("bpe", "docs"), ("char", "file")])
def test_workers_write_identical_datasets(tmp_path, monkeypatch, kind, source):
    """Two workers write byte-identical shards and manifest to one worker's, for a document
    split (folder) and a positional split (one file), across many small tasks and shards,
    also when the parent has used the tokenizers thread pool before forking (which once hung
    the workers)."""
    monkeypatch.setattr(data, "TASK_CHARS", 1500)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    if source == "docs":
        corpus = load_corpus(_docs(tmp_path))
    else:
        (tmp_path / "one.txt").write_text(SMALL_TEXT * 3, encoding="utf-8")
        corpus = load_corpus(tmp_path / "one.txt")
    opts = PrepareOptions(tokenizer=kind, vocab_size=300)
    one = prepare(corpus, tmp_path / "one", opts, progress=False, shard_tokens=2000, workers=1)
    two = prepare(corpus, tmp_path / "two", opts, progress=False, shard_tokens=2000, workers=2)
    assert _files(one) == _files(two)
    m = read_manifest(two)
    assert len(m["splits"]["train"]["shards"]) > 2 and m["splits"]["val"]["tokens"] > 0
    assert not (tmp_path / "two.preparing").exists()


# A child process that prepares with tiny tasks and progress records, and SIGKILLs itself
# (no cleanup, no flush) right after its Nth write to the named split.
KILLER = textwrap.dedent("""
    import os, signal, sys
    import moorelm.corpus as corpus, moorelm.data as data
    corpus.CHUNK_CHARS = 500
    data.TASK_CHARS, data.PROGRESS_TOKENS, data.TAIL_BLOCK = 1000, 3000, 500
    split, n = sys.argv[3], int(sys.argv[4])
    write, count = data._ShardWriter.write, [0]
    def killing_write(self, ids):
        write(self, ids)
        if self.split == split:
            count[0] += 1
            if count[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
    data._ShardWriter.write = killing_write
    data.prepare(sys.argv[1], sys.argv[2], progress=False, shard_tokens=4000)
""")


@pytest.mark.parametrize("split, nth, phase", [("train", 40, "tokenize"), ("val", 3, "tokenized")],
                         ids=["while-tokenizing", "while-splitting"])
def test_resume_after_sigkill(tmp_path, monkeypatch, split, nth, phase):
    """A prepare killed mid-way (while tokenizing, or while moving the positional tail to val)
    continues from its last progress record, without retraining the tokenizer, and ends with
    exactly the files of an uninterrupted prepare."""
    text = tmp_path / "text.txt"
    text.write_text(SMALL_TEXT * 4, encoding="utf-8")
    out = tmp_path / "data"
    proc = subprocess.run([sys.executable, "-c", KILLER, str(text), str(out), split, str(nth)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    partial = out.with_name("data.preparing")
    record = json.loads((partial / "progress.json").read_text())
    assert record["phase"] == phase and not out.exists()
    if phase == "tokenize":
        assert record["tasks_done"] > 0
    tok_mtime = (partial / "tokenizer.json").stat().st_mtime_ns

    monkeypatch.setattr(corpus_mod, "CHUNK_CHARS", 500)
    for name, value in {"TASK_CHARS": 1000, "PROGRESS_TOKENS": 3000, "TAIL_BLOCK": 500}.items():
        monkeypatch.setattr(data, name, value)
    prepare(str(text), out, progress=False, shard_tokens=4000)
    fresh = prepare(str(text), tmp_path / "fresh", progress=False, shard_tokens=4000)
    assert (out / "tokenizer.json").stat().st_mtime_ns == tok_mtime  # resumed, not restarted
    assert _files(out) == _files(fresh)
    TokenData(out).check_fits(32)


def test_given_tokenizer_and_cli_workers(tmp_path, small_corpus, capsys):
    """prepare can reuse an existing tokenizer (its identity enters the fingerprint); the CLI
    takes --workers and rejects a bad count with a one-line error."""
    tok = Tokenizer.train(["only these letters: abcdefgh"], "char")
    out = prepare(str(small_corpus), tmp_path / "given", tokenizer=tok, progress=False)
    assert Tokenizer.load(out / "tokenizer.json").to_json() == tok.to_json()
    trained = prepare(str(small_corpus), tmp_path / "trained", progress=False)
    assert read_manifest(out)["fingerprint"] != read_manifest(trained)["fingerprint"]

    assert main(["prepare", "--corpus", str(small_corpus), "--out", str(tmp_path / "cli"),
                 "--workers", "2", "--quiet"]) == 0
    assert _files(tmp_path / "cli") == _files(trained)
    assert main(["prepare", "--corpus", str(small_corpus), "--out", str(tmp_path / "x"),
                 "--workers", "0"]) == 2
    assert "--workers must be >= 1, got 0" in capsys.readouterr().err


MEMORY = textwrap.dedent("""
    import resource, sys
    import moorelm.data as data
    from moorelm.data import prepare
    data.TASK_CHARS = 1 << 20
    line = "Thou art more lovely and more temperate, rough winds do shake the buds of May\\n"
    peaks = []
    for i, lines in enumerate((20_000, 80_000, 320_000)):  # ~1.6, ~6 and ~25 MB
        path = f"{sys.argv[1]}/big{i}.txt"
        with open(path, "w") as f:
            for j in range(lines):
                f.write(f"{j} {line}")
        prepare(path, f"{sys.argv[1]}/data{i}", progress=False)
        peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(peaks[1], peaks[2])  # the first run warms the allocator up
""")


@pytest.mark.slow
def test_memory_does_not_grow_with_the_file(tmp_path):
    """Preparing a 4x larger single file (positional split) raises the peak memory by less
    than a few MB (the earlier whole-tail split needed ~200 MB more here): text is read, tokenized and written chunk by chunk, and the val tail is
    copied in blocks, so nothing scales with the corpus."""
    proc = subprocess.run([sys.executable, "-c", MEMORY, str(tmp_path)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    small, big = map(float, proc.stdout.split())
    assert big - small < 8, (small, big)  # MB
