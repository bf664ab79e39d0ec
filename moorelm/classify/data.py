"""Labelled data for text classification: reading and checking CSV/TSV/JSONL files, the label
order and id maps, and the seeded, stratified train/eval split every backend trains on.

Standard library only, no training backend; a bad file raises one ``MoorelmError`` naming the
file (and line).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import re
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moorelm.classify.metrics import format_balance, say
from moorelm.errors import MoorelmError
from moorelm.jsonfile import check_text, loads_json

TABLE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
TEXT_FALLBACKS = ("sentence",)  # accepted when the default text column "text" is absent

_INT_LABEL = re.compile(r"^[+-]?\d+$")


# ============================================================================ reading data


@dataclass
class Table:
    """Rows of a CSV/TSV/JSONL file. ``lines[i]`` is the 1-based line where row i starts."""

    path: Path
    format: str  # csv | tsv | jsonl
    columns: list[str]
    rows: list[dict[str, Any]]
    lines: list[int]


@dataclass
class LabeledData:
    """Texts with their labels (label names as strings), read from ``path``."""

    path: Path
    texts: list[str]
    labels: list[str]
    lines: list[int]
    text_column: str
    label_column: str

    def __len__(self) -> int:
        return len(self.texts)

    def class_balance(self, names: Sequence[str] | None = None) -> dict[str, int]:
        """Rows per label, in label order (``names`` if given, else this set's own labels)."""
        counts = Counter(self.labels)
        return {name: counts.get(name, 0) for name in (names or label_names(self.labels))}

    def subset(self, indices: Sequence[int]) -> LabeledData:
        return LabeledData(
            self.path,
            [self.texts[i] for i in indices],
            [self.labels[i] for i in indices],
            [self.lines[i] for i in indices],
            self.text_column,
            self.label_column,
        )


def table_format(path: Path) -> str:
    fmt = TABLE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise MoorelmError(
            f"{path}: unknown file type {path.suffix or '(no extension)'!r}; use .csv, .tsv or "
            ".jsonl"
        )
    return fmt


def read_table(path: str | os.PathLike) -> Table:
    """Read a CSV (header row), TSV (header row, no quoting) or JSON Lines file.

    Blank lines are skipped. Raises ``MoorelmError`` for a missing file, an unknown
    extension, bytes that are not UTF-8, malformed rows, or a file without data rows.
    """
    path = Path(path)
    if not path.exists():
        raise MoorelmError(f"{path} does not exist")
    if path.is_dir():
        raise MoorelmError(f"{path} is a folder; pass a .csv, .tsv or .jsonl file")
    fmt = table_format(path)
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise MoorelmError(
            f"{path} is not valid UTF-8 (first bad byte {raw[e.start]:#04x} on line {line}); "
            "re-encode the file as UTF-8"
        ) from None
    if fmt == "jsonl":
        table = _parse_jsonl(path, text)
    else:
        table = _parse_delimited(path, text, fmt)
    if not table.rows:
        raise MoorelmError(f"{path} has no data rows")
    return table


def _parse_delimited(path: Path, text: str, fmt: str) -> Table:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    if fmt == "tsv":
        reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    header: list[str] | None = None
    last_line = 0
    try:
        for record in reader:
            start, last_line = last_line + 1, reader.line_num
            if not record or all(not field.strip() for field in record):
                continue  # blank line
            if header is None:
                header = [name.strip() for name in record]
                continue
            if len(record) > len(header):
                raise MoorelmError(
                    f"{path}, line {start}: {len(record)} fields but the header has "
                    f"{len(header)} ({', '.join(header)}); quote fields that contain the "
                    f"separator"
                )
            row: dict[str, Any] = dict.fromkeys(header)
            row.update(zip(header, record))
            rows.append(row)
            lines.append(start)
    except csv.Error as e:
        raise MoorelmError(
            f"{path}, line {reader.line_num}: malformed {fmt.upper()}: {e}"
        ) from None
    if header is None:
        raise MoorelmError(f"{path} is empty; expected a header row and data rows")
    return Table(path, fmt, header, rows, lines)


def _parse_jsonl(path: Path, text: str) -> Table:
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    columns: dict[str, None] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise MoorelmError(f"{where}: not valid JSON ({e.msg})") from None
        except (RecursionError, ValueError):  # too deep, a number too long: jsonfile says which
            obj = loads_json(line, where)  # raises the one-line error
        if not isinstance(obj, dict):
            raise MoorelmError(f"{where}: expected a JSON object per line")
        for key, value in obj.items():  # "\ud800" is valid JSON but not text
            check_text(key, f"{where}: a field name")
            if isinstance(value, str):
                check_text(value, f"{where}: {key!r}")
        columns.update(dict.fromkeys(obj))
        rows.append(obj)
        lines.append(number)
    return Table(path, "jsonl", list(columns), rows, lines)


def _pick_column(table: Table, wanted: str, default: str, fallbacks: Sequence[str]) -> str | None:
    if wanted in table.columns:
        return wanted
    if wanted == default:
        for alt in fallbacks:
            if alt in table.columns:
                return alt
    return None


def _missing_columns_error(table: Table, missing: list[str]) -> MoorelmError:
    names = ", ".join(repr(m) for m in missing)
    found = ", ".join(repr(c) for c in table.columns) or "none"
    plural = "s" if len(missing) > 1 else ""
    return MoorelmError(
        f"{table.path} has no column{plural} {names} (columns found: {found}); name the right "
        f"ones with text_column/label_column (--text-column/--label-column)"
    )


def _cell_text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


def _label_name(value: Any) -> str:
    """A label cell -> its name: integers (also 1.0 in JSON) as digits, strings stripped."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def read_labeled(
    path: str | os.PathLike, text_column: str = "text", label_column: str = "label"
) -> LabeledData:
    """Read texts and labels from a CSV, TSV or JSONL file and check every row.

    If ``text_column`` is the default ``"text"`` and the file has no such column, a
    ``"sentence"`` column (GLUE style) is used instead. Labels may be strings or integers; they
    are kept as strings (``1`` and ``"1"`` are the same label).
    """
    table = read_table(path)
    tcol = _pick_column(table, text_column, "text", TEXT_FALLBACKS)
    lcol = _pick_column(table, label_column, "label", ())
    missing = [name for name, col in ((text_column, tcol), (label_column, lcol)) if col is None]
    if missing:
        raise _missing_columns_error(table, missing)
    assert tcol is not None and lcol is not None
    texts = [_cell_text(row.get(tcol)) for row in table.rows]
    labels = [_label_name(row.get(lcol)) for row in table.rows]
    bad = [line for line, t, y in zip(table.lines, texts, labels) if not t.strip() or not y]
    if bad:
        raise MoorelmError(
            f"{table.path}: {len(bad)} of {len(texts)} rows have an empty text or a missing "
            f"label (first on line {bad[0]}); fill in or remove those rows"
        )
    return LabeledData(table.path, texts, labels, list(table.lines), tcol, lcol)


def read_texts(path: str | os.PathLike, text_column: str = "text") -> tuple[list[str], str]:
    """Texts of one column of a CSV/TSV/JSONL file (``"sentence"`` accepted for ``"text"``).

    Returns ``(texts, column_used)``; empty texts raise ``MoorelmError`` with the first line.
    """
    table = read_table(path)
    tcol = _pick_column(table, text_column, "text", TEXT_FALLBACKS)
    if tcol is None:
        raise _missing_columns_error(table, [text_column])
    texts = [_cell_text(row.get(tcol)) for row in table.rows]
    bad = [line for line, t in zip(table.lines, texts) if not t.strip()]
    if bad:
        raise MoorelmError(
            f"{table.path}: {len(bad)} of {len(texts)} rows have an empty {tcol!r} (first on "
            f"line {bad[0]}); fill in or remove those rows"
        )
    return texts, tcol


# ============================================================================ labels, splits


def label_names(labels: Sequence[str]) -> list[str]:
    """The distinct labels in a stable order: numerically if all are integers, else sorted."""
    distinct = set(labels)
    if distinct and all(_INT_LABEL.match(name) for name in distinct):
        return sorted(distinct, key=lambda s: (int(s), s))
    return sorted(distinct)


def label_maps(names: Sequence[str]) -> tuple[dict[int, str], dict[str, int]]:
    """``(id2label, label2id)`` for labels in the given order."""
    id2label = dict(enumerate(names))
    return id2label, {name: i for i, name in id2label.items()}


def check_label_sets(train: LabeledData, eval_data: LabeledData | None = None) -> list[str]:
    """Check that training has two or more classes and that eval has no unseen label.

    Returns the label order (``label_names`` of the training labels).
    """
    names = label_names(train.labels)
    if len(names) < 2:
        raise MoorelmError(
            f"{train.path}: every training row has the label {names[0]!r}; a classifier needs "
            f"at least two classes"
        )
    if eval_data is not None:
        known = set(names)
        unseen_rows = [
            (y, line) for y, line in zip(eval_data.labels, eval_data.lines) if y not in known
        ]
        if unseen_rows:
            unseen = label_names([y for y, _ in unseen_rows])
            shown = ", ".join(repr(u) for u in unseen[:5]) + (" ..." if len(unseen) > 5 else "")
            raise MoorelmError(
                f"{eval_data.path}: label{'s' if len(unseen) > 1 else ''} {shown} "
                f"({len(unseen_rows)} rows, first on line {unseen_rows[0][1]}) never occur in "
                f"the training data (its labels: {', '.join(names)})"
            )
    return names


def _by_class(labels: Sequence[str]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, y in enumerate(labels):
        groups.setdefault(y, []).append(i)
    return {name: groups[name] for name in label_names(labels)}


def check_settings(*, batch_size: int, epochs: float, lr: float, max_steps: int | None,
                   time_limit_s: float | None) -> None:
    """MoorelmError naming the first training number a classifier cannot train with: both
    fine-tuners (a Hugging Face encoder's and the head on a moorelm GPT) call it first.
    NaN and infinity are refused: NaN passed a ``<= 0`` check and then failed deep inside
    (``int(nan)``, the optimizer), and an infinite rate saved NaN weights."""
    def finite(v) -> bool:
        return isinstance(v, (int, float)) and math.isfinite(v)

    if not isinstance(batch_size, int) or batch_size < 1:
        raise MoorelmError(f"batch size must be an integer >= 1, got {batch_size!r}")
    for name, value in (("epochs", epochs), ("learning rate", lr)):
        if not (finite(value) and value > 0):
            raise MoorelmError(f"{name} must be a finite number > 0, got {value!r}")
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
        raise MoorelmError(f"max steps must be an integer >= 1, got {max_steps!r}")
    if time_limit_s is not None and not (finite(time_limit_s) and time_limit_s > 0):
        raise MoorelmError(f"the time limit must be a finite number of seconds > 0, "
                           f"got {time_limit_s!r}")


def stratified_split(
    labels: Sequence[str], fraction: float, seed: int = 0
) -> tuple[list[int], list[int]]:
    """Seeded split of row indices into ``(keep, held_out)`` with ~``fraction`` of each class
    held out. A class with two or more rows puts at least one row on each side; a class with
    one row stays on the keep side. Indices come back in file order."""
    if not 0 < fraction < 1:
        raise MoorelmError(f"eval_fraction must be between 0 and 1, not {fraction}")
    rng = random.Random(seed)
    keep: list[int] = []
    held: list[int] = []
    for idx in _by_class(labels).values():
        idx = list(idx)
        rng.shuffle(idx)
        k = 0 if len(idx) < 2 else min(len(idx) - 1, max(1, round(len(idx) * fraction)))
        held += idx[:k]
        keep += idx[k:]
    return sorted(keep), sorted(held)


def stratified_sample(labels: Sequence[str], n: int, seed: int = 0) -> list[int]:
    """Seeded sample of exactly ``min(n, len(labels))`` row indices, in file order, keeping the
    class proportions (largest-remainder rounding, every class keeps at least one row when
    ``n`` allows)."""
    total = len(labels)
    if n >= total:
        return list(range(total))
    groups = _by_class(labels)
    quota = {y: n * len(idx) / total for y, idx in groups.items()}
    take = {y: int(q) for y, q in quota.items()}
    if n >= len(groups):
        for y in take:
            take[y] = max(take[y], 1)
    spare = n - sum(take.values())
    for y in sorted(groups, key=lambda y: quota[y] - int(quota[y]), reverse=True):
        if spare <= 0:
            break
        if take[y] < len(groups[y]):
            take[y] += 1
            spare -= 1
    while spare < 0:  # the minimum of one per class overshot: trim the largest classes
        y = max(take, key=lambda y: take[y])
        take[y] -= 1
        spare += 1
    rng = random.Random(seed)
    chosen: list[int] = []
    for y, idx in groups.items():
        chosen += rng.sample(idx, take[y])
    return sorted(chosen)


@dataclass
class Splits:
    """The rows a classifier trains and evaluates on, after every check."""

    train_all: LabeledData  # the whole training file
    train: LabeledData  # what is trained on (minus held-out rows, maybe subsampled)
    eval: LabeledData
    names: list[str]  # label order
    eval_source: str  # where the eval rows came from, in words
    balance: dict[str, dict[str, int]]  # class counts of train and eval


def prepare_splits(train_file, eval_file, text_column: str, label_column: str, *,
                   eval_fraction: float, seed: int, max_train_rows: int | None,
                   progress: bool) -> Splits:
    """Read and check the files, hold out a stratified eval slice when no eval file is given,
    subsample to ``max_train_rows``; shared by every classification backend."""
    train_all = read_labeled(train_file, text_column, label_column)
    eval_data = read_labeled(eval_file, text_column, label_column) if eval_file else None
    names = check_label_sets(train_all, eval_data)
    train = train_all
    if eval_data is None:
        keep, held = stratified_split(train_all.labels, eval_fraction, seed)
        if not held:
            raise MoorelmError(
                f"{train_all.path}: too few rows to hold out an evaluation set; pass eval_file"
            )
        train, eval_data = train_all.subset(keep), train_all.subset(held)
        eval_source = f"{eval_fraction:g} of {train_all.path.name} held out (stratified, seed {seed})"
    else:
        eval_source = str(eval_data.path)
    if max_train_rows is not None and len(train) > max_train_rows:
        if max_train_rows < len(names):
            raise MoorelmError(
                f"max_train_rows={max_train_rows} is fewer than the {len(names)} classes"
            )
        train = train.subset(stratified_sample(train.labels, max_train_rows, seed))
    if len(label_names(train.labels)) < 2:
        raise MoorelmError(f"{train_all.path}: after holding out eval rows only one class is left")
    balance = {"train": train.class_balance(names), "eval": eval_data.class_balance(names)}
    say(progress, f"train: {len(train)} rows ({format_balance(balance['train'])})")
    say(progress, f"eval:  {len(eval_data)} rows ({format_balance(balance['eval'])})")
    return Splits(train_all, train, eval_data, names, eval_source, balance)
