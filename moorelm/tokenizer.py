"""Tokenizers: character-level and byte-level BPE behind one interface.

Both are Hugging Face ``tokenizers`` objects, saved as ``tokenizer.json`` and loadable with
``tokenizers.Tokenizer.from_file``. Both are lossless for any UTF-8 text:

- **char**: one token per character seen in the training text, plus 256 byte tokens
  (``<0x00>`` ... ``<0xFF>``) as a fallback, so characters never seen in training (emoji, CJK,
  control characters) still encode, as their UTF-8 bytes, and decode back exactly.
- **bpe**: byte-level BPE (GPT-2 style) trained on the corpus; every byte is in the base
  alphabet, so nothing is ever unknown.

Token id 0 is the end-of-text special token ``<|endoftext|>``, which separates documents.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from moorelm.errors import MoorelmError, first_line
from moorelm.jsonfile import lone_surrogate_at

EOT = "<|endoftext|>"
KINDS = ("char", "bpe")
ENCODE_BATCH = 256  # texts per encode_batch call (the Rust side parallelises across them)
PIECE_CHARS = 16384  # long texts are cut into pieces at line breaks before batching


def check_unicode(text: str, what: str = "the text") -> None:
    """MoorelmError unless ``text`` can be written as UTF-8: a lone surrogate
    (``jsonfile.lone_surrogate_at``) has no bytes, so no token stands for it. ``encode`` calls
    it only when encoding failed; the command line calls it on a flag's text before using it."""
    at = lone_surrogate_at(text) if isinstance(text, str) else None
    if at is not None:
        raise MoorelmError(f"{what} is not valid Unicode: character {at} is a lone surrogate "
                           f"(U+{ord(text[at]):04X}; from bytes that are not UTF-8?)")


class Tokenizer:
    """A thin wrapper that knows its kind and end-of-text id."""

    def __init__(self, hf: HFTokenizer, kind: str):
        self.hf = hf
        self.kind = kind
        eot = hf.token_to_id(EOT)
        if eot is None:
            raise MoorelmError(f"tokenizer has no {EOT} token; it was not made by moorelm")
        self.eot_id = eot
        self._lut = self._char_table() if kind == "char" else None
        self._specials = {t.content for t in hf.get_added_tokens_decoder().values()}

    def _char_table(self) -> np.ndarray:
        """Code point -> id for the char tokenizer's single-character tokens (-1: not in vocab).

        Encoding through this table gives exactly the ids of the HF tokenizer (no merges, one
        token per character) at numpy speed; pieces with an unseen character take the HF path
        for the byte fallback."""
        singles = {t: i for t, i in self.hf.get_vocab().items() if len(t) == 1}
        lut = np.full(max(map(ord, singles), default=0) + 1, -1, dtype=np.int64)
        for t, i in singles.items():
            lut[ord(t)] = i
        return lut

    def _fast_char(self, text: str) -> list[int] | None:
        cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        if len(cps) == 0:
            return []
        if int(cps.max()) >= len(self._lut):
            return None
        ids = self._lut[cps]
        return None if (ids < 0).any() else ids.tolist()

    # -- training

    @classmethod
    def train(cls, texts: Iterable[str], kind: str = "char", vocab_size: int = 4096) -> Tokenizer:
        if kind == "char":
            return cls._train_char(texts)
        if kind == "bpe":
            return cls._train_bpe(texts, vocab_size)
        raise MoorelmError(f"tokenizer {kind!r} is not valid; choose one of: {', '.join(KINDS)}")

    @classmethod
    def _train_char(cls, texts: Iterable[str]) -> Tokenizer:
        chars: set[str] = set()
        for t in texts:
            chars.update(t)
        vocab = {EOT: 0}
        for b in range(256):
            vocab[f"<0x{b:02X}>"] = len(vocab)
        for c in sorted(chars):
            vocab.setdefault(c, len(vocab))
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, fuse_unk=False))
        # split on single whitespace characters, keeping them, so the model sees short words
        # (fast) and no character is dropped
        hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s"), behavior="isolated")
        hf.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
        hf.add_special_tokens([EOT])
        return cls(hf, "char")

    @classmethod
    def _train_bpe(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        if vocab_size < 257 + 1:
            raise MoorelmError(f"BPE vocab size must be at least 258 (256 bytes + specials), got {vocab_size}")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(_pieces(texts), trainer=trainer)
        return cls(hf, "bpe")

    # -- persistence

    def save(self, path: str | Path) -> None:
        from moorelm.atomic import atomic_write_text

        atomic_write_text(Path(path), self.to_json())

    def to_json(self) -> str:
        return self.hf.to_str(pretty=True)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exceptions for bad files
            raise MoorelmError(f"cannot load tokenizer {path}: {first_line(e)}") from None
        return cls(hf, cls.kind_of(hf))

    @staticmethod
    def kind_of(hf: HFTokenizer) -> str:
        """'char' for moorelm's character tokenizer (BPE with byte fallback, no merges, split
        on single whitespace characters), 'bpe' for every other vocabulary: byte-level BPE
        and imported ones (SentencePiece, Llama 3, Qwen2), which must be encoded by their own
        rules, never one character per token."""
        model = hf.model
        if (isinstance(model, models.BPE) and model.byte_fallback
                and isinstance(hf.pre_tokenizer, pre_tokenizers.Split)):
            return "char"
        return "bpe"

    # -- use

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        try:
            return self._encode(text)
        except (UnicodeEncodeError, TypeError):
            check_unicode(text)
            raise

    def _encode(self, text: str) -> list[int]:
        if self._lut is not None:
            fast = self._fast_char(text)
            if fast is not None:
                return fast
        if len(text) <= PIECE_CHARS:
            return self.hf.encode(text, add_special_tokens=False).ids
        ids: list[int] = []
        for enc in self.hf.encode_batch(list(_split_long(text)), add_special_tokens=False):
            ids.extend(enc.ids)
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._lut is not None:
            return [self.encode(t) for t in texts]
        try:
            return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]
        except TypeError:
            for t in texts:
                check_unicode(t)
            raise

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def iter_encode(self, chunks: Iterable[str]) -> Iterator[list[int]]:
        """Encode a stream of text chunks in batches; yields token lists in order.

        Corpus chunks end at line breaks; see ``_split_long`` for why such cuts are safe.
        """
        batch: list[str] = []
        for chunk in chunks:
            batch.extend(_split_long(chunk))
            if len(batch) >= ENCODE_BATCH:
                yield from self.encode_batch(batch)
                batch = []
        if batch:
            yield from self.encode_batch(batch)

    def piece_bytes(self, token_id: int) -> bytes:
        """The exact bytes token ``token_id`` stands for in decoded text.

        A byte-level BPE token: the bytes its characters spell (GPT-2's byte alphabet); a
        byte-fallback token ``<0xNN>``: its one byte, even when that is only part of a
        character; any other token, special ones included: its text in UTF-8. An id
        outside the vocabulary stands for no bytes.
        """
        piece = self.hf.id_to_token(int(token_id))
        if piece is None:
            return b""
        if self.kind == "bpe" and piece not in self._specials:
            try:
                return bytes(_BYTE_OF_CHAR[c] for c in piece)
            except KeyError:  # not spelled in the byte alphabet (an imported vocabulary)
                pass
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        return self.decode([token_id]).encode("utf-8")


def byte_level_alphabet() -> dict[int, str]:
    """Byte-level BPE (GPT-2) spells each byte as one printable character: printable
    Latin-1 bytes as themselves, the others as the characters from U+0100 on, in byte order.
    -> byte -> character."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


_BYTE_OF_CHAR = {c: b for b, c in byte_level_alphabet().items()}  # character -> byte


def _split_long(text: str) -> Iterator[str]:
    """Cut text into pieces of at most ~PIECE_CHARS at a lone newline (non-space both sides).

    Cutting there leaves byte-level BPE's pre-tokenization unchanged (a lone newline is its own
    pre-token), so encoding the pieces gives the same ids as encoding the whole text.
    """
    start = 0
    n = len(text)
    while n - start > PIECE_CHARS:
        lo, cut = start + PIECE_CHARS // 4, start + PIECE_CHARS
        while True:
            cut = text.rfind("\n", lo, cut)
            if cut == -1 or (not text[cut - 1].isspace() and cut + 1 < n and not text[cut + 1].isspace()):
                break
        if cut == -1:  # no clean boundary (one giant line): a hard cut, rarely differs
            cut = start + PIECE_CHARS - 1
        yield text[start : cut + 1]
        start = cut + 1
    if start < n:
        yield text[start:]


def _pieces(texts: Iterable[str]) -> Iterator[str]:
    for t in texts:
        yield from _split_long(t)
