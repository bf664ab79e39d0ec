"""The training loop: ``train()`` on a data source into a run folder.

``train()`` reads as set-up (``setup.set_up``: model, optimizer, resume), the loop over
optimizer steps (``_optimizer_step``, then log, evaluate, checkpoint) and the finish. One
process, or one per rank under torchrun (DDP, or FSDP2 with ``--fsdp``; ``distributed.py``).
Pretraining (``pretrain.py``), fine-tuning and the scaling ladder all call it.

Determinism: the batch of step s is a pure function of (seed, s) (``moorelm.data.DataSource``)
and dropout is reseeded from (seed, s, rank) every step, so a resumed run repeats the
uninterrupted one exactly on CPU.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from moorelm.codecs import Codec
from moorelm.config import ModelConfig, TrainConfig
from moorelm.data import DataSource, bits_per_byte
from moorelm.device import autocast, mfu
from moorelm.errors import MoorelmError
from moorelm.model import GPT
from moorelm.optim import decay_progress, lr_multiplier
from moorelm.plots import plot_loss
from moorelm.training import checkpointing
from moorelm.training.distributed import all_mean, broadcast_float
from moorelm.training.metrics import (
    METRICS_FILE,
    LossWindow,
    MetricsLogger,
    metrics_row,
    run_summary,
    write_metrics,
)
from moorelm.training.setup import Setup, set_up
from moorelm.training.state import TrainResult
from moorelm.training.validation import estimate_loss


def train(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    data: DataSource | str | Path,
    out_dir: str | Path,
    *,
    resume: bool = False,
    run_meta: dict[str, Any] | None = None,
    init_weights: dict[str, torch.Tensor] | None = None,
    progress: bool = True,
    on_eval: Callable[[dict], None] | None = None,
    model_hook: Callable[[GPT], None] | None = None,
    on_step: Callable[[int], None] | None = None,
    codec: Codec | None = None,
    loggers: Sequence[MetricsLogger] = (),
) -> TrainResult:
    """Train ``model_cfg`` on ``data`` into the run folder ``out_dir``.

    ``data`` is a prepared dataset folder or any ``DataSource`` (the fine-tuning set
    ``moorelm.finetune.sft.SFTData`` is one). ``model_hook`` changes the model in place after
    ``init_weights`` are loaded and before the optimizer sees it (LoRA wraps layers and freezes
    the base there); ``codec`` (default: the one ``moorelm.codecs.codec_for`` picks from the
    run's config) says which files a checkpoint writes for the model. ``on_eval`` gets each
    evaluated metrics row, ``on_step`` each step number after its checkpoint (a callback that
    raises simulates a crash). ``loggers`` (``moorelm.training.trackers``) get the config,
    every metrics.csv row and the loss plot, on rank 0. Rank 0 holds the run folder's lock
    until it returns.
    """
    s = set_up(model_cfg, cfg, data, Path(out_dir), resume=resume, codec=codec,
               run_meta=run_meta, init_weights=init_weights, model_hook=model_hook)
    loggers = list(loggers) if s.d.main else []
    for lg in loggers:
        lg.start(run_summary(s.model_cfg, s.cfg, s.params, run_meta))
    state, cfg, start = s.state, s.cfg, s.state.step
    window, train_loss = LossWindow(), None
    bar = tqdm(total=cfg.max_steps, initial=state.step, disable=not (progress and s.d.main),
               unit="step", dynamic_ncols=True, desc="train")
    s.model.train()
    try:
        while state.within_budget(cfg):
            t0 = time.perf_counter()
            lr_mult = lr_multiplier(state.step, decay_progress(
                state.step, state.tokens, state.elapsed, cfg, s.tokens_per_step), cfg)
            s.opt.set_lr(lr_mult)
            loss = _optimizer_step(s, state.step)
            dt = time.perf_counter() - t0
            if s.d.world > 1 and cfg.max_time is not None:
                # rank 0's clock decides, so every rank agrees on the schedule and the last step
                dt = broadcast_float(dt, s.device)
            state.advance(s.tokens_per_step, dt)
            window.add(loss, s.tokens_per_step, dt)
            done = not state.within_budget(cfg)
            if state.step % cfg.log_interval == 0 or done:
                train_loss, tok_s = _close_window(s, window)
                bar.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{tok_s:,.0f}", refresh=False)
                _log(s, cfg.lr * lr_mult, train_loss, tok_s, on_eval, loggers, evaluate=done or (
                    cfg.eval_interval > 0 and state.step % cfg.eval_interval == 0))
            bar.update(1)
            if done or (cfg.ckpt_interval > 0 and state.step % cfg.ckpt_interval == 0):
                _save(s)
            if on_step:
                on_step(state.step)
        return _finish(s, train_loss, loggers, ran=state.step > start)
    finally:
        bar.close()
        if s.lock is not None:
            s.lock.release()


def _optimizer_step(s: Setup, step: int) -> torch.Tensor:
    """One optimizer step over ``grad_accum`` micro-batches of this rank's part of the global
    batch; returns the mean loss, still on the device."""
    cfg, d, device = s.cfg, s.d, s.device
    torch.manual_seed(_step_seed(cfg.seed, step, d.rank))  # dropout
    loss_sum = torch.zeros((), device=device)
    for micro in range(cfg.grad_accum):
        x, y, seg = s.data.train_batch(step, cfg.seed, s.global_batch, s.model_cfg.seq_len,
                                       part=micro * d.world + d.rank,
                                       parts=cfg.grad_accum * d.world)
        if device.type == "cuda":  # page-locked host memory makes the copy asynchronous
            x, y = x.pin_memory(), y.pin_memory()
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if seg is not None:
            seg = seg.to(device)
        sync = micro == cfg.grad_accum - 1
        if s.sharded:  # FSDP reduce-scatters gradients only after the last micro-batch
            s.model.set_requires_gradient_sync(sync)
        quiet = d.world > 1 and not sync and not s.sharded  # DDP: all-reduce on the last only
        with s.step_model.no_sync() if quiet else contextlib.nullcontext():
            with autocast(device, s.precision):
                _, loss = s.step_model(x, y, segments=seg)
            scaled = loss / cfg.grad_accum
            (s.scaler.scale(scaled) if s.scaler else scaled).backward()
        loss_sum += loss.detach()  # stays on the device: no host sync per micro-batch
    if s.scaler:
        for o in s.opt.opts:
            s.scaler.unscale_(o)
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(s.model.parameters(), cfg.grad_clip)
    if s.scaler:
        for o in s.opt.opts:
            s.scaler.step(o)  # skips the step when gradients overflowed
        s.scaler.update()
    else:
        s.opt.step()
    s.opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return loss_sum / cfg.grad_accum


def _step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**63 - 1)


def _close_window(s: Setup, window: LossWindow) -> tuple[float, float]:
    """(train loss averaged over the window and the ranks, tokens/s); a loss that is no
    longer finite stops the run."""
    mean, tok_s = window.close()
    if not math.isfinite(mean):
        raise MoorelmError(f"loss became {mean} by step {s.state.step}; lower the learning rate "
                           "(--lr) or use --dtype fp32")
    return all_mean(mean, s.d, s.device), tok_s


def _log(s: Setup, lr: float, train_loss: float, tok_s: float,
         on_eval: Callable[[dict], None] | None, loggers: list[MetricsLogger], *,
         evaluate: bool) -> None:
    """Append a metrics row (with the val loss when ``evaluate``), write metrics.csv and hand
    the row to the loggers."""
    state = s.state
    val = None
    if evaluate:
        val = state.val_loss = estimate_loss(s.run_model, s.data, s.cfg, s.model_cfg.seq_len,
                                             s.device, s.precision, s.d)
    row = metrics_row(state, lr, train_loss, val, s.bytes_per_token, tok_s,
                      mfu(s.flops_per_token, tok_s, s.peak_flops))
    if evaluate and on_eval:
        on_eval(row)
    state.history.append(row)
    if s.d.main:
        write_metrics(s.out / METRICS_FILE, state.history)
        for lg in loggers:
            lg.log(row)
        if evaluate:
            plot_loss(state.history, s.out / "loss.png", title=s.out.name)


def _save(s: Setup) -> None:
    checkpointing.save(s.out, s.state, s.model, s.opt, s.codec, d=s.d, sharded=s.sharded,
                       global_batch=s.global_batch, keep=s.cfg.keep_checkpoints)


def _finish(s: Setup, train_loss: float | None, loggers: list[MetricsLogger], *,
            ran: bool) -> TrainResult:
    state = s.state
    if not ran or state.val_loss is None:  # resumed a finished run, or no step was taken
        state.val_loss = estimate_loss(s.run_model, s.data, s.cfg, s.model_cfg.seq_len, s.device,
                                       s.precision, s.d)
        if state.step > 0 and not checkpointing.has_checkpoint(s.out):
            _save(s)
    if s.d.main and state.history:
        plot_loss(state.history, s.out / "loss.png", title=s.out.name)
    for lg in loggers:
        lg.finish(s.out / "loss.png" if state.history else None)
    fpt = s.flops_per_token
    return TrainResult(
        run_dir=s.out, step=state.step, tokens=state.tokens, elapsed=state.elapsed,
        train_loss=train_loss, val_loss=state.val_loss,
        val_bpb=bits_per_byte(state.val_loss, s.bytes_per_token),
        tokens_per_s=state.tokens / max(state.elapsed, 1e-9), params=s.params,
        flops_per_token=fpt, flops=fpt * state.tokens, history=state.history,
    )
