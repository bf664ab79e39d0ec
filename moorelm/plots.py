"""Matplotlib figures as PNG: the one place that loads pyplot and writes images.

matplotlib is imported on first use (``pyplot()``), on its Agg backend (no screen needed):
it costs ~0.8 s and ~30 MiB, which commands that draw nothing (``serve``, ``generate``) should
not pay. Images are rendered into memory and written atomically (``save_figure``), so a
killed run leaves the previous PNG, never half of a new one.
"""

from __future__ import annotations

import io
from pathlib import Path

from moorelm.atomic import atomic_write_bytes


def pyplot():
    """``matplotlib.pyplot`` with the Agg backend, imported on first call."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig, dpi: int = 110, tight: bool = False) -> bytes:
    """The figure as PNG bytes (closed afterwards); ``tight`` crops to the drawn area."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight" if tight else None)
    pyplot().close(fig)
    return buf.getvalue()


def save_figure(fig, path: str | Path, dpi: int = 110, tight: bool = False) -> Path:
    """Write the figure to ``path`` as PNG, atomically; -> the path."""
    path = Path(path)
    atomic_write_bytes(path, png_bytes(fig, dpi, tight))
    return path


def plot_loss(rows: list[dict], path: Path, title: str = "") -> None:
    """Train and val loss against tokens seen, from metrics.csv rows."""
    fig, ax = pyplot().subplots(figsize=(7, 4.2))
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
    save_figure(fig, path, tight=True)
