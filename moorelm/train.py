"""The training loop: step, evaluate, checkpoint, resume, distributed.

    moorelm train --out runs/NAME [--preset P] [--recipe R] [--corpus C] [--max-time 300] ...
    torchrun --nproc_per_node=N -m moorelm train ...          (DistributedDataParallel)

``pretrain()`` is the whole job (corpus -> prepared data -> configs -> ``train``); ``train()``
is the loop on an already prepared dataset, which fine-tuning and the scaling ladder reuse.

Determinism: the batch of step s is a pure function of (seed, s) (see data.py) and dropout is
reseeded from (seed, s, rank) every step, so a resumed run repeats the uninterrupted one
exactly on CPU. Under torchrun every rank takes a disjoint slice of the same global batch;
only rank 0 writes logs and checkpoints.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from moorelm.atomic import atomic_write_text
from moorelm.codecs import codec_for, load_gpt_weights
from moorelm.config import ModelConfig, TrainConfig, build_configs, with_vocab
from moorelm.corpus import load_corpus
from moorelm.data import (
    PrepareOptions,
    TokenData,
    bits_per_byte,
    dataset_fingerprint,
    default_data_dir,
    prepare,
    read_manifest,
)
from moorelm.device import (
    autocast,
    choose_precision,
    device_name,
    mfu,
    peak_flops,
    peak_memory_bytes,
    resolve_device,
    setup_device,
)
from moorelm.errors import MoorelmError
from moorelm.model import GPT
from moorelm.optim import build_optimizer, decay_progress, lr_multiplier
from moorelm.plots import plot_loss
from moorelm.run import RunFolder, load_optimizer_state, optimizer_state
from moorelm.tokenizer import Tokenizer

METRIC_FIELDS = ["step", "tokens", "lr", "train_loss", "val_loss", "val_bpb", "tokens_per_s",
                 "elapsed", "mfu"]


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


# ----------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_req: str) -> tuple[Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), resolve_device(device_req)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    base = resolve_device(device_req)
    device = torch.device("cuda", local) if base.type == "cuda" else base
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return Dist(rank, world, local), device


def _broadcast_float(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(t, 0)
    return float(t.item())


def _all_mean(value: float, d: Dist, device: torch.device) -> float:
    if d.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / d.world


# FSDP2 (``fully_shard``): each block is one unit whose parameters, gradients and optimizer
# state live sharded across ranks (dim 0) and are all-gathered only for its forward/backward.
# Checkpoints stay in the single-process format: shards are gathered into full tensors on
# save, and full tensors are loaded before sharding (weights) or cut into shards (optimizer
# state) on resume, so a run resumes under any world size, with or without FSDP.


def _fully_shard(model: GPT, device: torch.device, d: Dist) -> None:
    """Shard ``model`` in place over all ranks (moves the shards to ``device``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (d.world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the rest: embeddings, final norm, head


def _batch(batch: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(inputs, targets) or (inputs, targets, segments) from a data source; segments mark
    the sequences packed into a row (``GPT.forward``), as fine-tuning data gives them."""
    return (batch[0], batch[1], batch[2] if len(batch) > 2 else None)


def _is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(getattr(model, "_orig_mod", model), FSDPModule)


def _gather(t: Any) -> Any:
    """A DTensor shard -> the full tensor on CPU (a collective: every rank must call it)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor().cpu() if isinstance(t, DTensor) else t


def _full_optimizer_state(opt: torch.optim.Optimizer) -> dict:
    sd = opt.state_dict()
    # every rank walks the same params and keys in the same order, so the gathers pair up
    sd["state"] = {pid: {k: _gather(v) for k, v in st.items()} for pid, st in sd["state"].items()}
    return sd


def _shard_like_params(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> dict:
    """Full optimizer tensors ("pid.key") -> shards laid out like their (sharded) parameters."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for g in opt.param_groups for p in g["params"]]
    out = {}
    for name, t in tensors.items():
        p = params[int(name.split(".", 1)[0])]
        if isinstance(p, DTensor) and t.shape == p.shape:
            # every rank read the same full tensor, so each just keeps its own slice
            t = distribute_tensor(t.to(p.device_mesh.device_type), p.device_mesh, p.placements,
                                  src_data_rank=None)
        out[name] = t
    return out


# ----------------------------------------------------------------------------- helpers


def _step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**63 - 1)


def _read_metrics(path: Path, upto_step: int) -> list[dict]:
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


def _write_metrics(path: Path, rows: list[dict]) -> None:
    lines = [",".join(METRIC_FIELDS)]
    for r in rows:
        lines.append(",".join(str(r.get(k, "")) for k in METRIC_FIELDS))
    atomic_write_text(path, "\n".join(lines) + "\n")


def _fmt(x: float | None, nd: int = 4) -> str:
    return "" if x is None else f"{x:.{nd}f}"


@torch.no_grad()
def estimate_loss(model: torch.nn.Module, data: TokenData, cfg: TrainConfig, seq_len: int,
                  device: torch.device, precision, d: Dist = Dist()) -> float:
    """Mean val loss over ``eval_iters`` fixed batches (the same windows for every run)."""
    was = model.training
    model.eval()
    total, n = 0.0, 0
    # a sharded model's forward is a collective, so then every rank runs the same number of
    # batches (a rank past the end repeats a batch without counting it)
    rounds = -(-cfg.eval_iters // d.world) if _is_sharded(model) else None
    stop = rounds * d.world if rounds else cfg.eval_iters
    for i in range(d.rank, stop, d.world):
        x, y, seg = _batch(data.val_batch(i % cfg.eval_iters, cfg.eval_batch_size or cfg.batch_size,
                                          seq_len))
        with autocast(device, precision):
            _, loss = model(x.to(device), y.to(device),
                            segments=None if seg is None else seg.to(device))
        if i < cfg.eval_iters:
            total += float(loss)
            n += 1
    model.train(was)
    if d.world > 1:
        t = torch.tensor([total, n], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        total, n = float(t[0]), int(t[1])
    return total / max(1, n)


# ----------------------------------------------------------------------------- the loop


def train(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    data: TokenData | str | Path,
    out_dir: str | Path,
    *,
    resume: bool = False,
    run_meta: dict[str, Any] | None = None,
    init_weights: dict[str, torch.Tensor] | None = None,
    progress: bool = True,
    on_eval: Callable[[dict], None] | None = None,
    model_hook: Callable[[GPT], None] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train ``model_cfg`` on a prepared dataset into the run folder ``out_dir``.

    ``data`` is a dataset folder or any object with ``TokenData``'s sampling interface (the
    fine-tuning set ``moorelm.finetune.sft.SFTData`` is one). ``model_hook`` changes the model
    in place after ``init_weights`` are loaded and before the optimizer sees it (LoRA wraps
    layers and freezes the base there); checkpoints hold the changed model's state.
    """
    data = TokenData(data) if isinstance(data, (str, Path)) else data
    out = Path(out_dir)
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
    run = RunFolder(out)
    if d.main:
        run.check_new(resume)
        held = run.lock()  # noqa: F841  (held until train() returns)

    torch.manual_seed(cfg.seed)
    model = GPT(model_cfg)
    if init_weights is not None:
        load_gpt_weights(model, init_weights, "initial weights")
    if model_hook is not None:
        model_hook(model)
    last = run.latest() if resume else None
    if last is not None:  # full weights go in before the model is moved or sharded
        run.load_into(model, last)
    sharded = cfg.fsdp and d.world > 1
    if sharded and precision.use_scaler:
        # fp16 loss scaling must agree across shards on overflow; not wired up for FSDP2
        raise MoorelmError("--fsdp does not support fp16 (loss scaling); use --dtype bf16 "
                           "(GPUs since Ampere) or --dtype fp32")
    if cfg.fsdp and not sharded and not resume:
        warnings.warn("--fsdp shards across processes; with one process it has no effect "
                      "(launch with torchrun --nproc_per_node=N)", stacklevel=2)
    if sharded:
        _fully_shard(model, device, d)
    else:
        model.to(device)
    opt = build_optimizer(model, cfg, device.type)

    step, tokens, elapsed = 0, 0, 0.0
    history: list[dict] = []
    if last is not None:
        state = run.read_state(last)
        tensors = run.read_optimizer(last, "cpu" if sharded else device)
        metas = state["optimizer"]
        by_opt: list[dict[str, torch.Tensor]] = [{} for _ in opt.opts]
        for name, t in tensors.items():
            i, rest = name.split("/", 1)
            by_opt[int(i)][rest] = t
        for o, ts, meta in zip(opt.opts, by_opt, metas):
            load_optimizer_state(o, _shard_like_params(o, ts) if sharded else ts, meta)
        step, tokens, elapsed = state["step"], state["tokens"], state["elapsed"]
        saved_batch = state.get("global_batch")
        now_batch = cfg.batch_size * cfg.grad_accum * d.world
        if d.main and saved_batch and saved_batch != now_batch:
            warnings.warn(
                f"resuming with a global batch of {now_batch} sequences (batch_size x grad_accum "
                f"x {d.world} processes) where the run used {saved_batch}; set --grad-accum to "
                "keep it", stacklevel=2)
        history = _read_metrics(out / "metrics.csv", step)

    run_model: torch.nn.Module = model
    if cfg.compile:
        run_model = torch.compile(model)
    ddp_model = run_model
    if d.world > 1 and not sharded:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp_model = DDP(run_model, device_ids=[device.index] if device.type == "cuda" else None)

    T = model_cfg.seq_len
    global_batch = cfg.batch_size * cfg.grad_accum * d.world
    tokens_per_step = global_batch * T
    params = model.param_counts()
    fpt = model.flops_per_token(T)
    peak = peak_flops(device, cfg.peak_flops)
    bpt = data.bytes_per_token("val")

    config_json = {
        "model": model_cfg.to_dict(),
        "train": cfg.to_dict(),
        "data": {"dir": str(data.folder.resolve()), "fingerprint": data.manifest["fingerprint"],
                 "corpus": data.manifest["corpus"], "tokenizer": data.manifest["tokenizer"]},
        "params": params,
        "world_size": d.world,
        "fsdp": sharded,
        **(run_meta or {}),
    }
    if d.main:
        tok = Tokenizer.load(data.tokenizer_path)
        run.write_files(config_json, tok)
    codec = codec_for(config_json)  # how this kind of model is saved

    def save(at_step: int) -> None:
        if not (d.main or sharded):  # sharded: every rank takes part in gathering
            return
        opt_tensors: dict[str, torch.Tensor] = {}
        metas = []
        for i, o in enumerate(opt.opts):
            ts, meta = optimizer_state(o, _full_optimizer_state(o) if sharded else None)
            opt_tensors.update({f"{i}/{k}": v for k, v in ts.items()})
            metas.append(meta)
        files = codec.checkpoint_files(
            model, {k: _gather(v) for k, v in model.state_dict().items()} if sharded else None)
        if not d.main:
            return
        state = {"tokens": tokens, "elapsed": elapsed, "optimizer": metas,
                 "val_loss": last_val, "world_size": d.world, "global_batch": global_batch}
        run.save(at_step, files, state, opt_tensors, keep=cfg.keep_checkpoints)

    def evaluate_and_log(train_loss: float | None, tok_s: float) -> dict:
        nonlocal last_val
        val = estimate_loss(run_model, data, cfg, T, device, precision, d)
        last_val = val
        row = {"step": step, "tokens": tokens, "lr": f"{current_lr:.3e}",
               "train_loss": _fmt(train_loss), "val_loss": _fmt(val),
               "val_bpb": _fmt(bits_per_byte(val, bpt)), "tokens_per_s": f"{tok_s:.1f}",
               "elapsed": f"{elapsed:.2f}", "mfu": _fmt(mfu(fpt, tok_s, peak))}
        return row

    last_val: float | None = None
    current_lr = cfg.lr
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not (progress and d.main),
               unit="step", dynamic_ncols=True, desc="train")
    model.train()
    recent: list[torch.Tensor] = []
    window_tokens, window_time = 0, 0.0
    last_train: float | None = None
    tok_s = 0.0

    def budget_left() -> bool:
        if cfg.max_steps is not None and step >= cfg.max_steps:
            return False
        if cfg.max_tokens is not None and tokens >= cfg.max_tokens:
            return False
        if cfg.max_time is not None and elapsed >= cfg.max_time:
            return False
        return True

    try:
        while budget_left():
            t0 = time.perf_counter()
            mult = lr_multiplier(step, decay_progress(step, tokens, elapsed, cfg, tokens_per_step), cfg)
            opt.set_lr(mult)
            current_lr = cfg.lr * mult
            torch.manual_seed(_step_seed(cfg.seed, step, d.rank))
            loss_sum = torch.zeros((), device=device)
            for micro in range(cfg.grad_accum):
                x, y, seg = _batch(data.train_batch(step, cfg.seed, global_batch, T,
                                                    part=micro * d.world + d.rank,
                                                    parts=cfg.grad_accum * d.world))
                if device.type == "cuda":  # page-locked host memory makes the copy asynchronous
                    x, y = x.pin_memory(), y.pin_memory()
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                if seg is not None:
                    seg = seg.to(device)
                sync = micro == cfg.grad_accum - 1
                if sharded:  # FSDP reduce-scatters gradients only after the last micro-batch
                    model.set_requires_gradient_sync(sync)
                ctx = ddp_model.no_sync() if (d.world > 1 and not sync and not sharded) else _null()
                with ctx:
                    with autocast(device, precision):
                        _, loss = ddp_model(x, y, segments=seg)
                    scaled = loss / cfg.grad_accum
                    (scaler.scale(scaled) if scaler else scaled).backward()
                loss_sum += loss.detach()  # stays on the device: no host sync per micro-batch
            if scaler:
                for o in opt.opts:
                    scaler.unscale_(o)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if scaler:
                for o in opt.opts:
                    scaler.step(o)  # skips the step when gradients overflowed
                scaler.update()
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            if d.world > 1 and cfg.max_time is not None:
                # rank 0's clock decides, so every rank agrees on the schedule and the last step
                dt = _broadcast_float(dt, device)
            step += 1
            tokens += tokens_per_step
            elapsed += dt
            window_tokens += tokens_per_step
            window_time += dt
            recent.append(loss_sum / cfg.grad_accum)

            done = not budget_left()
            if step % cfg.log_interval == 0 or done:
                mean_loss = float(torch.stack(recent).mean())  # one host sync per log line
                if not math.isfinite(mean_loss):
                    raise MoorelmError(
                        f"loss became {mean_loss} by step {step}; lower the learning rate "
                        "(--lr) or use --dtype fp32"
                    )
                last_train = _all_mean(mean_loss, d, device)
                tok_s = window_tokens / max(window_time, 1e-9)
                recent, window_tokens, window_time = [], 0, 0.0
                bar.set_postfix(loss=f"{last_train:.4f}", tok_s=f"{tok_s:,.0f}", refresh=False)
                eval_now = done or (cfg.eval_interval > 0 and step % cfg.eval_interval == 0)
                if eval_now:
                    row = evaluate_and_log(last_train, tok_s)
                    if on_eval:
                        on_eval(row)
                else:
                    row = {"step": step, "tokens": tokens, "lr": f"{current_lr:.3e}",
                           "train_loss": _fmt(last_train), "val_loss": "", "val_bpb": "",
                           "tokens_per_s": f"{tok_s:.1f}", "elapsed": f"{elapsed:.2f}",
                           "mfu": _fmt(mfu(fpt, tok_s, peak))}
                history.append(row)
                if d.main:
                    _write_metrics(out / "metrics.csv", history)
                    if eval_now:
                        plot_loss(history, out / "loss.png", title=out.name)
            bar.update(1)
            if done or (cfg.ckpt_interval > 0 and step % cfg.ckpt_interval == 0):
                save(step)
            if on_step:
                on_step(step)  # after the checkpoint: a callback that raises simulates a crash
    finally:
        bar.close()

    if step == 0 or last_val is None:  # resumed a finished run, or no step was taken
        last_val = estimate_loss(run_model, data, cfg, T, device, precision, d)
        if step > 0 and not run.checkpoints():
            save(step)
    if d.main and history:
        plot_loss(history, out / "loss.png", title=out.name)
    return TrainResult(
        run_dir=out, step=step, tokens=tokens, elapsed=elapsed, train_loss=last_train,
        val_loss=last_val, val_bpb=bits_per_byte(last_val, bpt), tokens_per_s=tokens / max(elapsed, 1e-9),
        params=params, flops_per_token=fpt, flops=fpt * tokens, history=history,
    )


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ----------------------------------------------------------------------------- the whole job


def prepare_data(corpus: str | None, tokenizer: str = "char", vocab_size: int = 4096,
                 val_frac: float = 0.1, data_dir: str | Path | None = None,
                 text_field: str = "text", extensions: tuple[str, ...] | None = None,
                 plays: list[str] | None = None, progress: bool = True) -> TokenData:
    """Open ``data_dir`` when given, else prepare the corpus into the cache (or reuse it)."""
    if data_dir is not None and corpus is None:
        return TokenData(data_dir)
    kw = {"text_field": text_field, "plays": plays}
    if extensions:
        kw["extensions"] = extensions
    c = load_corpus(corpus, **kw)
    opts = PrepareOptions(tokenizer=tokenizer, vocab_size=vocab_size, val_frac=val_frac)
    folder = Path(data_dir) if data_dir else default_data_dir(c, opts)
    if int(os.environ.get("RANK", "0")) == 0:
        prepare(c, folder, opts, progress=progress)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # other ranks wait until rank 0 has written this dataset (an older one in the same
        # folder has another fingerprint)
        fp = dataset_fingerprint(c, opts)
        while (read_manifest(folder, missing_ok=True) or {}).get("fingerprint") != fp:
            time.sleep(0.2)
    return TokenData(folder)


def pretrain(
    out: str | Path,
    *,
    corpus: str | None = None,
    data_dir: str | Path | None = None,
    tokenizer: str = "char",
    vocab_size: int = 4096,
    val_frac: float = 0.1,
    preset: str | None = None,
    recipe: str | None = None,
    model_overrides: dict[str, Any] | None = None,
    train_overrides: dict[str, Any] | None = None,
    resume: bool = False,
    text_field: str = "text",
    extensions: tuple[str, ...] | None = None,
    plays: list[str] | None = None,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Corpus -> tokenizer and token shards -> configs -> trained run folder."""
    out = Path(out)
    if resume:
        saved = RunFolder(out).read_config()
        RunFolder(out).latest()  # fail early and clearly when there is nothing to resume
        model_cfg = ModelConfig.from_dict(saved["model"])
        t = dict(saved["train"])
        t.update({k: v for k, v in (train_overrides or {}).items() if v is not None})
        cfg = TrainConfig.from_dict(t)
        data = TokenData(saved["data"]["dir"]) if data_dir is None and corpus is None else \
            prepare_data(corpus, tokenizer, vocab_size, val_frac, data_dir, text_field,
                         extensions, plays, progress)
        if data.manifest["fingerprint"] != saved["data"]["fingerprint"]:
            raise MoorelmError(f"the dataset differs from the one {out} was trained on; resume with the same corpus")
        meta = {k: v for k, v in saved.items() if k not in ("model", "train", "data", "params", "world_size")}
        return train(model_cfg, cfg, data, out, resume=True, run_meta=meta, progress=progress,
                     on_step=on_step)

    # validate every flag before the (possibly long) data preparation
    model_cfg, cfg = build_configs(preset=preset, recipe=recipe, model_overrides=model_overrides,
                                   train_overrides=train_overrides)
    data = prepare_data(corpus, tokenizer, vocab_size, val_frac, data_dir, text_field,
                        extensions, plays, progress)
    model_cfg = with_vocab(model_cfg, data.vocab_size)
    from moorelm.config import DEFAULT_RECIPE

    meta = {"recipe": recipe or DEFAULT_RECIPE, "preset": preset}
    return train(model_cfg, cfg, data, out, run_meta=meta, progress=progress, on_step=on_step)


def describe(result: TrainResult) -> str:
    p = result.params
    return (
        f"{result.step} steps, {result.tokens:,} tokens in {result.elapsed:.1f}s "
        f"({result.tokens_per_s:,.0f} tokens/s); val loss {result.val_loss:.4f}, "
        f"{result.val_bpb:.3f} bits/byte; {p['total']:,} parameters "
        f"({p['non_embedding']:,} non-embedding)"
    )


__all__ = ["TrainResult", "train", "pretrain", "prepare_data", "estimate_loss", "describe",
           "device_name", "peak_memory_bytes"]
