"""Token shards: prepare a corpus once, then sample training windows from memory maps.

``prepare()`` turns a corpus into a dataset folder::

    DATA/
      manifest.json     tokenizer kind, vocab size, dtype, shards and token/byte counts per
                        split, and the source fingerprint (reuse check)
      tokenizer.json    trained on the corpus
      train-00000.bin   flat token ids (uint16 when the vocab fits, else uint32), documents
      val-00000.bin     separated by the end-of-text token

The split is by document (every k-th document goes to val, k = round(1/val_frac)) when the
corpus has enough documents, else by position (the last val_frac of the tokens).

``TokenData`` opens the shards with ``np.memmap``, so corpora larger than RAM work, and draws
windows with a random generator keyed by (seed, step): the batch of a step is a pure function
of the step, which makes resume exact and lets data-parallel ranks take disjoint slices of the
same global batch.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from moorelm.corpus import Corpus, load_corpus
from moorelm.errors import MoorelmError
from moorelm.tokenizer import Tokenizer

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SHARD_TOKENS = 1 << 26  # 64M tokens per shard file
EVAL_SEED = 20240601  # eval windows are the same for every run on a dataset
TOKENIZER_SAMPLE_CHARS = 200_000_000  # train the tokenizer on at most this much text


@dataclass(frozen=True)
class PrepareOptions:
    tokenizer: str = "char"  # char | bpe
    vocab_size: int = 4096  # bpe only
    val_frac: float = 0.1

    def key(self) -> dict:
        d = {"tokenizer": self.tokenizer, "val_frac": self.val_frac}
        if self.tokenizer == "bpe":
            d["vocab_size"] = self.vocab_size
        return d


def _dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _fingerprint(corpus: Corpus, opts: PrepareOptions) -> str:
    return f"{corpus.fingerprint}-{json.dumps(opts.key(), sort_keys=True)}"


class _ShardWriter:
    """Appends token ids to numbered shard files of one split."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self._f = None
        self._n = 0

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._f = open(self.folder / name, "wb")
        self.shards.append({"file": name, "tokens": 0})
        self._n = 0

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self._f is None or self._n >= self.shard_tokens:
                self.close()
                self._open()
            take = min(len(ids), self.shard_tokens - self._n)
            self._f.write(ids[:take].astype(self.dtype, copy=False).tobytes())
            self._n += take
            self.shards[-1]["tokens"] += take
            ids = ids[take:]

    def close(self) -> None:
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self._f = None

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards)


def prepare(
    corpus: Corpus | str | None,
    out_dir: str | Path,
    options: PrepareOptions = PrepareOptions(),
    *,
    progress: bool = True,
    shard_tokens: int = SHARD_TOKENS,
) -> Path:
    """Tokenize ``corpus`` into ``out_dir``; returns the folder. Reuses a matching one."""
    if not isinstance(corpus, Corpus):
        corpus = load_corpus(corpus)
    if not 0.0 < options.val_frac < 0.5:
        raise MoorelmError(f"val fraction must be in (0, 0.5), got {options.val_frac}")
    out = Path(out_dir)
    fp = _fingerprint(corpus, options)
    existing = read_manifest(out, missing_ok=True)
    if existing is not None and existing.get("fingerprint") == fp:
        return out

    # Build in a temp folder next to the target, then swap it in: a killed prepare never
    # leaves a half-written dataset that looks complete.
    tmp = out.with_name(out.name + ".preparing")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    def sample_text() -> Iterator[str]:
        seen = 0
        for chunk in corpus.iter_text():
            yield chunk
            seen += len(chunk)
            if seen >= TOKENIZER_SAMPLE_CHARS:
                return

    tok = Tokenizer.train(sample_text(), options.tokenizer, options.vocab_size)
    tok.save(tmp / "tokenizer.json")
    dtype = _dtype_for(tok.vocab_size)
    writers = {s: _ShardWriter(tmp, s, dtype, shard_tokens) for s in ("train", "val")}
    nbytes = {"train": 0, "val": 0}
    k = max(2, round(1 / options.val_frac))
    eot = np.array([tok.eot_id], dtype=np.int64)
    bar = tqdm(total=corpus.approx_bytes(), unit="B", unit_scale=True, desc="tokenizing",
               disable=not progress, leave=False)
    for i, doc in enumerate(corpus.documents):
        split = "val" if (not corpus.positional_split and i % k == k - 1) else "train"
        for ids, nb in _encode_chunks(tok, doc.chunks()):
            writers[split].write(np.asarray(ids, dtype=np.int64))
            nbytes[split] += nb
            bar.update(nb)
        writers[split].write(eot)
    bar.close()
    for w in writers.values():
        w.close()

    if corpus.positional_split or writers["val"].tokens == 0:
        _move_tail_to_val(tmp, writers, nbytes, options.val_frac, dtype, tok)

    manifest = {
        "format": FORMAT_VERSION,
        "fingerprint": fp,
        "corpus": corpus.description,
        "documents": len(corpus.documents),
        "split": "position" if corpus.positional_split else f"document (every {k}th to val)",
        "tokenizer": options.tokenizer,
        "vocab_size": tok.vocab_size,
        "dtype": dtype.name,
        "splits": {
            s: {"tokens": w.tokens, "bytes": nbytes[s], "shards": w.shards}
            for s, w in writers.items()
        },
    }
    from moorelm.atomic import atomic_write_text

    atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _encode_chunks(tok: Tokenizer, chunks: Iterator[str]) -> Iterator[tuple[list[int], int]]:
    """(ids, utf-8 bytes) per group of chunks, encoded in batches."""
    group: list[str] = []
    size = 0
    for chunk in chunks:
        group.append(chunk)
        size += len(chunk)
        if size >= 1 << 22:
            yield _encode_group(tok, group)
            group, size = [], 0
    if group:
        yield _encode_group(tok, group)


def _encode_group(tok: Tokenizer, group: list[str]) -> tuple[list[int], int]:
    ids: list[int] = []
    for piece in tok.iter_encode(group):
        ids.extend(piece)
    return ids, sum(len(c.encode("utf-8")) for c in group)


def _move_tail_to_val(folder: Path, writers: dict, nbytes: dict, val_frac: float,
                      dtype: np.dtype, tok: Tokenizer) -> None:
    """Positional split: the last val_frac of the train tokens become the val split."""
    train = writers["train"]
    total = train.tokens
    n_val = int(total * val_frac)
    if n_val == 0:
        return
    keep = total - n_val
    tail_parts = []
    pos = 0
    new_shards = []
    for s in train.shards:
        path = folder / s["file"]
        n = s["tokens"]
        if pos + n <= keep:
            new_shards.append(s)
        else:
            arr = np.fromfile(path, dtype=dtype)
            cut = max(0, keep - pos)
            tail_parts.append(arr[cut:].copy())
            if cut:
                with open(path, "r+b") as f:
                    f.truncate(cut * dtype.itemsize)
                new_shards.append({"file": s["file"], "tokens": cut})
            else:
                path.unlink()
        pos += n
    tail = np.concatenate(tail_parts)
    train.shards[:] = new_shards
    tail_bytes = tok.token_bytes(tail.tolist())
    nbytes["train"] -= tail_bytes
    writers["val"].write(tail.astype(np.int64))
    writers["val"].close()
    nbytes["val"] += tail_bytes


def read_manifest(folder: str | Path, missing_ok: bool = False) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.exists():
        if missing_ok:
            return None
        raise MoorelmError(f"{folder} is not a prepared dataset (no {MANIFEST}); run 'moorelm prepare'")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise MoorelmError(f"{path} is corrupt; delete {folder} and prepare again") from None
    if m.get("format") != FORMAT_VERSION:
        raise MoorelmError(f"{folder} was prepared by another moorelm version; prepare it again")
    return m


def default_data_dir(corpus: Corpus, options: PrepareOptions) -> Path:
    """Where ``train`` caches a dataset it prepares on the fly ($MOORELM_CACHE or ~/.cache)."""
    root = Path(os.environ.get("MOORELM_CACHE", Path.home() / ".cache" / "moorelm"))
    key = corpus.fingerprint + "-" + options.tokenizer
    if options.tokenizer == "bpe":
        key += str(options.vocab_size)
    key += f"-v{options.val_frac:g}"
    return root / "data" / key


class TokenData:
    """Memory-mapped token shards of a prepared dataset, with window sampling."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.dtype = np.dtype(self.manifest["dtype"])
        self.tokenizer_path = self.folder / "tokenizer.json"
        self.vocab_size = int(self.manifest["vocab_size"])
        self._maps: dict[str, list[np.ndarray]] = {}
        for split in ("train", "val"):
            arrs = []
            for s in self.manifest["splits"][split]["shards"]:
                path = self.folder / s["file"]
                if not path.exists() or path.stat().st_size != s["tokens"] * self.dtype.itemsize:
                    raise MoorelmError(f"{path} is missing or truncated; prepare the dataset again")
                if s["tokens"]:
                    arrs.append(np.memmap(path, dtype=self.dtype, mode="r"))
            self._maps[split] = arrs

    def tokens(self, split: str) -> int:
        return int(self.manifest["splits"][split]["tokens"])

    def bytes_per_token(self, split: str = "val") -> float:
        s = self.manifest["splits"][split]
        return s["bytes"] / max(1, s["tokens"])

    def check_fits(self, seq_len: int) -> None:
        for split in ("train", "val"):
            longest = max((len(a) for a in self._maps[split]), default=0)
            if longest < seq_len + 1:
                raise MoorelmError(
                    f"corpus too small: the {split} split has {self.tokens(split)} tokens but a "
                    f"context window needs {seq_len + 1}; use a bigger corpus or a smaller --seq-len"
                )

    def _windows(self, split: str, rng: np.random.Generator, n: int, seq_len: int) -> np.ndarray:
        arrs = self._maps[split]
        valid = np.array([max(0, len(a) - seq_len) for a in arrs], dtype=np.int64)
        cum = np.cumsum(valid)
        flat = rng.integers(0, cum[-1], size=n)
        shard = np.searchsorted(cum, flat, side="right")
        start = flat - np.concatenate([[0], cum[:-1]])[shard]
        out = np.empty((n, seq_len + 1), dtype=np.int64)
        for i in range(n):
            out[i] = arrs[shard[i]][start[i] : start[i] + seq_len + 1]
        return out

    def train_batch(self, step: int, seed: int, global_batch: int, seq_len: int,
                    part: int = 0, parts: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Part ``part`` of ``parts`` equal slices of the global batch of ``step``."""
        rng = np.random.default_rng([seed, step])
        w = self._windows("train", rng, global_batch, seq_len)
        per = global_batch // parts
        w = w[part * per : (part + 1) * per]
        t = torch.from_numpy(w)
        return t[:, :-1], t[:, 1:]  # idx, targets: (B, T) each

    def val_batch(self, i: int, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([EVAL_SEED, i])
        t = torch.from_numpy(self._windows("val", rng, batch_size, seq_len))
        return t[:, :-1], t[:, 1:]


def bits_per_byte(loss_nats: float, bytes_per_token: float) -> float:
    return loss_nats / math.log(2) / bytes_per_token
