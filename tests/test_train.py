"""Training: learning, exact resume, checkpoints (atomic, unpickled), run folder contents."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import moorelm
from moorelm.codecs import load_gpt_weights, read_tensors
from moorelm.config import RECIPES, TrainConfig
from moorelm.errors import MoorelmError
from moorelm.run import RunFolder
from moorelm.training.pretrain import pretrain
from tests.conftest import DEVICES, TINY_MODEL, TINY_TRAIN


def losses(run) -> list[str]:
    with open(run / "metrics.csv", newline="") as f:
        return [r["train_loss"] for r in csv.DictReader(f)]


def test_run_folder_contents(tiny_run):
    """A run folder holds config, tokenizer, metrics, loss plot and a complete checkpoint."""
    for name in ("config.json", "tokenizer.json", "metrics.csv", "loss.png"):
        assert (tiny_run / name).exists(), name
    last = RunFolder(tiny_run).latest()
    assert last.name == "step-00000020"
    assert {p.name for p in last.iterdir()} == {"model.safetensors", "optimizer.safetensors", "state.json"}
    with open(tiny_run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["step", "tokens", "lr", "train_loss", "val_loss", "val_bpb",
                             "tokens_per_s", "elapsed", "mfu"]
    assert rows[-1]["val_loss"] and float(rows[-1]["val_bpb"]) > 0


def test_tiny_model_overfits_small_text(tmp_path):
    """A tiny model memorises a short repeated text: train loss falls near zero."""
    p = tmp_path / "t.txt"
    p.write_text("the quick brown fox jumps over the lazy dog. " * 60, encoding="utf-8")
    r = pretrain(tmp_path / "run", corpus=str(p), recipe="gpt2-baseline",
                 model_overrides=dict(TINY_MODEL, n_embd=64),
                 train_overrides=dict(TINY_TRAIN, max_steps=250, lr=3e-3, eval_interval=0,
                                      warmup_steps=10, batch_size=16, log_interval=25),
                 progress=False)
    assert r.train_loss < 0.15, r.train_loss
    assert r.val_loss < 0.3


@pytest.mark.parametrize("device", DEVICES)
def test_save_load_identical_logits(tiny_run, device):
    """Loading a run gives a model with exactly the trained weights' logits."""
    lm = moorelm.load(tiny_run, device=device)
    tensors = read_tensors(RunFolder(tiny_run).latest() / "model.safetensors")
    from moorelm.model import GPT

    fresh = GPT(lm.config)
    load_gpt_weights(fresh, tensors, tiny_run)
    idx = torch.randint(0, lm.config.vocab_size, (2, 16))
    a, _ = lm.model(idx.to(device))
    b, _ = fresh.to(device).eval()(idx.to(device))
    assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("recipe", ["gpt2-baseline", "moorelm"])
def test_resume_reproduces_uninterrupted_run(small_corpus, tmp_path, recipe, device):
    """A run that crashes after step 12 and resumes from its step-10 checkpoint repeats the
    uninterrupted run's losses and weights exactly (on CPU; to float tolerance on GPUs,
    whose kernels are not bitwise deterministic)."""
    common = dict(corpus=str(small_corpus), recipe=recipe, model_overrides=TINY_MODEL, progress=False)
    over = dict(TINY_TRAIN, log_interval=2, eval_interval=10, ckpt_interval=10, max_steps=20,
                device=device)
    pretrain(tmp_path / "full", train_overrides=over, **common)

    class Crash(Exception):
        pass

    def crash_at_12(step):
        if step == 12:
            raise Crash

    with pytest.raises(Crash):
        pretrain(tmp_path / "part", train_overrides=over, on_step=crash_at_12, **common)
    assert RunFolder(tmp_path / "part").latest().name == "step-00000010"
    r = pretrain(tmp_path / "part", resume=True, progress=False)
    assert r.step == 20
    a = read_tensors(RunFolder(tmp_path / "full").latest() / "model.safetensors")
    b = read_tensors(RunFolder(tmp_path / "part").latest() / "model.safetensors")
    if device == "cpu":
        assert losses(tmp_path / "part") == losses(tmp_path / "full")
        assert all(torch.equal(a[k], b[k]) for k in a)
    else:
        pairs = zip(losses(tmp_path / "part"), losses(tmp_path / "full"))
        assert all(abs(float(x) - float(y)) < 2e-3 for x, y in pairs)
        assert all(torch.allclose(a[k], b[k], atol=1e-3) for k in a)


def test_existing_run_needs_resume(tiny_run, small_corpus):
    """Training into a folder that already holds a run refuses instead of overwriting it."""
    with pytest.raises(MoorelmError, match="--resume"):
        pretrain(tiny_run, corpus=str(small_corpus), model_overrides=TINY_MODEL,
                 train_overrides=TINY_TRAIN, progress=False)


def test_every_recipe_loads_and_learns(small_corpus, tmp_path):
    """Each registered recipe builds and a short run lowers the loss."""
    for name in RECIPES:
        r = pretrain(tmp_path / name, corpus=str(small_corpus), recipe=name,
                     model_overrides=TINY_MODEL,
                     train_overrides=dict(TINY_TRAIN, max_steps=30, eval_interval=0), progress=False)
        first = float(r.history[0]["train_loss"])
        assert r.train_loss < first - 0.3, (name, first, r.train_loss)


def test_no_pickle_in_checkpoints(tiny_run):
    """Checkpoint files are safetensors and JSON only (nothing that would need unpickling)."""
    for path in tiny_run.rglob("*"):
        if path.is_file():
            assert path.suffix in {".json", ".safetensors", ".csv", ".png"}, path
            assert not path.read_bytes().startswith(b"\x80"), path  # pickle protocol header


KILLER = textwrap.dedent(
    """
    import sys, torch
    from pathlib import Path
    from moorelm.run import RunFolder
    run = RunFolder(sys.argv[1])
    big = {"w": torch.randn(1024, 1024), "v": torch.randn(512, 1024)}
    step = int(sys.argv[2])
    print("ready", flush=True)
    while True:
        step += 1
        big["w"].fill_(float(step))
        run.save(step, {"model.safetensors": ({"wte.weight": big["w"], "x": big["v"]}, {})},
                 {"tokens": step}, {"0/exp_avg": big["v"]}, keep=1)
    """
)


def test_sigkill_during_checkpointing_leaves_a_loadable_checkpoint(tmp_path):
    """Killing a process with SIGKILL at random instants while it writes checkpoints in a loop
    always leaves the newest complete checkpoint readable and self-consistent."""
    run = tmp_path / "run"
    step = 0
    for attempt in range(6):
        proc = subprocess.Popen([sys.executable, "-c", KILLER, str(run), str(step)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        # wait for the first checkpoint of this attempt, then kill at a varying instant
        deadline = time.time() + 120
        while time.time() < deadline and not any(
            int(p.name.split("-")[1]) > step for p in RunFolder(run).checkpoints()
        ):
            time.sleep(0.01)
        time.sleep(0.05 + 0.07 * attempt)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        last = RunFolder(run).latest()
        tensors = read_tensors(last / "model.safetensors")
        state = RunFolder(run).read_state(last)
        assert float(tensors["wte.weight"][0, 0]) == state["step"] == int(last.name.split("-")[1])
        read_tensors(last / "optimizer.safetensors")
        step = state["step"] + 1000


def test_train_config_rejects_bad_values():
    """Invalid training settings are refused with the offending value."""
    with pytest.raises(MoorelmError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(MoorelmError, match="choose one of"):
        TrainConfig(optimizer="sgd")
