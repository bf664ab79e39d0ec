"""Tokenizers: lossless round trips, Hugging Face compatibility, batched encoding."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer as HFTokenizer

from moorelm.errors import MoorelmError
from moorelm.tokenizer import EOT, Tokenizer, _split_long

TRAIN = ["To be, or not to be, that is the question:\n", "Whether 'tis nobler in the mind\n"] * 20
HARD = [
    "",
    "plain ascii",
    "emoji 🙂🚀 and CJK 世界, 日本語",
    "control \x00\x01\x1b[0m\t\r\n bytes",
    "accents: naïve café Ångström",
    "  leading and trailing spaces  \n\n\n",
    "\ud7ff\ue000\U0010ffff",
]


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_round_trip_any_utf8(kind):
    """encode -> decode returns the exact text for any UTF-8, including unseen characters."""
    tok = Tokenizer.train(TRAIN, kind, vocab_size=300)
    for text in HARD:
        assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_lone_surrogate_is_a_clear_error(kind):
    """Text with a lone surrogate (a non-UTF-8 byte in a command-line argument, or a JSON
    escape) has no bytes for a token to stand for: one MoorelmError naming where it is, from
    encode, encode_batch and the long-text path alike, not the tokenizers library's TypeError."""
    tok = Tokenizer.train(TRAIN, kind, vocab_size=300)
    for text in ("ab\udcff", "To be " * 2000 + "\ud800"):
        with pytest.raises(MoorelmError, match=r"character \d+ is a lone surrogate"):
            tok.encode(text)
        with pytest.raises(MoorelmError, match="lone surrogate"):
            tok.encode_batch(["fine", text])
    assert tok.decode(tok.encode("still fine")) == "still fine"


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_saved_file_loads_with_hf_tokenizers(kind, tmp_path):
    """tokenizer.json loads with tokenizers.Tokenizer.from_file and encodes identically."""
    tok = Tokenizer.train(TRAIN, kind, vocab_size=300)
    tok.save(tmp_path / "tokenizer.json")
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    text = "To be 🙂 or not"
    assert hf.encode(text).ids == tok.encode(text)
    again = Tokenizer.load(tmp_path / "tokenizer.json")
    assert again.kind == kind and again.eot_id == tok.eot_id == hf.token_to_id(EOT)


def test_char_tokenizer_is_one_token_per_seen_character():
    """Characters seen in training are single tokens; unseen ones fall back to bytes."""
    tok = Tokenizer.train(["abc"], "char")
    assert len(tok.encode("abcabc")) == 6
    assert len(tok.encode("é")) == 2  # two UTF-8 bytes


def test_batched_encoding_of_long_text_matches_whole():
    """Cutting a long text into pieces for batch encoding does not change the ids."""
    text = "".join(f"line {i} of verse\nspoken aloud, {i}\n" for i in range(3000))
    for kind in ("char", "bpe"):
        tok = Tokenizer.train([text], kind, vocab_size=400)
        assert tok.encode(text) == tok.hf.encode(text, add_special_tokens=False).ids
        pieces = list(_split_long(text))
        assert len(pieces) > 1 and "".join(pieces) == text


def test_bad_tokenizer_inputs():
    """Unknown kinds, tiny BPE vocabularies and unreadable files are clear errors."""
    with pytest.raises(MoorelmError, match="choose one of"):
        Tokenizer.train(TRAIN, "wordpiece")
    with pytest.raises(MoorelmError, match="at least"):
        Tokenizer.train(TRAIN, "bpe", vocab_size=100)
    with pytest.raises(MoorelmError, match="cannot load"):
        Tokenizer.load("/nonexistent/tokenizer.json")


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_piece_bytes_spell_the_text(kind):
    """piece_bytes gives each token's exact bytes: joined over an encoding they are the
    text's UTF-8 bytes, also where a token is only part of a character; the end-of-text
    token stands for its own text."""
    tok = Tokenizer.train(TRAIN, kind, vocab_size=300)
    for text in HARD:
        ids = tok.encode(text)
        assert b"".join(tok.piece_bytes(i) for i in ids) == text.encode("utf-8")
    if kind == "char":
        assert tok.piece_bytes(tok.hf.token_to_id("<0xF0>")) == b"\xf0"
    assert tok.piece_bytes(tok.eot_id) == EOT.encode()
    assert tok.piece_bytes(10**6) == b""
