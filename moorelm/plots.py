"""Matplotlib figures for training runs (written as PNG, atomically)."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from moorelm.atomic import atomic_write_bytes  # noqa: E402


def save_figure(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())


def plot_loss(rows: list[dict], path: Path, title: str = "") -> None:
    """Train and val loss against tokens seen, from metrics.csv rows."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    tr = [(float(r["tokens"]), float(r["train_loss"])) for r in rows if r.get("train_loss")]
    va = [(float(r["tokens"]), float(r["val_loss"])) for r in rows if r.get("val_loss")]
    if tr:
        ax.plot(*zip(*tr), label="train", color="tab:blue", alpha=0.7, lw=1)
    if va:
        ax.plot(*zip(*va), label="val", color="tab:red", marker="o", ms=3, lw=1.5)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or "training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)
