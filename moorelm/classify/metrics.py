"""Scoring a classifier and telling the user about it: accuracy, F1 and the confusion matrix,
the confusion-matrix PNG, the record a finished run returns and writes to ``metrics.json``
(``run_record``, one for every backend), and the messages and summary lines it prints.

Needs only numpy (and matplotlib for the PNG); every classification backend uses it.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

TASK = "text-classification"  # the "task" of every classifier run's metrics.json
METRICS_FILE = "metrics.json"
CONFUSION_FILE = "confusion_matrix.png"


class TruncationWarning(UserWarning):
    """Some texts were longer than ``max_length`` tokens and were cut."""


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


def warn_truncated(max_length: int, *counts: tuple[int, int, str], stacklevel: int = 1) -> None:
    """One ``TruncationWarning`` for each ``(n_truncated, n_total, what)`` that cut texts;
    ``stacklevel`` counts from the caller, as ``warnings.warn``'s does."""
    for n_cut, n, what in counts:
        if n_cut:
            warnings.warn(truncation_message(n_cut, n, max_length, what), TruncationWarning,
                          stacklevel=stacklevel + 1)


def run_record(*, backend: str, model: str, splits: Any, eval_file: Any, max_length: int,
               truncated: dict[str, int], metrics: dict[str, Any], train_time: float,
               steps: int, epochs_run: float, best_f1: float | None, stopped_early: bool,
               time_limit_hit: bool, hyperparameters: dict[str, Any], out: Path,
               **extra: Any) -> dict[str, Any]:
    """What a finished classifier fine-tuning returns and writes to ``metrics.json``, the same
    record from every backend (``format_summary`` prints it). ``splits``: the run's
    ``classify.data.Splits``; ``extra``: a backend's own keys, placed before ``out_dir``."""
    return {
        "task": TASK,
        "backend": backend,
        "model": model,
        "train_file": str(splits.train_all.path),
        "eval_file": str(eval_file) if eval_file else None,
        "eval_source": splits.eval_source,
        "text_column": splits.train.text_column,
        "label_column": splits.train.label_column,
        "labels": splits.names,
        "rows": {"train": len(splits.train), "eval": len(splits.eval),
                 "train_file": len(splits.train_all)},
        "class_balance": splits.balance,
        "max_length": max_length,
        "truncated": truncated,
        **{k: metrics[k] for k in ("accuracy", "macro_f1", "macro_precision", "macro_recall")},
        "per_class": metrics["per_class"],
        "confusion_matrix": metrics["confusion_matrix"],
        "train_time_s": round(train_time, 2),
        "steps": steps,
        "epochs_run": epochs_run,
        "best_metric_macro_f1": best_f1,
        "stopped_early": stopped_early,
        "time_limit_hit": time_limit_hit,
        **extra,
        "hyperparameters": hyperparameters,
        "out_dir": str(out),
    }


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


def say(progress: bool, message: str) -> None:
    """Print a progress line to stderr when ``progress`` is on."""
    if progress:
        print(message, file=sys.stderr, flush=True)
