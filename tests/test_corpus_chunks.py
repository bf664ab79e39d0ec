"""Corpus text is read in bounded chunks whatever its line structure, and chunking does not
change the token ids."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import moorelm.corpus as corpus_mod
from moorelm.corpus import load_corpus
from moorelm.data import TokenData, prepare
from moorelm.errors import MoorelmError
from moorelm.tokenizer import Tokenizer

from .conftest import SMALL_TEXT

WORDS = "Thou art more lovely and more temperate,  rough winds\tdo shake the buds of May; "


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(corpus_mod, "CHUNK_CHARS", 64)
    monkeypatch.setattr(corpus_mod, "LINE_CHARS", 64)


def _ids(tok: Tokenizer, chunks) -> list[int]:
    return [i for c in chunks for i in tok.encode(c)]


@pytest.mark.parametrize("gz", [False, True])
def test_one_long_line_is_cut_into_bounded_chunks(tmp_path, small_chunks, gz):
    """A file (or .gz) with no newline comes back in chunks of at most a few CHUNK_CHARS,
    each but the last ending just before whitespace, and together they are the file."""
    text = WORDS * 40 + "x" * 500 + WORDS * 3
    path = tmp_path / ("one.txt.gz" if gz else "one.txt")
    path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
    chunks = list(load_corpus(path).documents[0].chunks())
    assert "".join(chunks) == text
    assert len(chunks) > 10 and max(map(len, chunks)) <= 4 * 64 + 500
    assert all(c[-1:].strip() and n[:1].isspace() for c, n in zip(chunks, chunks[1:])
               if "x" * 64 not in c + n)


def test_short_lines_still_end_chunks_at_line_breaks(tmp_path, small_chunks):
    """Ordinary text (lines shorter than LINE_CHARS) is chunked at line ends, as before."""
    path = tmp_path / "lines.txt"
    path.write_text(SMALL_TEXT, encoding="utf-8")
    chunks = list(load_corpus(path).documents[0].chunks())
    assert "".join(chunks) == SMALL_TEXT and len(chunks) > 10
    assert all(c.endswith("\n") for c in chunks)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_cuts_do_not_change_token_ids(tmp_path, small_chunks, kind):
    """The ids of a long line read in chunks equal the ids of the whole line, for both
    tokenizers; the same holds for a long JSONL row."""
    text = (WORDS + "  \n ") * 30 + WORDS * 30
    tok = Tokenizer.train(iter([text, SMALL_TEXT]), kind, 300)
    path = tmp_path / "one.txt"
    path.write_text(text, encoding="utf-8")
    chunks = list(load_corpus(path).documents[0].chunks())
    assert len(chunks) > 10
    assert _ids(tok, chunks) == tok.encode(text)
    jl = tmp_path / "rows.jsonl"
    jl.write_text(json.dumps({"text": text}) + "\n" + json.dumps({"text": "b"}) + "\n")
    row = list(load_corpus(jl).documents[0].chunks())
    assert len(row) > 10 and "".join(row) == text and _ids(tok, row) == tok.encode(text)


def test_prepared_long_line_matches_the_whole_line(tmp_path, small_chunks):
    """prepare of a one-line file gives the ids of encoding the line at once."""
    text = WORDS * 60
    path = tmp_path / "one.txt"
    path.write_text(text, encoding="utf-8")
    out = prepare(path, tmp_path / "data", progress=False)
    data = TokenData(out)
    tok = Tokenizer.load(out / "tokenizer.json")
    got = np.concatenate([np.asarray(a) for s in ("train", "val") for a in data._maps[s]])
    assert got.tolist() == tok.encode(text) + [tok.eot_id]


def test_jsonl_rows_are_bounded_and_checked(tmp_path, monkeypatch):
    """A JSONL row past MAX_ROW_BYTES (e.g. a file with no newline) is refused before being
    read whole; deep nesting and lone surrogates are one line naming the row."""
    p = tmp_path / "x.jsonl"
    p.write_text('{"text": "ok"}\n' + json.dumps({"text": "y" * 500}), encoding="utf-8")
    monkeypatch.setattr(corpus_mod, "MAX_ROW_BYTES", 100)
    with pytest.raises(MoorelmError, match="x.jsonl:2 is a row of more than 100 bytes"):
        load_corpus(p)
    monkeypatch.undo()
    p.write_text('{"text": "ok"}\n' + "[" * 100_000 + "\n", encoding="utf-8")
    with pytest.raises(MoorelmError, match="x.jsonl:2 nests JSON too deeply"):
        load_corpus(p)
    p.write_text('{"text": "ok"}\n{"text": "a\\ud800b"}\n', encoding="utf-8")
    with pytest.raises(MoorelmError, match="x.jsonl:2: field 'text' holds a lone surrogate"):
        load_corpus(p)


MEMORY = textwrap.dedent("""
    import gzip, resource, sys
    from moorelm.corpus import load_corpus
    words = "Thou art more lovely and more temperate, rough winds do shake the buds of May "
    peaks, longest = [], 0
    for i, mib in enumerate((1, 4, 16)):  # one line each, no newline at all
        path = f"{sys.argv[1]}/line{i}.txt.gz"
        with gzip.open(path, "wt", compresslevel=1) as f:
            for _ in range(mib * 16):  # written in 64 KiB pieces, never whole
                f.write(words * (2**16 // len(words)))
        for chunk in load_corpus(path).iter_text():
            longest = max(longest, len(chunk))
        peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(peaks[1], peaks[2], longest)
""")


def test_memory_of_one_huge_line_is_bounded(tmp_path):
    """Reading a .gz holding one 16 MiB line (no newline) costs about the same peak memory
    as a 4 MiB one: the line is never held whole (it used to be, 288 MiB reached 7.9 GB)."""
    proc = subprocess.run([sys.executable, "-c", MEMORY, str(tmp_path)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    small, big, longest = map(float, proc.stdout.split())
    assert longest <= 4 * corpus_mod.CHUNK_CHARS
    assert big - small < 12, (small, big)  # MB; the whole line would add ~48 MB (str + copy)
