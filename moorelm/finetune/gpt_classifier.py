"""Text classification on moorelm's own GPTs: the pretrained trunk plus a linear head.

    finetune_gpt_classifier("runs/base", "train.csv", "runs/clf")   # a moorelm run folder
    classify_gpt("runs/clf", ["a text", ...])   # [{"label": ..., "score": ...}, ...]

The model (``GPTClassifier``)::

    text -> ids + <|endoftext|> -> GPT blocks -> final norm -> hidden (B, T, C)
         -> pool -> score (Linear C -> K) -> logits (B, K)

Pooling ``last`` (default) takes the hidden state of the last real token. Every text is
followed by the end-of-text token, so that token is always the one pooled: in pretraining it
closes every document, and it has attended to the whole text. ``mean`` averages the hidden
states of the text's tokens instead. Batches are right-padded; attention is causal, so padding
after a token never changes that token's hidden state and no padding mask is needed.

The trunk is ``moorelm.model.GPT`` itself: ``GPT.hidden_states`` is its forward pass up to the
final norm, without the language-model head.

Training is a small plain loop, not ``moorelm.training.loop.train``: that loop trains a language model
on token windows and builds its own ``GPT``; a classifier needs a head, one label per
variable-length text, and evaluation by macro-F1 each epoch that keeps the best state and
stops early. It reuses moorelm's AdamW parameter groups and warmup + cosine schedule, and
``moorelm.classify``'s data reading and checks, splits and metrics, so the inputs, the checks
and the returned summary are those of the Hugging Face backend
(``moorelm.classify.train.finetune_classifier``).

The output is a moorelm run folder: config.json (``"model"`` and a ``"classifier"`` section
with labels, pooling and max_length), tokenizer.json, checkpoints/step-N/model.safetensors
(the trunk's tensors plus ``score.weight``/``score.bias``, written by ``ClassifierCodec``
through ``moorelm.run.RunFolder``), metrics.json and confusion_matrix.png.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from moorelm.atomic import atomic_write_json, check_writable
from moorelm.classify.data import check_settings, label_maps, prepare_splits
from moorelm.classify.metrics import (
    CONFUSION_FILE,
    METRICS_FILE,
    classification_metrics,
    format_summary,
    run_record,
    save_confusion_png,
    say,
    warn_truncated,
)
from moorelm.codecs import (
    MODEL_FILE,
    CheckpointFiles,
    Files,
    Header,
    build_gpt,
    check_gpt_header,
    kind_metadata,
    load_gpt_weights,
    model_tensors,
    register_codec,
)
from moorelm.config import ModelConfig, TrainConfig
from moorelm.device import resolve_device
from moorelm.errors import MoorelmError
from moorelm.model import GPT
from moorelm.optim import build_optimizer, decay_progress, lr_multiplier
from moorelm.run import RunFolder
from moorelm.tokenizer import Tokenizer

POOLINGS = ("last", "mean")


def is_moorelm_run(path: str | os.PathLike | None) -> bool:
    """True for a moorelm run folder (config.json with a "model" section), e.g. to choose
    between this backend and the Hugging Face one."""
    return path is not None and RunFolder(path).is_run()


class GPTClassifier(nn.Module):
    """A GPT trunk with a linear classification head on a pooled hidden state."""

    def __init__(self, gpt: GPT, n_labels: int, pooling: str = "last"):
        super().__init__()
        if pooling not in POOLINGS:
            raise MoorelmError(f"pooling {pooling!r} is not valid; choose one of: {', '.join(POOLINGS)}")
        self.gpt = gpt
        self.pooling = pooling
        self.score = nn.Linear(gpt.config.n_embd, n_labels)
        nn.init.normal_(self.score.weight, std=gpt.config.init_std)
        nn.init.zeros_(self.score.bias)

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """idx (B, T) right-padded, lengths (B,) real tokens per row -> logits (B, K)."""
        h = self.gpt.hidden_states(idx)  # (B, T, C)
        if self.pooling == "last":
            pooled = h[torch.arange(h.shape[0], device=h.device), lengths - 1]  # (B, C)
        else:
            keep = (torch.arange(h.shape[1], device=h.device)[None, :] < lengths[:, None])  # (B, T)
            pooled = (h * keep[..., None]).sum(1) / lengths[:, None].to(h.dtype)  # (B, C)
        return self.score(pooled)


class ClassifierCodec:
    """The run folder codec of a GPT classifier: model.safetensors holds the trunk's tensors
    and the head's as ``score.weight``/``score.bias``; config.json's "classifier" section
    gives the labels and pooling."""

    kind = "classifier"
    files = (MODEL_FILE,)

    def __init__(self, config: dict):
        spec = config.get("classifier")
        if not isinstance(spec, dict) or not isinstance(spec.get("labels"), list) \
                or len(spec["labels"]) < 2:
            raise MoorelmError("config.json's 'classifier' section needs a list of at least two "
                               "labels; the run is damaged")
        self.n_labels, self.pooling = len(spec["labels"]), spec.get("pooling", "last")

    def checkpoint_files(self, model: nn.Module,
                         state: dict[str, torch.Tensor] | None = None) -> CheckpointFiles:
        tensors = {**model_tensors(model.gpt),
                   **{f"score.{k}": v.detach().cpu().contiguous()
                      for k, v in model.score.state_dict().items()}}
        return {MODEL_FILE: (tensors, kind_metadata(self.kind))}

    def check(self, cfg: ModelConfig, headers: dict[str, Header], checkpoint: Path) -> None:
        head = {"score.weight": (self.n_labels, cfg.n_embd), "score.bias": (self.n_labels,)}
        try:
            check_gpt_header(cfg, headers[MODEL_FILE], checkpoint / MODEL_FILE, extra=head)
        except MoorelmError as e:
            if "score." in str(e):
                raise MoorelmError(f"{checkpoint / MODEL_FILE} has no classification head "
                                   f"matching {self.n_labels} labels") from None
            raise

    def _split(self, files: Files) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        tensors = dict(files[MODEL_FILE])
        head = {k.split(".", 1)[1]: tensors.pop(k) for k in [k for k in tensors if k.startswith("score.")]}
        return tensors, head

    def from_files(self, cfg: ModelConfig, files: Files) -> GPTClassifier:
        trunk, head = self._split(files)
        model = GPTClassifier(build_gpt(cfg, trunk, MODEL_FILE), self.n_labels, self.pooling)
        model.score.load_state_dict(head)
        return model

    def load_files(self, model: nn.Module, files: Files) -> None:
        trunk, head = self._split(files)
        load_gpt_weights(model.gpt, trunk, MODEL_FILE)
        model.score.load_state_dict(head)


register_codec(ClassifierCodec.kind, ClassifierCodec)


def _encode(tok: Tokenizer, texts: Sequence[str], max_length: int) -> tuple[list[list[int]], int]:
    """Token ids + end-of-text per text, cut to ``max_length``; also the number cut."""
    out, cut = [], 0
    for ids in tok.encode_batch(list(texts)):
        if len(ids) > max_length - 1:
            ids, cut = ids[: max_length - 1], cut + 1
        out.append(ids + [tok.eot_id])
    return out, cut


def _batch(rows: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    idx = torch.full((len(rows), int(lengths.max())), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        idx[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return idx.to(device), lengths.to(device)


@torch.no_grad()
def _predict(model: GPTClassifier, rows: list[list[int]], pad: int, device: torch.device,
             batch_size: int) -> torch.Tensor:
    """Softmax probabilities (N, K), batching rows of similar length together."""
    was = model.training
    model.eval()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    probs = torch.empty(len(rows), model.score.out_features)
    for start in range(0, len(order), batch_size):
        chunk = order[start: start + batch_size]
        idx, lengths = _batch([rows[i] for i in chunk], pad, device)
        probs[chunk] = model(idx, lengths).float().softmax(-1).cpu()
    model.train(was)
    return probs


@dataclass
class _Fit:
    """What the training loop left: the best evaluation's macro-F1, step and weights (on the
    CPU), the steps taken, why it stopped, and the training time."""

    best_f1: float
    best_step: int
    best_state: dict[str, torch.Tensor]
    steps: int
    stopped_early: bool
    time_limit_hit: bool
    train_time: float


def _train_loop(model: GPTClassifier, train_rows: list[list[int]], y_train: list[int],
                eval_rows: list[list[int]], y_eval: list[int], names: list[str],
                dev: torch.device, *, pad: int, epochs: float, lr: float, batch_size: int,
                seed: int, max_steps: int | None, time_limit_s: float | None,
                eval_steps: int | None, warmup_ratio: float, weight_decay: float,
                early_stopping_patience: int | None, bf16: bool, progress: bool) -> _Fit:
    """Train every parameter on shuffled batches (AdamW, warm-up then cosine to lr/10),
    evaluating each epoch or every ``eval_steps`` and keeping the best state by macro-F1."""
    steps_per_epoch = math.ceil(len(train_rows) / batch_size)
    total = max_steps or max(1, math.ceil(epochs * steps_per_epoch))
    every = eval_steps or steps_per_epoch
    tcfg = TrainConfig(optimizer="adamw", lr=lr, min_lr=lr / 10, weight_decay=weight_decay,
                       warmup_steps=int(warmup_ratio * total), schedule="cosine", max_steps=total)
    opt = build_optimizer(model, tcfg, dev.type)
    rng = random.Random(seed)
    order: list[int] = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    evals_since_best, step, stopped_early, time_hit = 0, 0, False, False
    started = time.perf_counter()
    model.train()
    while step < total:
        if not order:
            order = list(range(len(train_rows)))
            rng.shuffle(order)
        chunk, order = order[:batch_size], order[batch_size:]
        opt.set_lr(lr_multiplier(step, decay_progress(step, 0, 0.0, tcfg, 0), tcfg))
        idx, lengths = _batch([train_rows[i] for i in chunk], pad, dev)
        labels = torch.tensor([y_train[i] for i in chunk], device=dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(idx, lengths).float(), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        time_hit = time_limit_s is not None and time.perf_counter() - started >= time_limit_s
        if step % every == 0 or step == total or time_hit:
            pred = _predict(model, eval_rows, pad, dev, max(batch_size, 64)).argmax(-1)
            f1 = classification_metrics(y_eval, pred.tolist(), names)["macro_f1"]
            say(progress, f"step {step}/{total}: loss {float(loss.detach()):.4f}, eval macro-F1 {f1:.4f}")
            if best is None or f1 > best[0]:
                best = (f1, step, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
                evals_since_best = 0
            else:
                evals_since_best += 1
                if early_stopping_patience and evals_since_best >= early_stopping_patience:
                    stopped_early = True
                    break
            if time_hit:
                break
    assert best is not None
    return _Fit(best[0], best[1], best[2], step, stopped_early, time_hit,
                time.perf_counter() - started)


def finetune_gpt_classifier(
    run_dir: str | os.PathLike,
    train_file: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    eval_file: str | os.PathLike | None = None,
    text_column: str = "text",
    label_column: str = "label",
    epochs: float = 3.0,
    lr: float = 3e-4,
    batch_size: int = 32,
    max_length: int | None = None,
    seed: int = 0,
    eval_fraction: float = 0.1,
    early_stopping_patience: int | None = 2,
    max_train_rows: int | None = None,
    progress: bool = True,
    max_steps: int | None = None,
    time_limit_s: float | None = None,
    eval_steps: int | None = None,
    bf16: bool = False,
    warmup_ratio: float = 0.1,
    weight_decay: float = 0.01,
    pooling: str = "last",
    device: str = "auto",
) -> dict[str, Any]:
    """Fine-tune a moorelm run (its newest checkpoint) with a classification head.

    Arguments and the returned metrics mirror
    ``moorelm.classify.train.finetune_classifier``; ``max_length`` defaults to the model's
    context length (texts are cut to it, end-of-text included, and counted in one warning). Evaluation runs each epoch (or every ``eval_steps``); the best
    state by macro-F1 is saved. All parameters are trained (AdamW, warmup then cosine to
    lr/10; weight decay on the hidden matrices).
    """
    check_settings(batch_size=batch_size, epochs=epochs, lr=lr, max_steps=max_steps,
                   time_limit_s=time_limit_s)
    if pooling not in POOLINGS:
        raise MoorelmError(f"pooling {pooling!r} is not valid; choose one of: {', '.join(POOLINGS)}")
    run_dir, out = Path(run_dir), Path(out_dir)
    if out.exists() and not out.is_dir():
        raise MoorelmError(f"{out} exists and is not a folder")
    if out.exists() and out.resolve() == run_dir.resolve():
        raise MoorelmError(f"--out {out} is the base run itself; choose a new folder")
    if is_moorelm_run(out) and "classifier" not in RunFolder(out).read_config():
        raise MoorelmError(f"{out} holds a language-model run; choose a new folder for the classifier")
    check_writable(out)  # the classifier is written only after training

    # ---- data: every check before any weights are loaded
    d = prepare_splits(train_file, eval_file, text_column, label_column,
                       eval_fraction=eval_fraction, seed=seed, max_train_rows=max_train_rows,
                       progress=progress)
    train, eval_data, names = d.train, d.eval, d.names

    # ---- base model
    base_run = RunFolder(run_dir)
    if "classifier" in base_run.read_config():
        raise MoorelmError(f"{run_dir} is already a classifier; start from a language-model run")
    base = base_run.load()
    model_cfg = base.model.config
    max_length = max_length or model_cfg.seq_len
    if not 2 <= max_length <= model_cfg.seq_len:
        raise MoorelmError(f"max_length must be between 2 and the model's context length "
                           f"{model_cfg.seq_len}, got {max_length}")
    tok = base.tokenizer
    dev = resolve_device(device)
    torch.manual_seed(seed)
    model = GPTClassifier(base.model.train(), len(names), pooling).to(dev)
    _, label2id = label_maps(names)

    train_rows, train_cut = _encode(tok, train.texts, max_length)
    eval_rows, eval_cut = _encode(tok, eval_data.texts, max_length)
    warn_truncated(max_length, (train_cut, len(train), "train"),
                   (eval_cut, len(eval_data), "eval"), stacklevel=2)
    y_train = [label2id[y] for y in train.labels]
    y_eval = [label2id[y] for y in eval_data.labels]

    # ---- the loop
    fit = _train_loop(model, train_rows, y_train, eval_rows, y_eval, names, dev,
                      pad=tok.eot_id, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                      max_steps=max_steps, time_limit_s=time_limit_s, eval_steps=eval_steps,
                      warmup_ratio=warmup_ratio, weight_decay=weight_decay,
                      early_stopping_patience=early_stopping_patience,
                      bf16=bf16 and dev.type == "cuda", progress=progress)
    model.load_state_dict(fit.best_state)

    # ---- save the best state as a run folder, then score it
    probs = _predict(model, eval_rows, tok.eot_id, dev, max(batch_size, 64))
    metrics = classification_metrics(y_eval, probs.argmax(-1).tolist(), names)
    config = {
        "model": model_cfg.to_dict(),
        "classifier": {"labels": names, "pooling": pooling, "max_length": max_length,
                       "text_column": train.text_column},
        "finetune": {"method": "classifier", "base_run": str(run_dir.resolve()),
                     "base_step": base.state["step"]},
        "params": {"total": sum(p.numel() for p in model.parameters())},
    }
    run = RunFolder(out)
    run.write_files(config, tok)
    run.save(fit.best_step, ClassifierCodec(config).checkpoint_files(model),
             {"tokens": 0, "elapsed": fit.train_time, "best_macro_f1": fit.best_f1})
    result = run_record(
        backend="moorelm-gpt", model=str(run_dir), splits=d, eval_file=eval_file,
        max_length=max_length, truncated={"train": train_cut, "eval": eval_cut},
        metrics=metrics, train_time=fit.train_time, steps=fit.steps,
        epochs_run=fit.steps / math.ceil(len(train_rows) / batch_size), best_f1=fit.best_f1,
        stopped_early=fit.stopped_early, time_limit_hit=fit.time_limit_hit, out=out,
        best_step=fit.best_step,
        hyperparameters={
            "epochs": epochs, "lr": lr, "batch_size": batch_size, "max_length": max_length,
            "seed": seed, "eval_fraction": None if eval_file else eval_fraction,
            "early_stopping_patience": early_stopping_patience, "max_train_rows": max_train_rows,
            "max_steps": max_steps, "time_limit_s": time_limit_s,
            "eval_strategy": f"every {eval_steps} steps" if eval_steps else "every epoch",
            "bf16": bf16 and dev.type == "cuda", "warmup_ratio": warmup_ratio,
            "weight_decay": weight_decay, "pooling": pooling,
            "torch_threads": torch.get_num_threads(),
        })
    metrics_path = out / METRICS_FILE
    atomic_write_json(metrics_path, result)
    png = save_confusion_png(metrics["confusion_matrix"], names, out / CONFUSION_FILE,
                             title=f"accuracy {metrics['accuracy']:.3f}, macro-F1 "
                             f"{metrics['macro_f1']:.3f} ({len(eval_data)} eval rows)")
    result["metrics_path"] = str(metrics_path)
    result["confusion_png"] = str(png)
    say(progress, format_summary(result))
    return result


def load_gpt_classifier(run_dir: str | os.PathLike, device: str = "auto") -> tuple[GPTClassifier, Tokenizer, dict]:
    """(classifier in eval mode, tokenizer, run config) of a folder made by
    ``finetune_gpt_classifier``."""
    run = RunFolder(run_dir)
    cfg = run.read_config()
    if not cfg.get("classifier"):
        raise MoorelmError(f"{run_dir} is a language-model run, not a classifier; fine-tune one "
                           "first (moorelm finetune-classifier --model RUN)")
    loaded = run.load(resolve_device(device), codec=ClassifierCodec(cfg))
    return loaded.model, loaded.tokenizer, cfg


def classify_gpt(
    run_dir: str | os.PathLike,
    texts: list[str],
    *,
    batch_size: int = 64,
    max_length: int | None = None,
    device: str = "auto",
) -> list[dict[str, Any]]:
    """Label each text with a GPT classifier: ``[{"label": str, "score": float}, ...]``, the
    top label and its softmax probability (as ``moorelm.classify.predict.classify`` returns)."""
    if isinstance(texts, str):
        raise MoorelmError("classify takes a list of texts, not a single string")
    if batch_size < 1:
        raise MoorelmError(f"batch_size must be positive, not {batch_size}")
    model, tok, cfg = load_gpt_classifier(run_dir, device)
    limit = model.gpt.config.seq_len
    max_length = min(max_length or cfg["classifier"].get("max_length", limit), limit)
    rows, _ = _encode(tok, texts, max_length)
    if not rows:
        return []
    probs = _predict(model, rows, tok.eot_id, next(model.parameters()).device, batch_size)
    score, top = probs.max(-1)
    labels = cfg["classifier"]["labels"]
    return [{"label": labels[c], "score": float(s)} for s, c in zip(score.tolist(), top.tolist())]


__all__ = ["GPTClassifier", "POOLINGS", "classify_gpt", "finetune_gpt_classifier",
           "is_moorelm_run", "load_gpt_classifier"]
