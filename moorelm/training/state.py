"""What the training loop carries from step to step (``TrainState``) and what it returns.

A checkpoint restores the whole ``TrainState``: step, tokens and elapsed time from its
state.json, the last validation loss, and the metrics history from metrics.csv up to the
checkpoint's step. Everything else a step depends on is a function of (seed, step).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moorelm.config import TrainConfig


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    tokens: int = 0  # training tokens seen (all ranks)
    elapsed: float = 0.0  # seconds of training steps, excluding evaluation and checkpointing
    val_loss: float | None = None  # the last validation loss
    history: list[dict] = dataclasses.field(default_factory=list)  # metrics.csv rows

    def within_budget(self, cfg: TrainConfig) -> bool:
        """False once any of max_steps / max_tokens / max_time is reached."""
        if cfg.max_steps is not None and self.step >= cfg.max_steps:
            return False
        if cfg.max_tokens is not None and self.tokens >= cfg.max_tokens:
            return False
        if cfg.max_time is not None and self.elapsed >= cfg.max_time:
            return False
        return True

    def advance(self, tokens: int, seconds: float) -> None:
        self.step += 1
        self.tokens += tokens
        self.elapsed += seconds

    def to_checkpoint(self) -> dict[str, Any]:
        """The state.json fields of this state (the history goes to metrics.csv)."""
        return {"step": self.step, "tokens": self.tokens, "elapsed": self.elapsed,
                "val_loss": self.val_loss}

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any], history: list[dict]) -> TrainState:
        return cls(step=saved["step"], tokens=saved["tokens"], elapsed=saved["elapsed"],
                   val_loss=saved.get("val_loss"), history=history)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    tokens: int
    elapsed: float  # seconds of training, excluding evaluation and checkpointing
    train_loss: float | None
    val_loss: float | None
    val_bpb: float | None
    tokens_per_s: float
    params: dict[str, int]
    flops_per_token: float
    flops: float  # flops_per_token x tokens
    history: list[dict] = dataclasses.field(default_factory=list)  # metrics rows
