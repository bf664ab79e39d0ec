"""The training loop's use of the run folder: start or resume, and save a checkpoint.

Every read and write the loop makes in its run folder goes through this module (the run
folder's format itself is ``moorelm.checkpoint``'s). What a checkpoint holds:

- the model's files, as its codec names them (``PlainCodec``: ``model.safetensors``, the
  state dict without the tied head);
- ``optimizer.safetensors``: ``Optimizers.state_dict()``'s tensors, under its names;
- ``state.json``: ``TrainState.to_checkpoint()``, the optimizers' JSON part, the world size
  and the global batch;
- and, next to the checkpoints, metrics.csv: the history up to the newest step.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Protocol

import torch

from moorelm import checkpoint as ckpt
from moorelm.errors import MoorelmError
from moorelm.optim import Optimizers, OptimizerState
from moorelm.tokenizer import Tokenizer
from moorelm.training.distributed import Dist, shard_like, to_host
from moorelm.training.metrics import METRICS_FILE, read_metrics
from moorelm.training.state import TrainState

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
FORMAT = "moorelm-1"

CheckpointFiles = dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]]


class ModelCodec(Protocol):
    """How a kind of model is written into a checkpoint folder."""

    kind: str

    def checkpoint_files(self, model: torch.nn.Module) -> CheckpointFiles:
        """File name in the checkpoint folder -> (tensors, safetensors metadata). Under FSDP
        the tensors may be DTensor shards; the saver gathers them."""


class PlainCodec:
    """A plain moorelm GPT (or one changed in place by a model hook): its state dict, less
    the head when it is tied to the token embedding (safetensors refuses shared storage)."""

    kind = "plain"

    def checkpoint_files(self, model: torch.nn.Module) -> CheckpointFiles:
        tensors = dict(model.state_dict())
        if getattr(getattr(model, "config", None), "tie_embeddings", False):
            tensors.pop("lm_head.weight", None)
        return {MODEL_FILE: (tensors, {"format": FORMAT})}


def resume_point(out: Path, resume: bool, d: Dist) -> Path | None:
    """The checkpoint to resume from; None for a fresh run, which must not overwrite one."""
    if resume:
        return ckpt.latest_checkpoint(out)
    if d.main and ckpt.list_checkpoints(out):
        raise MoorelmError(
            f"{out} already holds a trained run; pass --resume to continue it or choose another --out"
        )
    return None


def resumable_config(out: Path) -> dict:
    """The saved config.json of a run that has a checkpoint to resume (else a clear error,
    before any data is prepared)."""
    saved = ckpt.read_run_config(out)
    ckpt.latest_checkpoint(out)
    return saved


def load_initial_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    ckpt.load_weights(model, tensors, Path("initial weights"))


def load_checkpoint_weights(model: torch.nn.Module, last: Path) -> None:
    ckpt.load_weights(model, ckpt.read_tensors(last / MODEL_FILE), last)


def restore(last: Path, out: Path, opt: Optimizers, device: torch.device | str, *,
            sharded: bool, d: Dist, global_batch: int) -> TrainState:
    """The optimizer state (into ``opt``) and the loop state saved in ``last``."""
    saved = ckpt.read_state(last)
    opt_file = last / OPTIMIZER_FILE
    if not opt_file.exists():
        raise MoorelmError(f"{last} has no optimizer state, so it cannot be resumed")
    tensors = ckpt.read_tensors(opt_file, "cpu" if sharded else device)
    opt.load_state_dict(OptimizerState(tensors, saved["optimizer"]),
                        place=shard_like if sharded else None)
    saved_batch = saved.get("global_batch")
    if d.main and saved_batch and saved_batch != global_batch:
        warnings.warn(
            f"resuming with a global batch of {global_batch} sequences (batch_size x grad_accum "
            f"x {d.world} processes) where the run used {saved_batch}; set --grad-accum to "
            "keep it", stacklevel=4)  # at train()'s caller
    return TrainState.from_checkpoint(saved, read_metrics(out / METRICS_FILE, saved["step"]))


def write_run_files(out: Path, config: dict, tokenizer_path: Path) -> None:
    ckpt.write_run_files(out, config, Tokenizer.load(tokenizer_path))


def has_checkpoint(out: Path) -> bool:
    return bool(ckpt.list_checkpoints(out))


def save(out: Path, state: TrainState, model: torch.nn.Module, opt: Optimizers,
         codec: ModelCodec, *, d: Dist, sharded: bool, global_batch: int, keep: int) -> None:
    """Write checkpoint ``state.step`` (rank 0; under FSDP every rank helps gather)."""
    if not (d.main or sharded):
        return
    files = codec.checkpoint_files(model)
    if set(files) != {MODEL_FILE}:
        # moorelm.checkpoint writes one model file; other layouts need its successor
        raise MoorelmError(f"the {codec.kind!r} codec names {sorted(files)}; this checkpoint "
                           f"writer stores {MODEL_FILE} only")
    opt_state = opt.state_dict()
    opt_tensors = to_host(opt_state.tensors, sharded)
    weights = to_host(files[MODEL_FILE][0], sharded)
    if not d.main:
        return
    # (the model file's metadata is moorelm.checkpoint's: format and step)
    saved = {**state.to_checkpoint(), "optimizer": opt_state.meta, "world_size": d.world,
             "global_batch": global_batch}
    ckpt.save_checkpoint(out, state.step, weights, saved, opt_tensors, keep=keep)
