"""Data-parallel training under torchrun on CPU (gloo): DDP and FSDP2 match one process.

Each test launches ``python -m torch.distributed.run --nproc_per_node=2 -m moorelm train`` on
a tiny model, compares its loss curve with a one-process run of the same global batch, then
resumes the run folder in this (single) process.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moorelm.data import PrepareOptions, prepare
from moorelm.run import RunFolder
from moorelm.training.pretrain import pretrain

MODEL = dict(n_layer=2, n_head=2, n_embd=32, seq_len=32)
STEPS = 6
TRAIN = dict(max_steps=STEPS, eval_interval=3, eval_iters=3, log_interval=1, warmup_steps=2,
             threads=1, batch_size=4, device="cpu")


def _flags(d: dict) -> list[str]:
    out = []
    for k, v in d.items():
        out.append("--" + k.replace("_", "-"))
        if v is not True:
            out.append(str(v))
    return out


def _losses(run: Path, column: str) -> list[float]:
    with open(run / "metrics.csv", newline="", encoding="utf-8") as f:
        return [float(r[column]) for r in csv.DictReader(f) if r[column]]


def _torchrun(tmp_path: Path, data: Path, out: Path, recipe: str, extra: dict) -> None:
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "moorelm", "train", "--out", str(out), "--data", str(data), "--recipe", recipe,
            "--quiet", *_flags({**MODEL, **TRAIN, **extra})]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MOORELM_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture
def dataset(tmp_path, small_corpus):
    return prepare(str(small_corpus), tmp_path / "data", PrepareOptions(), progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("recipe, fsdp", [("gpt2-baseline", False), ("moorelm", True)],
                         ids=["ddp-adamw", "fsdp-muon"])
def test_two_processes_match_one_and_resume_single(tmp_path, dataset, recipe, fsdp):
    """2 ranks x grad_accum 1 follow the loss curve of 1 rank x grad_accum 2 (the same global
    batch: every rank takes a disjoint half of it); only rank 0 writes a checkpoint, in the
    single-process format, and it resumes in one process on the one-process run's track."""
    multi, single = tmp_path / "multi", tmp_path / "single"
    _torchrun(tmp_path, dataset, multi, recipe, {"grad_accum": 1, **({"fsdp": True} if fsdp else {})})
    pretrain(single, data_dir=dataset, recipe=recipe, model_overrides=MODEL,
             train_overrides={**TRAIN, "grad_accum": 2}, progress=False)

    for column in ("train_loss", "val_loss"):
        a, b = _losses(single, column), _losses(multi, column)
        assert len(a) == len(b) > 1
        assert max(abs(x - y) for x, y in zip(a, b)) < 2e-3, (column, a, b)

    # the checkpoint is complete (weights + optimizer) and records the 2-process run
    [last] = RunFolder(multi).checkpoints()
    state = RunFolder(multi).read_state(last)
    assert state["step"] == STEPS and state["world_size"] == 2 and state["global_batch"] == 8
    assert (last / "optimizer.safetensors").exists()
    assert RunFolder(multi).read_config()["fsdp"] is fsdp
    model = RunFolder(multi).load().model
    assert all(torch.isfinite(p).all() for p in model.parameters())

    more = {"max_steps": STEPS + 3, "grad_accum": 2}
    pretrain(multi, resume=True, train_overrides=more, progress=False)
    pretrain(single, resume=True, train_overrides=more, progress=False)
    a, b = _losses(single, "train_loss"), _losses(multi, "train_loss")
    assert len(a) == len(b) == STEPS + 3
    assert max(abs(x - y) for x, y in zip(a, b)) < 2e-3, (a, b)
