"""The loop's log: metrics.csv (one row per log line) and the loss window between lines."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from moorelm.atomic import atomic_write_text
from moorelm.config import ModelConfig, TrainConfig
from moorelm.data import bits_per_byte
from moorelm.training.state import TrainState

METRICS_FILE = "metrics.csv"
METRIC_FIELDS = ["step", "tokens", "lr", "train_loss", "val_loss", "val_bpb", "tokens_per_s",
                 "elapsed", "mfu"]


class MetricsLogger(Protocol):
    """The loop's one seam for experiment trackers (``moorelm.training.trackers``): called on
    the main process with the run's config, each metrics.csv row as written, then the loss
    plot when training ends."""

    def start(self, config: dict[str, Any]) -> None: ...

    def log(self, row: dict[str, Any]) -> None: ...

    def finish(self, loss_plot: Path | None) -> None: ...


def run_summary(model_cfg: ModelConfig, cfg: TrainConfig, params: dict[str, int],
                run_meta: dict[str, Any] | None) -> dict[str, Any]:
    """The config a tracker records as the run's hyperparameters."""
    meta = {k: v for k, v in (run_meta or {}).items() if isinstance(v, (str, int, float, bool))}
    return {"model": model_cfg.to_dict(), "train": cfg.to_dict(), "params": dict(params), **meta}


def fmt(x: float | None, nd: int = 4) -> str:
    return "" if x is None else f"{x:.{nd}f}"


def metrics_row(state: TrainState, lr: float, train_loss: float | None, val_loss: float | None,
                bytes_per_token: float, tokens_per_s: float, mfu: float | None) -> dict:
    """One metrics.csv row at ``state``'s step (``val_loss`` None: not evaluated there)."""
    bpb = None if val_loss is None else bits_per_byte(val_loss, bytes_per_token)
    return {"step": state.step, "tokens": state.tokens, "lr": f"{lr:.3e}",
            "train_loss": fmt(train_loss), "val_loss": fmt(val_loss), "val_bpb": fmt(bpb),
            "tokens_per_s": f"{tokens_per_s:.1f}", "elapsed": f"{state.elapsed:.2f}",
            "mfu": fmt(mfu)}


def read_metrics(path: Path, upto_step: int) -> list[dict]:
    """The rows of a metrics.csv up to ``upto_step`` (those a resumed run keeps)."""
    if not path.exists():
        return []
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            try:
                if int(r["step"]) <= upto_step and r.get("elapsed"):
                    rows.append(r)
            except (TypeError, ValueError, KeyError):
                continue  # a partial last line from a killed run
    return rows


def write_metrics(path: Path, rows: list[dict]) -> None:
    lines = [",".join(METRIC_FIELDS)]
    for r in rows:
        lines.append(",".join(str(r.get(k, "")) for k in METRIC_FIELDS))
    atomic_write_text(path, "\n".join(lines) + "\n")


@dataclass
class LossWindow:
    """Train losses and throughput of the steps since the last log line. The losses stay on
    the device until ``close``, so a step costs no host sync."""

    losses: list[torch.Tensor] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0

    def add(self, loss: torch.Tensor, tokens: int, seconds: float) -> None:
        self.losses.append(loss)
        self.tokens += tokens
        self.seconds += seconds

    def close(self) -> tuple[float, float]:
        """(mean loss, tokens/s) of the window, which then starts afresh."""
        mean = float(torch.stack(self.losses).mean())  # one host sync per log line
        rate = self.tokens / max(self.seconds, 1e-9)
        self.losses, self.tokens, self.seconds = [], 0, 0.0
        return mean, rate
