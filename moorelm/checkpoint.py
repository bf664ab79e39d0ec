"""The run folder: save and load, atomically, without unpickling.

    runs/NAME/
      config.json                 {"model": ModelConfig, "train": TrainConfig, "recipe", "data", ...}
      tokenizer.json              Hugging Face tokenizers format
      metrics.csv, loss.png       written by train.py
      checkpoints/step-000500/    one complete checkpoint per folder
        model.safetensors         weights (metadata: step)
        optimizer.safetensors     optimizer tensors (absent for inference-only checkpoints)
        state.json                step, tokens seen, elapsed time, optimizer param groups

A checkpoint folder is written under a temporary name, every file fsynced, then renamed into
place; older checkpoints are deleted only afterwards. A process killed at any instant leaves
the previous checkpoint complete, and ``latest_checkpoint`` never returns a partial one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moorelm.atomic import (  # noqa: F401  (re-exported: the run folder writes through these)
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    fsync_dir,
    fsync_file,
)
from moorelm.config import ModelConfig, TrainConfig
from moorelm.errors import MoorelmError
from moorelm.model import GPT
from moorelm.tokenizer import Tokenizer

CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
CKPT_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")


# ----------------------------------------------------------------------------- tensors


def _contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def model_state(model: torch.nn.Module,
                state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """State dict (or ``state``, e.g. gathered from shards) without tied duplicates
    (safetensors refuses shared storage)."""
    sd = dict(model.state_dict() if state is None else state)
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "tie_embeddings", False):
        sd.pop("lm_head.weight", None)
    return _contiguous(sd)


def optimizer_state(opt: torch.optim.Optimizer,
                    state: dict | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer tensors for safetensors plus the JSON-able rest (param groups, scalars).
    ``state`` replaces ``opt.state_dict()`` (e.g. one gathered from shards)."""
    sd = opt.state_dict() if state is None else state
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"{pid}.{key}"] = val
            else:
                scalars.setdefault(str(pid), {})[key] = val
    return _contiguous(tensors), {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                         meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = t
    for pid, kv in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(kv)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# ----------------------------------------------------------------------------- run folder


def write_run_files(run_dir: Path, config: dict, tokenizer: Tokenizer) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / CONFIG, config)
    tokenizer.save(run_dir / TOKENIZER)


def save_checkpoint(run_dir: Path, step: int, model_tensors: dict[str, torch.Tensor],
                    state: dict, optim_tensors: dict[str, torch.Tensor] | None = None,
                    keep: int = 1) -> Path:
    """Write checkpoints/step-N atomically; keep the newest ``keep`` checkpoints."""
    ckpts = Path(run_dir) / CKPT_DIR
    ckpts.mkdir(parents=True, exist_ok=True)
    final = ckpts / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=ckpts, prefix=f".step-{step:08d}.", suffix=".tmp"))
    try:
        meta = {"step": str(step), "format": "moorelm-1"}
        save_file(model_tensors, str(tmp / "model.safetensors"), metadata=meta)
        fsync_file(tmp / "model.safetensors")
        if optim_tensors is not None:
            save_file(optim_tensors, str(tmp / "optimizer.safetensors"), metadata=meta)
            fsync_file(tmp / "optimizer.safetensors")
        atomic_write_json(tmp / "state.json", {"step": step, **state})
        fsync_dir(tmp)
        if final.exists():  # the same step saved twice (e.g. end of run right after a save)
            old = final.with_name(final.name + ".old.tmp")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(ckpts)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in ckpts.glob(".*.tmp"):  # leftovers of a killed save
        shutil.rmtree(stale, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    ckpts = Path(run_dir) / CKPT_DIR
    if not ckpts.is_dir():
        return []
    found = []
    for p in ckpts.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / "model.safetensors").exists() and (p / "state.json").exists():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MoorelmError(f"run folder {run_dir} does not exist")
    found = list_checkpoints(run_dir)
    if not found:
        raise MoorelmError(f"run folder {run_dir} has no checkpoint yet; train it first")
    return found[-1]


def read_run_config(run_dir: Path) -> dict:
    path = Path(run_dir) / CONFIG
    if not path.exists():
        raise MoorelmError(f"{run_dir} is not a moorelm run folder (no {CONFIG})")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MoorelmError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or "model" not in cfg:
        raise MoorelmError(f"{path} has no 'model' section; it was not written by moorelm")
    return cfg


def read_tensors(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise MoorelmError(
            f"{path} is truncated or corrupt ({str(e).splitlines()[0][:120]}); "
            "use an earlier checkpoint or retrain"
        ) from None


def load_weights(model: GPT, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Load weights strictly; mismatches with the config become a clear error."""
    expected = model.state_dict()
    if model.config.tie_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected) - {"lm_head.weight"})
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise MoorelmError(f"{source} does not match config.json ({what}); the config and weights come from different models")
    for k, t in tensors.items():
        if k in expected and expected[k].shape != t.shape:
            raise MoorelmError(
                f"{source} does not match config.json: {k} has shape {tuple(t.shape)}, "
                f"config implies {tuple(expected[k].shape)}"
            )
    model.load_state_dict(tensors, strict=False)
    if model.config.tie_embeddings:
        model.lm_head.weight = model.wte.weight


def load_model(run_dir: str | Path, device: str | torch.device = "cpu",
               checkpoint: Path | None = None) -> tuple[GPT, Tokenizer, dict, dict]:
    """(model in eval mode, tokenizer, run config, checkpoint state) of a run's newest checkpoint."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    ckpt = checkpoint or latest_checkpoint(run_dir)
    model_cfg = ModelConfig.from_dict(cfg["model"])
    tok_path = run_dir / TOKENIZER
    if not tok_path.exists():
        raise MoorelmError(f"{run_dir} has no {TOKENIZER}")
    tokenizer = Tokenizer.load(tok_path)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise MoorelmError(
            f"{tok_path} has {tokenizer.vocab_size} tokens but config.json says vocab_size="
            f"{model_cfg.vocab_size}"
        )
    tensors = read_tensors(ckpt / "model.safetensors")
    with torch.device("meta"):
        model = GPT(model_cfg)
    model = model.to_empty(device="cpu")
    if model_cfg.pos == "rope":  # non-persistent buffers are rebuilt, not loaded
        from moorelm.model import rope_tables

        model.rope_cos, model.rope_sin = rope_tables(model_cfg.head_dim, model_cfg.seq_len,
                                                     model_cfg.rope_base)
    if model_cfg.tie_embeddings:
        model.lm_head.weight = model.wte.weight
    load_weights(model, tensors, ckpt / "model.safetensors")
    state = read_state(ckpt)
    return model.to(device).eval(), tokenizer, cfg, state


def read_state(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise MoorelmError(f"{ckpt}/state.json is unreadable ({e})") from None


def train_config_of(cfg: dict) -> TrainConfig:
    return TrainConfig.from_dict(cfg.get("train", {}))
