"""Transitional: the run-folder calls ``finetune/sft.py`` still makes, on ``moorelm.run``.

Everything else reads and writes run folders through ``moorelm.run.RunFolder``. This module
goes once sft.py does too (see the merge note of the run-folder change); nothing new may
import it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moorelm.atomic import atomic_write_json  # noqa: F401  (sft.py writes finetune.json)
from moorelm.codecs import model_tensors
from moorelm.run import TOKENIZER_FILE as TOKENIZER  # noqa: F401
from moorelm.run import RunFolder


def read_run_config(run_dir: Path) -> dict:
    return RunFolder(run_dir).read_config()


def latest_checkpoint(run_dir: Path) -> Path:
    return RunFolder(run_dir).latest()


def list_checkpoints(run_dir: Path) -> list[Path]:
    return RunFolder(run_dir).checkpoints()


def read_state(ckpt: Path) -> dict:
    return RunFolder(ckpt.parent.parent).read_state(ckpt)


def plain_weights(run_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor], Path]:
    """(run config, plain GPT tensors with any adapters merged in, checkpoint folder)."""
    loaded = RunFolder(run_dir).load()
    return loaded.config, model_tensors(loaded.model), loaded.checkpoint


def finalize_checkpoint(ckpt: Path, cfg: object) -> None:
    """Nothing to do: LoRA checkpoints are written in their final form."""


def to_training_checkpoint(ckpt: Path, cfg: object) -> None:
    """Nothing to do: resuming reads the final form (``RunFolder.load_into``)."""
