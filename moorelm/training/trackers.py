"""Experiment trackers beside metrics.csv: TensorBoard, Weights & Biases, Trackio.

``train(..., loggers=[...])`` hands each logger the run's config once (``start``), every
metrics.csv row as it is written (``log``) and the run folder when training ends
(``finish``: the loss plot goes up as an image). Each tracker is imported only when its logger
is made, and each works offline: TensorBoard writes event files under ``RUN/tb/``, wandb runs
in offline mode (unless ``WANDB_MODE`` says otherwise) with its files under ``RUN/wandb/``,
Trackio keeps its local database. metrics.csv is always written; ``none`` adds nothing.

    loggers = make_loggers(parse_logger_names(["tensorboard,wandb"]), "runs/x")
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from moorelm.errors import MoorelmError
from moorelm.training.metrics import MetricsLogger

LOGGERS = ("tensorboard", "wandb", "trackio", "none")
PROJECT = "moorelm"
TB_DIR = "tb"
# metrics.csv column -> the tracker's name for it
SCALARS = {"train_loss": "loss/train", "val_loss": "loss/val", "val_bpb": "val/bits_per_byte",
           "lr": "lr", "tokens_per_s": "speed/tokens_per_s", "mfu": "speed/mfu",
           "tokens": "tokens", "grad_norm": "grad_norm"}


def parse_logger_names(values: Iterable[str] | None) -> list[str]:
    """``["tensorboard,wandb", "trackio"]`` -> the names, checked, in order, once each;
    ``none`` (or nothing) means metrics.csv only."""
    names: list[str] = []
    for v in values or ():
        for n in str(v).split(","):
            n = n.strip().lower()
            if not n:
                continue
            if n not in LOGGERS:
                raise MoorelmError(f"--logger {n!r} is not a logger; choose from: "
                                   f"{', '.join(LOGGERS)} (several allowed, comma-separated)")
            if n not in names:
                names.append(n)
    if "none" in names and len(names) > 1:
        raise MoorelmError("--logger none cannot be combined with other loggers")
    return [n for n in names if n != "none"]


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """A metrics.csv row's numbers under the trackers' names (blank cells left out)."""
    out: dict[str, float] = {}
    for key, name in SCALARS.items():
        v = row.get(key)
        if v is None or v == "":
            continue
        try:
            out[name] = float(v)
        except (TypeError, ValueError):
            continue
    return out


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> ``{"model.n_layer": 2, ...}`` of plain values (what hparams take)."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_config(v, key + "."))
        elif isinstance(v, (bool, int, float, str)):
            out[key] = v
        elif v is None:
            out[key] = "None"
        else:
            out[key] = json.dumps(v, default=str)
    return out


class TensorBoardLogger:
    """Event files under ``RUN/tb/`` (``tensorboard --logdir RUN/tb``)."""

    def __init__(self, out: str | Path):
        import tensorboard  # noqa: F401  (torch's writer needs it; a clear name if missing)

        self.dir = Path(out) / TB_DIR
        self.writer = None

    def start(self, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.dir))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str)
                             + "\n```")
        self.writer.add_hparams(flat_config(config), {}, run_name=".")

    def log(self, row: dict[str, Any]) -> None:
        step = int(row["step"])
        for name, v in scalars(row).items():
            self.writer.add_scalar(name, v, step)
        self.writer.flush()

    def finish(self, loss_plot: Path | None) -> None:
        if self.writer is None:
            return
        if loss_plot is not None and loss_plot.exists():
            import matplotlib.image

            image = matplotlib.image.imread(str(loss_plot))  # (H, W, 3 or 4), floats in [0, 1]
            self.writer.add_image("loss_plot", image[..., :3], dataformats="HWC")
        self.writer.close()


class WandbLogger:
    """A Weights & Biases run, offline unless ``WANDB_MODE`` is set, files under ``RUN/wandb``."""

    def __init__(self, out: str | Path):
        import wandb

        self.wandb, self.out, self.run = wandb, Path(out), None

    def start(self, config: dict[str, Any]) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.run = self.wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT),
                                   name=self.out.name, dir=str(self.out), config=config,
                                   mode=os.environ.get("WANDB_MODE", "offline"))

    def log(self, row: dict[str, Any]) -> None:
        self.run.log(scalars(row), step=int(row["step"]))

    def finish(self, loss_plot: Path | None) -> None:
        if self.run is None:
            return
        if loss_plot is not None and loss_plot.exists():
            self.run.log({"loss_plot": self.wandb.Image(str(loss_plot))})
        self.run.finish()


class TrackioLogger:
    """A Trackio run (local by default: no account, no network)."""

    def __init__(self, out: str | Path):
        import trackio

        self.trackio, self.out, self.started = trackio, Path(out), False

    def start(self, config: dict[str, Any]) -> None:
        self.trackio.init(project=os.environ.get("TRACKIO_PROJECT", PROJECT),
                          name=self.out.name, config=config)
        self.started = True

    def log(self, row: dict[str, Any]) -> None:
        self.trackio.log(scalars(row), step=int(row["step"]))

    def finish(self, loss_plot: Path | None) -> None:
        if not self.started:
            return
        image = getattr(self.trackio, "Image", None)
        if image is not None and loss_plot is not None and loss_plot.exists():
            self.trackio.log({"loss_plot": image(str(loss_plot))})
        self.trackio.finish()


MAKERS = {"tensorboard": TensorBoardLogger, "wandb": WandbLogger, "trackio": TrackioLogger}


def make_loggers(names: Sequence[str], out: str | Path) -> list[MetricsLogger]:
    """One logger per name for the run folder ``out``; a tracker that is not installed raises
    its ``ModuleNotFoundError`` here, before any training (the CLI names the extra)."""
    return [MAKERS[n](out) for n in names]


def report_to(names: Sequence[str]) -> list[str]:
    """The same choice for Hugging Face ``TrainingArguments.report_to`` (what
    ``moorelm.classify.train.finetune_classifier`` takes; empty: none), each tracker checked
    to be installed here, before training."""
    for n in names:
        __import__(n)  # a missing tracker raises ModuleNotFoundError naming it
    return list(names)
