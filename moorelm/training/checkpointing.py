"""The training loop's use of the run folder: start or resume, and save a checkpoint.

Every read and write the loop makes in its run folder goes through this module, and this
module goes through ``moorelm.run.RunFolder`` (the owner of the folder's format). What a
checkpoint holds:

- the model's files, as its codec (``moorelm.codecs``) names them: ``model.safetensors`` for
  a plain language model, plus ``adapter.safetensors`` for LoRA;
- ``optimizer.safetensors``: ``Optimizers.state_dict()``'s tensors, under its names;
- ``state.json``: ``TrainState.to_checkpoint()``, the optimizers' JSON part, the world size
  and the global batch;
- and, next to the checkpoints, metrics.csv: the history up to the newest step.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from moorelm.codecs import Codec, load_gpt_weights
from moorelm.optim import Optimizers, OptimizerState
from moorelm.run import RunFolder, RunLock
from moorelm.tokenizer import Tokenizer
from moorelm.training.distributed import Dist, shard_like, to_host
from moorelm.training.metrics import METRICS_FILE, read_metrics
from moorelm.training.state import TrainState


def resume_point(out: Path, resume: bool, d: Dist) -> Path | None:
    """The checkpoint to resume from; None for a fresh run, which must not overwrite a run
    (nor a folder of other files)."""
    run = RunFolder(out)
    if d.main:
        run.check_new(resume)
    return run.latest() if resume else None


def hold(out: Path, d: Dist) -> RunLock | None:
    """Rank 0 holds the run folder while training; a second process gets one clear line."""
    return RunFolder(out).lock() if d.main else None


def resumable_config(out: Path) -> dict:
    """The saved config.json of a run that has a checkpoint to resume (else a clear error,
    before any data is prepared)."""
    run = RunFolder(out)
    saved = run.read_config()
    run.latest()
    return saved


def load_initial_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    load_gpt_weights(model, tensors, "initial weights")


def load_checkpoint_weights(model: torch.nn.Module, out: Path, last: Path,
                            codec: Codec | None) -> None:
    """The saved model state of ``last`` into ``model`` (its codec, or the run's own)."""
    RunFolder(out).load_into(model, last, codec)


def restore(last: Path, out: Path, opt: Optimizers, device: torch.device | str, *,
            sharded: bool, d: Dist, global_batch: int) -> TrainState:
    """The optimizer state (into ``opt``) and the loop state saved in ``last``."""
    run = RunFolder(out)
    saved = run.read_state(last)
    tensors = run.read_optimizer(last, "cpu" if sharded else device)
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
    RunFolder(out).write_files(config, Tokenizer.load(tokenizer_path))


def has_checkpoint(out: Path) -> bool:
    return bool(RunFolder(out).checkpoints())


def save(out: Path, state: TrainState, model: torch.nn.Module, opt: Optimizers,
         codec: Codec, *, d: Dist, sharded: bool, global_batch: int, keep: int) -> None:
    """Write checkpoint ``state.step`` (rank 0; under FSDP every rank helps gather)."""
    if not (d.main or sharded):
        return
    opt_state = opt.state_dict()
    opt_tensors = to_host(opt_state.tensors, sharded)
    full = to_host(dict(model.state_dict()), True) if sharded else None
    files = codec.checkpoint_files(model, full)
    if not d.main:
        return
    saved = {**state.to_checkpoint(), "optimizer": opt_state.meta, "world_size": d.world,
             "global_batch": global_batch}
    RunFolder(out).save(state.step, files, saved, opt_tensors, keep=keep)
