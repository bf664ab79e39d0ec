"""Everything the training loop needs before its first step, fresh or resumed: ``set_up``.

Order matters for exactness: the model is built right after seeding, the initial weights,
the model hook and a resumed checkpoint's weights all go in before the model is moved or
sharded, and the optimizer is built on the placed parameters before its state is restored.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moorelm.codecs import Codec, codec_for
from moorelm.config import ModelConfig, TrainConfig, with_vocab
from moorelm.data import DataSource, TokenData
from moorelm.device import Precision, choose_precision, peak_flops, setup_device
from moorelm.errors import MoorelmError
from moorelm.model import GPT
from moorelm.optim import Optimizers, build_optimizer
from moorelm.run import RunLock
from moorelm.training import checkpointing
from moorelm.training.distributed import (
    Dist,
    fully_shard,
    init_distributed,
    wrap_for_data_parallel,
)
from moorelm.training.state import TrainState


@dataclass
class Setup:
    """What ``set_up`` hands the loop: configs, placement, the model in its three wrappings,
    the optimizer, the state to continue from, and the run's fixed accounting."""

    model_cfg: ModelConfig
    cfg: TrainConfig
    data: DataSource
    out: Path
    codec: Codec
    d: Dist
    device: torch.device
    precision: Precision
    scaler: torch.amp.GradScaler | None  # fp16 loss scaling
    sharded: bool  # FSDP2 across the ranks
    model: GPT  # the model itself (what checkpoints save)
    run_model: torch.nn.Module  # the model, compiled when asked (what evaluation calls)
    step_model: torch.nn.Module  # run_model, inside DDP with several unsharded ranks
    opt: Optimizers
    state: TrainState
    global_batch: int  # sequences per optimizer step, all ranks and micro-batches
    params: dict[str, int]
    flops_per_token: float
    peak_flops: float | None
    bytes_per_token: float  # of the val split, for bits per byte
    lock: RunLock | None  # rank 0 holds the run folder while training

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.model_cfg.seq_len


def set_up(model_cfg: ModelConfig, cfg: TrainConfig, data: DataSource | str | Path, out: Path,
           *, resume: bool, codec: Codec | None, run_meta: dict[str, Any] | None = None,
           init_weights: dict[str, torch.Tensor] | None = None,
           model_hook: Callable[[GPT], None] | None = None) -> Setup:
    """Check the inputs, place the model and optimizer, restore a checkpoint when resuming,
    and write the run's config.json and tokenizer.json (rank 0)."""
    data = TokenData(data) if isinstance(data, (str, Path)) else data
    if model_cfg.vocab_size < data.vocab_size:
        model_cfg = with_vocab(model_cfg, data.vocab_size)
    data.check_fits(model_cfg.seq_len)
    if cfg.max_steps is None and cfg.max_tokens is None and cfg.max_time is None:
        raise MoorelmError("no training budget: pass --max-steps, --max-tokens or --max-time")

    d, device = init_distributed(cfg.device)
    setup_device(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    precision = choose_precision(device, cfg.dtype)
    # fp16 (older GPUs) needs loss scaling; bf16 and fp32 do not
    scaler = torch.amp.GradScaler(device.type) if precision.use_scaler else None
    last = checkpointing.resume_point(out, resume, d)
    lock = checkpointing.hold(out, d)

    torch.manual_seed(cfg.seed)
    model = GPT(model_cfg)
    if init_weights is not None:
        checkpointing.load_initial_weights(model, init_weights)
    if model_hook is not None:
        model_hook(model)
    if last is not None:  # full weights go in before the model is moved or sharded
        checkpointing.load_checkpoint_weights(model, out, last, codec)
    sharded = cfg.fsdp and d.world > 1
    if sharded and precision.use_scaler:
        # fp16 loss scaling must agree across shards on overflow; not wired up for FSDP2
        raise MoorelmError("--fsdp does not support fp16 (loss scaling); use --dtype bf16 "
                           "(GPUs since Ampere) or --dtype fp32")
    if cfg.fsdp and not sharded and not resume:
        warnings.warn("--fsdp shards across processes; with one process it has no effect "
                      "(launch with torchrun --nproc_per_node=N)", stacklevel=3)
    if sharded:
        fully_shard(model, d, device)
    else:
        model.to(device)
    opt = build_optimizer(model, cfg, device.type)

    global_batch = cfg.batch_size * cfg.grad_accum * d.world
    state = TrainState()
    if last is not None:
        state = checkpointing.restore(last, out, opt, device, sharded=sharded, d=d,
                                      global_batch=global_batch)
    run_model = torch.compile(model) if cfg.compile else model

    params = model.param_counts()
    config_json = {
        "model": model_cfg.to_dict(), "train": cfg.to_dict(), "data": data.provenance(),
        "params": params, "world_size": d.world, "fsdp": sharded, **(run_meta or {}),
    }
    if d.main:
        checkpointing.write_run_files(out, config_json, data.tokenizer_path)
    codec = codec or codec_for(config_json)  # how this kind of model is saved
    return Setup(
        model_cfg=model_cfg, cfg=cfg, data=data, out=out, codec=codec, d=d, device=device,
        precision=precision, scaler=scaler, sharded=sharded, model=model, run_model=run_model,
        step_model=wrap_for_data_parallel(run_model, d, device, sharded), opt=opt, state=state,
        global_batch=global_batch, params=params,
        flops_per_token=model.flops_per_token(model_cfg.seq_len),
        peak_flops=peak_flops(device, cfg.peak_flops), bytes_per_token=data.bytes_per_token("val"), lock=lock,
    )
