"""The whole pretraining job: corpus -> tokenizer and token shards -> configs -> ``train``.

    moorelm train --out runs/NAME [--preset P] [--recipe R] [--corpus C] [--max-time 300] ...
    torchrun --nproc_per_node=N -m moorelm train ...          (DistributedDataParallel / FSDP)

``pretrain()`` is what ``moorelm train`` runs (``moorelm.pretrain``); ``prepare_data`` opens or
prepares the dataset (under torchrun rank 0 prepares, the others wait for it).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from moorelm.config import DEFAULT_RECIPE, ModelConfig, TrainConfig, build_configs, with_vocab
from moorelm.corpus import load_corpus
from moorelm.data import (
    PrepareOptions,
    TokenData,
    dataset_fingerprint,
    default_data_dir,
    prepare,
    read_manifest,
)
from moorelm.errors import MoorelmError
from moorelm.training import checkpointing
from moorelm.training.loop import train
from moorelm.training.metrics import MetricsLogger
from moorelm.training.state import TrainResult


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
    loggers: Sequence[MetricsLogger] = (),
) -> TrainResult:
    """Corpus -> tokenizer and token shards -> configs -> trained run folder (``loggers``:
    experiment trackers beside metrics.csv, ``moorelm.training.trackers``)."""
    out = Path(out)
    if resume:
        saved = checkpointing.resumable_config(out)
        model_cfg = ModelConfig.from_dict(saved["model"])
        t = dict(saved["train"])
        t.update({k: v for k, v in (train_overrides or {}).items() if v is not None})
        cfg = TrainConfig.from_dict(t)
        data = TokenData(saved["data"]["dir"]) if data_dir is None and corpus is None else \
            prepare_data(corpus, tokenizer, vocab_size, val_frac, data_dir, text_field,
                         extensions, plays, progress)
        if data.provenance()["fingerprint"] != saved["data"]["fingerprint"]:
            raise MoorelmError(f"the dataset differs from the one {out} was trained on; resume with the same corpus")
        meta = {k: v for k, v in saved.items() if k not in ("model", "train", "data", "params", "world_size")}
        return train(model_cfg, cfg, data, out, resume=True, run_meta=meta, progress=progress,
                     on_step=on_step, loggers=loggers)

    # validate every flag before the (possibly long) data preparation
    model_cfg, cfg = build_configs(preset=preset, recipe=recipe, model_overrides=model_overrides,
                                   train_overrides=train_overrides)
    data = prepare_data(corpus, tokenizer, vocab_size, val_frac, data_dir, text_field,
                        extensions, plays, progress)
    model_cfg = with_vocab(model_cfg, data.vocab_size)
    meta = {"recipe": recipe or DEFAULT_RECIPE, "preset": preset}
    return train(model_cfg, cfg, data, out, run_meta=meta, progress=progress, on_step=on_step,
                 loggers=loggers)


def describe(result: TrainResult) -> str:
    p = result.params
    return (
        f"{result.step} steps, {result.tokens:,} tokens in {result.elapsed:.1f}s "
        f"({result.tokens_per_s:,.0f} tokens/s); val loss {result.val_loss:.4f}, "
        f"{result.val_bpb:.3f} bits/byte; {p['total']:,} parameters "
        f"({p['non_embedding']:,} non-embedding)"
    )
