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

Preparing streams: documents are read in chunks, tokenized by ``workers`` processes and
written in corpus order (the same bytes for any number of workers), with memory bounded by
the task size, not the corpus. A killed prepare resumes from ``DATA.preparing/progress.json``
when run again with the same arguments.

``TokenData`` opens the shards with ``np.memmap``, so corpora larger than RAM work, and draws
windows with a random generator keyed by (seed, step): the batch of a step is a pure function
of the step, which makes resume exact and lets data-parallel ranks take disjoint slices of the
same global batch.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import multiprocessing as mp
import os
import re
import sys
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from moorelm.corpus import Corpus, load_corpus
from moorelm.errors import MoorelmError, from_os_error
from moorelm.jsonfile import read_json
from moorelm.tokenizer import PIECE_CHARS, Tokenizer

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


def _fingerprint(corpus: Corpus, opts: PrepareOptions, tokenizer: Tokenizer | None = None) -> str:
    fp = f"{corpus.fingerprint}-{json.dumps(opts.key(), sort_keys=True)}"
    if tokenizer is not None:  # a given tokenizer replaces the trained one: its identity counts
        fp += "-tok" + hashlib.sha256(tokenizer.to_json().encode("utf-8")).hexdigest()[:12]
    return fp


def dataset_fingerprint(corpus: Corpus, options: PrepareOptions = PrepareOptions()) -> str:
    """The manifest fingerprint ``prepare`` writes for this corpus and these options."""
    return _fingerprint(corpus, options)


class _ShardWriter:
    """Appends token ids to numbered shard files of one split.

    ``shards`` (from a progress record) continues an interrupted prepare: the last shard,
    already truncated to its recorded length, is appended to until it is full.
    """

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int,
                 shards: list[dict] | None = None):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.shards: list[dict] = [dict(s) for s in shards or []]
        self._f = None
        self._n = 0

    def _open(self) -> None:
        if self.shards and self.shards[-1]["tokens"] < self.shard_tokens:
            self._f = open(self.folder / self.shards[-1]["file"], "ab")
            self._n = self.shards[-1]["tokens"]
            return
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


# ----------------------------------------------------------------------------- prepare
#
# One pass over the corpus, in order: the main process reads documents and groups their
# chunks into tasks of ~TASK_CHARS characters; workers tokenize tasks; the main process
# writes the results in task order. Output is therefore byte-identical for any number of
# workers, and memory stays bounded (at most 2 tasks per worker are in flight).
#
# Resume: DATA.preparing/progress.json records, every PROGRESS_TOKENS tokens, how many tasks
# are written and each shard's length (after an fsync). A rerun truncates the shards to
# those lengths, deletes shard files it does not list, skips the finished tasks (reading,
# not tokenizing them) and carries on. Phases: tokenize -> tokenized -> split -> done.

TASK_CHARS = 1 << 22  # text per unit of work handed to a worker (~4 MB)
PROGRESS_TOKENS = 1 << 25  # tokens written between progress records
TAIL_BLOCK = 1 << 20  # tokens copied at a time when the positional split moves the tail
PROGRESS = "progress.json"
SPLITS = ("train", "val")
_TOK: Tokenizer | None = None  # the tokenizer of this (worker) process


def prepare(
    corpus: Corpus | str | None,
    out_dir: str | Path,
    options: PrepareOptions = PrepareOptions(),
    *,
    progress: bool = True,
    shard_tokens: int = SHARD_TOKENS,
    workers: int = 1,
    tokenizer: Tokenizer | None = None,
) -> Path:
    """Tokenize ``corpus`` into ``out_dir``; returns the folder. Reuses a matching one.

    ``workers`` processes tokenize in parallel (same output as one). A killed prepare picks
    up where its last progress record left off when run again with the same arguments.
    ``tokenizer`` skips training one (e.g. a run's tokenizer, to prepare new text for it).
    """
    if not isinstance(corpus, Corpus):
        corpus = load_corpus(corpus)
    if not 0.0 < options.val_frac < 0.5:
        raise MoorelmError(f"val fraction must be in (0, 0.5), got {options.val_frac}")
    if not isinstance(workers, int) or workers < 1:
        raise MoorelmError(f"workers must be an integer >= 1, got {workers}")
    out = _dataset_folder(out_dir)
    fp = _fingerprint(corpus, options, tokenizer)
    existing = read_manifest(out, missing_ok=True) if out.is_dir() else None
    if existing is not None and existing.get("fingerprint") == fp:
        return Path(out_dir)
    _check_replaceable(out)  # before the (possibly long) tokenizing, and again at the swap
    try:
        with _exclusive(out, progress):
            existing = read_manifest(out, missing_ok=True)  # another process may have made it
            if existing is not None and existing.get("fingerprint") == fp:
                return Path(out_dir)
            _prepare(corpus, out, fp, options, progress, shard_tokens, workers, tokenizer)
    except OSError as e:  # a full disk, a read-only folder: the old dataset is left as it was
        raise from_os_error(e, f"write the dataset {out}") from None
    return Path(out_dir)


# ----------------------------------------------------------------------------- the folder
#
# moorelm deletes only what it wrote. A dataset folder (and its DATA.preparing temp folder)
# holds nothing but the names below; a folder holding anything else is the user's, and
# prepare refuses to write there rather than replace it.

_OWN_NAMES = re.compile(r"(manifest\.json|tokenizer\.json|progress\.json|(train|val)-\d{5}\.bin"
                        r"|\..+\.tmp)")  # the last: atomic.py's temp files


def _dataset_folder(out_dir: str | Path) -> Path:
    """``out_dir`` as an absolute path with ``..`` and links resolved (so ``X/sub/..`` is
    ``X``, never a sibling of ``X/sub``); a file there is refused."""
    if not str(out_dir).strip():
        raise MoorelmError("the dataset folder is an empty name; give a folder to write")
    out = Path(out_dir).expanduser().resolve()
    if not out.name:
        raise MoorelmError(f"{out_dir} is the root folder; give a dataset folder to write")
    if out.exists() and not out.is_dir():
        raise MoorelmError(f"{out_dir} is a file, not a folder; give a dataset folder to write")
    return out


def _foreign(folder: Path) -> list[str]:
    """Entries of ``folder`` moorelm would not have written there (sorted)."""
    return sorted(p.name for p in folder.iterdir()
                  if not (_OWN_NAMES.fullmatch(p.name) and p.is_file() and not p.is_symlink()))


def _check_replaceable(out: Path) -> None:
    """Refuse unless ``out`` is absent, empty, or a moorelm dataset with nothing else in it."""
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / MANIFEST).is_file():
        raise MoorelmError(f"{out} is not empty and not a moorelm dataset (no {MANIFEST}); "
                           "give a new or empty folder to --out")
    read_manifest(out)  # a manifest that is not moorelm's is refused here
    foreign = _foreign(out)
    if foreign:
        raise MoorelmError(f"{out} holds files moorelm did not write ({', '.join(foreign[:3])}"
                           f"{', ...' if len(foreign) > 3 else ''}); move them or give another "
                           "folder to --out")


def _remove_own(folder: Path) -> None:
    """Delete a folder moorelm wrote, file by file; refuse if it holds anything else."""
    if not folder.exists():
        return
    foreign = _foreign(folder) if folder.is_dir() and not folder.is_symlink() else [folder.name]
    if foreign:
        raise MoorelmError(f"{folder} holds files moorelm did not write ({', '.join(foreign[:3])}"
                           "); move them or delete the folder yourself")
    for p in folder.iterdir():
        p.unlink()
    folder.rmdir()


def _swap_in(tmp: Path, out: Path) -> None:
    """Replace ``out`` (absent, empty or an old dataset) with the finished ``tmp``."""
    _check_replaceable(out)
    if out.is_dir():
        _remove_own(out)
    os.replace(tmp, out)


@contextmanager
def _exclusive(out: Path, progress: bool) -> Iterator[None]:
    """One prepare per dataset folder at a time (a lock file beside it): two processes asking
    for the same data do not write the same temp folder; the second waits, then reuses."""
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # no flock (Windows): unguarded, as before
        yield
        return
    with open(out.with_name(out.name + ".lock"), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                print(f"waiting for another process preparing {out} ...", file=sys.stderr,
                      flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _prepare(corpus: Corpus, out: Path, fp: str, options: PrepareOptions, progress: bool,
             shard_tokens: int, workers: int, tokenizer: Tokenizer | None) -> Path:
    # Build in a temp folder next to the target, then swap it in: a killed prepare never
    # leaves a half-written dataset that looks complete.
    tmp = out.with_name(out.name + ".preparing")
    if _finished(tmp, fp):  # killed between finishing the dataset and moving it into place
        (tmp / PROGRESS).unlink(missing_ok=True)
        _swap_in(tmp, out)
        return out
    state = _read_progress(tmp, fp)
    if state is None:
        _remove_own(tmp)
        tmp.mkdir(parents=True)
        tok = tokenizer or Tokenizer.train(_sample_text(corpus), options.tokenizer, options.vocab_size)
        tok.save(tmp / "tokenizer.json")
        state = {"fingerprint": fp, "phase": "tokenize", "tasks_done": 0,
                 "shards": {s: [] for s in SPLITS}, "bytes": {s: 0 for s in SPLITS}}
        _write_progress(tmp, state)
    else:
        tok = Tokenizer.load(tmp / "tokenizer.json")
    dtype = _dtype_for(tok.vocab_size)
    _restore_files(tmp, state, dtype)
    writers = {s: _ShardWriter(tmp, s, dtype, shard_tokens, state["shards"][s]) for s in SPLITS}
    k = max(2, round(1 / options.val_frac))

    if state["phase"] == "tokenize":
        _tokenize(corpus, tok, writers, state, tmp, k, workers, progress)
        state["phase"] = "tokenized"
        _write_progress(tmp, state)
    if state["phase"] == "tokenized":
        if corpus.positional_split or writers["val"].tokens == 0:
            _copy_tail_to_val(tmp, writers, state["bytes"], options.val_frac, dtype, tok)
        state["phase"] = "split"
        _record(state, writers)
        _write_progress(tmp, state)
    _restore_files(tmp, state, dtype)  # drops the train tail copied to val

    manifest = {
        "format": FORMAT_VERSION,
        "fingerprint": fp,
        "corpus": corpus.description,
        "documents": len(corpus.documents),
        "split": "position" if corpus.positional_split else f"document (every {k}th to val)",
        "tokenizer": tokenizer.kind if tokenizer else options.tokenizer,
        "vocab_size": tok.vocab_size,
        "dtype": dtype.name,
        "splits": {
            s: {"tokens": writers[s].tokens, "bytes": state["bytes"][s], "shards": writers[s].shards}
            for s in SPLITS
        },
    }
    from moorelm.atomic import atomic_write_text

    atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    (tmp / PROGRESS).unlink()
    _swap_in(tmp, out)
    return out


def _finished(tmp: Path, fp: str) -> bool:
    """Whether the temp folder holds a complete dataset of this fingerprint."""
    try:
        return tmp.is_dir() and (read_manifest(tmp, missing_ok=True) or {}).get("fingerprint") == fp
    except MoorelmError:  # not a manifest of ours: whatever it is, _remove_own judges it
        return False


def _sample_text(corpus: Corpus) -> Iterator[str]:
    """The corpus text, streamed, up to TOKENIZER_SAMPLE_CHARS (what the tokenizer learns on)."""
    seen = 0
    for chunk in corpus.iter_text():
        yield chunk
        seen += len(chunk)
        if seen >= TOKENIZER_SAMPLE_CHARS:
            return


def _read_progress(tmp: Path, fp: str) -> dict | None:
    """The progress record of an interrupted prepare of the same data, else None."""
    try:
        state = read_json(tmp / PROGRESS)
    except MoorelmError:
        return None
    if not isinstance(state, dict) or state.get("fingerprint") != fp or not (tmp / "tokenizer.json").exists():
        return None
    return state


def _record(state: dict, writers: dict[str, _ShardWriter]) -> None:
    for w in writers.values():
        w.close()  # flushed and fsynced before the record claims their lengths
        state["shards"][w.split] = [dict(s) for s in w.shards]


def _write_progress(tmp: Path, state: dict) -> None:
    from moorelm.atomic import atomic_write_text

    atomic_write_text(tmp / PROGRESS, json.dumps(state, indent=1) + "\n")


def _restore_files(tmp: Path, state: dict, dtype: np.dtype) -> None:
    """Make the shard files exactly what ``state`` records: truncate longer ones (writes
    after the last record), delete unlisted ones."""
    listed = set()
    for split in SPLITS:
        for s in state["shards"][split]:
            path = tmp / s["file"]
            size = s["tokens"] * dtype.itemsize
            if not path.exists() or path.stat().st_size < size:
                raise MoorelmError(f"{path} is shorter than its progress record says; delete "
                                   f"{tmp} and prepare again")
            if path.stat().st_size > size:
                os.truncate(path, size)
            listed.add(s["file"])
    for path in tmp.glob("*.bin"):
        if path.name not in listed:
            path.unlink()


def _tasks(corpus: Corpus, k: int) -> Iterator[list[tuple[str, str, bool]]]:
    """Lists of (split, text, ends_document) of about TASK_CHARS characters, in corpus order."""
    task: list[tuple[str, str, bool]] = []
    size = 0
    for i, doc in enumerate(corpus.documents):
        split = "val" if (not corpus.positional_split and i % k == k - 1) else "train"
        pending: str | None = None  # hold one chunk back to know which one ends the document
        for chunk in doc.chunks():
            if pending is not None:
                task.append((split, pending, False))
                size += len(pending)
                if size >= TASK_CHARS:
                    yield task
                    task, size = [], 0
            pending = chunk
        task.append((split, pending or "", True))
        size += len(pending or "")
        if size >= TASK_CHARS:
            yield task
            task, size = [], 0
    if task:
        yield task


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def _encode_task(task: list[tuple[str, str, bool]]) -> list[tuple[str, np.ndarray, int, bool]]:
    """Tokenize one task with this process's tokenizer: (split, ids, utf-8 bytes, ends_doc)."""
    tok = _TOK
    assert tok is not None
    dtype = _dtype_for(tok.vocab_size)
    texts = [t for _, t, _ in task]
    ids: list[list[int] | None] = [None] * len(texts)
    short = [i for i, t in enumerate(texts) if len(t) <= PIECE_CHARS]  # batch the short ones
    for i, r in zip(short, tok.encode_batch([texts[i] for i in short])):
        ids[i] = r
    for i, t in enumerate(texts):
        if ids[i] is None:
            ids[i] = tok.encode(t)
    return [(split, np.asarray(r, dtype=dtype), _utf8_len(t), ends)
            for (split, t, ends), r in zip(task, ids)]


def _init_worker(tokenizer_json: str, kind: str) -> None:
    global _TOK
    # A forked child has no copy of the parent's Rust thread pool: parallel encoding would wait
    # forever for it. One thread per worker process is the point of workers anyway.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer as HFTokenizer

    _TOK = Tokenizer(HFTokenizer.from_str(tokenizer_json), kind)
    if sys.platform.startswith("linux"):  # die with the parent, even if it is SIGKILLed
        try:
            import ctypes
            import signal

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def _encoded(tasks: Iterator, tok: Tokenizer, workers: int) -> Iterator[list]:
    """``_encode_task`` over ``tasks``, in order, by ``workers`` processes."""
    global _TOK
    if workers == 1:
        _TOK = tok
        for task in tasks:
            yield _encode_task(task)
        return
    methods = mp.get_all_start_methods()
    ctx = mp.get_context("fork" if "fork" in methods else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tok.to_json(), tok.kind)) as pool:
        pending: deque = deque()
        for task in tasks:
            pending.append(pool.apply_async(_encode_task, (task,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _tokenize(corpus: Corpus, tok: Tokenizer, writers: dict[str, _ShardWriter], state: dict,
              tmp: Path, k: int, workers: int, progress: bool) -> None:
    eot = np.array([tok.eot_id], dtype=np.int64)
    nbytes = state["bytes"]
    bar = tqdm(total=corpus.approx_bytes(), initial=sum(nbytes.values()), unit="B",
               unit_scale=True, desc="tokenizing", disable=not progress, leave=False)
    tasks = itertools.islice(_tasks(corpus, k), state["tasks_done"], None)
    since = 0
    try:
        for result in _encoded(tasks, tok, workers):
            for split, ids, nb, ends in result:
                writers[split].write(ids)
                if ends:
                    writers[split].write(eot)
                nbytes[split] += nb
                since += len(ids)
                bar.update(nb)
            state["tasks_done"] += 1
            if since >= PROGRESS_TOKENS:
                _record(state, writers)
                _write_progress(tmp, state)
                since = 0
    finally:
        bar.close()
    _record(state, writers)


def _copy_tail_to_val(folder: Path, writers: dict[str, _ShardWriter], nbytes: dict,
                      val_frac: float, dtype: np.dtype, tok: Tokenizer) -> None:
    """Positional split: the last val_frac of the train tokens become the val split.

    The tail is copied block by block (bounded memory); the train shard list is cut, and the
    caller truncates the files only once the new lists are recorded, so a kill in between
    leaves both the old and the new state recoverable.
    """
    train = writers["train"]
    n_val = int(train.tokens * val_frac)
    if n_val == 0:
        return
    keep = train.tokens - n_val
    byte_len = _token_byte_lengths(tok)
    tail_bytes, pos, new_shards = 0, 0, []
    for s in train.shards:
        n = s["tokens"]
        if pos + n <= keep:
            new_shards.append(s)
        else:
            cut = max(0, keep - pos)
            arr = np.memmap(folder / s["file"], dtype=dtype, mode="r")
            for b in range(cut, n, TAIL_BLOCK):
                block = np.asarray(arr[b : min(n, b + TAIL_BLOCK)])
                writers["val"].write(block)
                tail_bytes += int(byte_len[block].sum())
            del arr
            if cut:
                new_shards.append({"file": s["file"], "tokens": cut})
        pos += n
    writers["val"].close()
    train.shards[:] = new_shards
    nbytes["train"] -= tail_bytes
    nbytes["val"] += tail_bytes


def _token_byte_lengths(tok: Tokenizer) -> np.ndarray:
    """Bytes each token id stands for (``Tokenizer.piece_bytes``; special tokens: 0)."""
    lengths = np.zeros(tok.vocab_size, dtype=np.int64)
    specials = {t.content for t in tok.hf.get_added_tokens_decoder().values() if t.special}
    for text, i in tok.hf.get_vocab(with_added_tokens=True).items():
        if text not in specials:
            lengths[i] = len(tok.piece_bytes(i))
    return lengths


def read_manifest(folder: str | Path, missing_ok: bool = False) -> dict | None:
    """The manifest of the dataset folder ``folder`` (None when it has none and
    ``missing_ok``); anything that is not a manifest moorelm wrote raises ``MoorelmError``."""
    path = Path(folder) / MANIFEST
    if not os.path.lexists(path):
        if missing_ok:
            return None
        raise MoorelmError(f"{folder} is not a prepared dataset (no {MANIFEST}); run 'moorelm prepare'")
    try:
        m = read_json(path)
    except MoorelmError as e:
        raise MoorelmError(f"{e}; delete {folder} and prepare again") from None
    if not isinstance(m, dict) or not isinstance(m.get("splits"), dict) or "fingerprint" not in m:
        raise MoorelmError(f"{path} is not a moorelm dataset manifest; prepare the dataset again")
    if m.get("format") != FORMAT_VERSION:
        raise MoorelmError(f"{folder} was prepared by another moorelm version; prepare it again")
    problem = _manifest_problem(m)
    if problem:
        raise MoorelmError(f"{path} is damaged ({problem}); delete {folder} and prepare again")
    return m


def _manifest_problem(m: dict) -> str | None:
    """What is wrong with a manifest's fields TokenData relies on, or None. Shard names must
    be moorelm's own (no path can lead out of the folder)."""
    def count(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if m.get("dtype") not in ("uint16", "uint32"):
        return f"dtype {str(m.get('dtype'))[:20]!r}"
    if not count(m.get("vocab_size")) or m["vocab_size"] < 1:
        return "vocab_size"
    for split in SPLITS:
        s = m["splits"].get(split)
        if not isinstance(s, dict) or not count(s.get("tokens")) or not count(s.get("bytes")) \
                or not isinstance(s.get("shards"), list):
            return f"split {split!r}"
        for shard in s["shards"]:
            if not isinstance(shard, dict) or not count(shard.get("tokens")) \
                    or not isinstance(shard.get("file"), str) \
                    or not re.fullmatch(rf"{split}-\d{{5}}\.bin", shard["file"]):
                return f"a {split} shard entry {str(shard)[:40]}"
    return None


def default_data_dir(corpus: Corpus, options: PrepareOptions) -> Path:
    """Where ``train`` caches a dataset it prepares on the fly ($MOORELM_CACHE or ~/.cache)."""
    root = Path(os.environ.get("MOORELM_CACHE", Path.home() / ".cache" / "moorelm"))
    key = corpus.fingerprint + "-" + options.tokenizer
    if options.tokenizer == "bpe":
        key += str(options.vocab_size)
    key += f"-v{options.val_frac:g}"
    return root / "data" / key


class Batch(NamedTuple):
    """One batch from a data source: token ids, their next-token targets (-1: not scored)
    and, for rows that pack several sequences, which sequence each token belongs to (``GPT.forward``
    restarts positions and attention at every new segment)."""

    inputs: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (B, T)
    segments: torch.Tensor | None = None  # (B, T), or None: one sequence per row


class DataSource(Protocol):
    """What the training loop reads: ``TokenData`` (pretraining) and
    ``moorelm.finetune.sft.SFTData`` (prompt/completion pairs) are the two kinds.

    ``train_batch`` must be a pure function of its arguments (that is what makes resume exact
    and lets ``parts`` ranks take disjoint equal slices of one global batch); ``val_batch``
    gives the same ``i``-th batch to every run on the data.
    """

    vocab_size: int
    tokenizer_path: Path

    def check_fits(self, seq_len: int) -> None:
        """Raise ``MoorelmError`` when a split cannot fill one context window."""

    def bytes_per_token(self, split: str = "val") -> float: ...

    def train_batch(self, step: int, seed: int, global_batch: int, seq_len: int,
                    part: int = 0, parts: int = 1) -> Batch: ...

    def val_batch(self, i: int, batch_size: int, seq_len: int) -> Batch: ...

    def provenance(self) -> dict[str, str]:
        """Where the data came from, as the run's config.json records it: ``dir``,
        ``fingerprint`` (a resume checks it), ``corpus`` and ``tokenizer``."""


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

    def provenance(self) -> dict[str, str]:
        m = self.manifest
        return {"dir": str(self.folder.resolve()), "fingerprint": m["fingerprint"],
                "corpus": m["corpus"], "tokenizer": m["tokenizer"]}

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
                    part: int = 0, parts: int = 1) -> Batch:
        """Part ``part`` of ``parts`` equal slices of the global batch of ``step``."""
        rng = np.random.default_rng([seed, step])
        w = self._windows("train", rng, global_batch, seq_len)
        per = global_batch // parts
        w = w[part * per : (part + 1) * per]
        t = torch.from_numpy(w)
        return Batch(t[:, :-1], t[:, 1:])  # idx, targets: (B, T) each

    def val_batch(self, i: int, batch_size: int, seq_len: int) -> Batch:
        rng = np.random.default_rng([EVAL_SEED, i])
        t = torch.from_numpy(self._windows("val", rng, batch_size, seq_len))
        return Batch(t[:, :-1], t[:, 1:])


def bits_per_byte(loss_nats: float, bytes_per_token: float) -> float:
    return loss_nats / math.log(2) / bytes_per_token
