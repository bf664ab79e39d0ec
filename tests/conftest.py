"""Shared fixtures: a hermetic cache, a small inline corpus, and a tiny trained run."""

from __future__ import annotations

import os

import pytest

# Spinning OpenMP workers burn the cores other test processes need (torchrun ranks, servers).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Device-parametrised tests run on each of these (bench/gpu_check.sh sets cpu,cuda).
DEVICES = [d for d in os.environ.get("MOORELM_TEST_DEVICES", "cpu").split(",") if d]
if torch.cuda.is_available() and "cuda" not in DEVICES and "MOORELM_TEST_DEVICES" not in os.environ:
    DEVICES.append("cuda")

SMALL_TEXT = (
    "ROMEO:\nBut, soft! what light through yonder window breaks?\n"
    "It is the east, and Juliet is the sun.\n\n"
    "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\n"
    "Deny thy father and refuse thy name.\n\n"
) * 40


@pytest.fixture(autouse=True)
def _hermetic_cache(tmp_path_factory, monkeypatch):
    """Every test prepares data into its own cache, never the user's ~/.cache."""
    monkeypatch.setenv("MOORELM_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def small_corpus(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text(SMALL_TEXT, encoding="utf-8")
    return path


TINY_MODEL = dict(n_layer=2, n_head=2, n_embd=32, seq_len=32)
TINY_TRAIN = dict(batch_size=8, max_steps=20, eval_interval=10, eval_iters=2, log_interval=5,
                  warmup_steps=2, threads=1)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A tiny model trained for a few steps on an inline corpus (shared, read-only)."""
    from moorelm.training.pretrain import pretrain

    root = tmp_path_factory.mktemp("tinyrun")
    corpus = root / "small.txt"
    corpus.write_text(SMALL_TEXT, encoding="utf-8")
    os.environ["MOORELM_CACHE"] = str(root / "cache")
    pretrain(root / "run", corpus=str(corpus), recipe="gpt2-baseline",
             model_overrides=TINY_MODEL, train_overrides=TINY_TRAIN, progress=False)
    return root / "run"
