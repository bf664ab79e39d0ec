"""The training loop's seams: the data-source protocol, the model codec, the saved state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moorelm.codecs import LMCodec
from moorelm.config import ModelConfig, TrainConfig
from moorelm.data import Batch, PrepareOptions, TokenData, prepare
from moorelm.run import RunFolder
from moorelm.tokenizer import Tokenizer
from moorelm.training.loop import train
from moorelm.training.state import TrainState
from tests.conftest import SMALL_TEXT

MODEL = ModelConfig(n_layer=1, n_head=2, n_embd=16, seq_len=16, vocab_size=64)
FAST = dict(batch_size=2, max_steps=4, log_interval=1, eval_interval=2, eval_iters=1,
            warmup_steps=0, threads=1, device="cpu")


class Counting:
    """A data source with nothing but the DataSource members: tokens count up mod 64."""

    def __init__(self, tokenizer_path: Path):
        self.tokenizer_path = tokenizer_path
        self.vocab_size = Tokenizer.load(tokenizer_path).vocab_size

    def check_fits(self, seq_len: int) -> None:
        pass

    def bytes_per_token(self, split: str = "val") -> float:
        return 1.0

    def _batch(self, start: int, rows: int, seq_len: int) -> Batch:
        t = (start + torch.arange(rows)[:, None] + torch.arange(seq_len + 1)) % 64
        return Batch(t[:, :-1], t[:, 1:])

    def train_batch(self, step, seed, global_batch, seq_len, part=0, parts=1) -> Batch:
        per = global_batch // parts
        return self._batch(step * global_batch + part * per, per, seq_len)

    def val_batch(self, i, batch_size, seq_len) -> Batch:
        return self._batch(1000 + i, batch_size, seq_len)

    def provenance(self) -> dict[str, str]:
        return {"dir": "nowhere", "fingerprint": "f0", "corpus": "counting", "tokenizer": "char"}


@pytest.fixture
def tokenizer_path(tmp_path):
    (tmp_path / "c.txt").write_text(SMALL_TEXT, encoding="utf-8")
    folder = prepare(str(tmp_path / "c.txt"), tmp_path / "data", PrepareOptions(), progress=False)
    return TokenData(folder).tokenizer_path


def test_any_data_source_with_the_protocol_trains(tmp_path, tokenizer_path):
    """A data source offering only the DataSource members (no folder, no manifest) trains,
    learns, and its provenance is what config.json records as the run's data."""
    cfg = TrainConfig(**{**FAST, "max_steps": 20, "lr": 1e-2, "eval_interval": 0})
    r = train(MODEL, cfg, Counting(tokenizer_path), tmp_path / "run", progress=False)
    assert r.step == 20 and float(r.history[-1]["train_loss"]) < float(r.history[0]["train_loss"])
    saved = json.loads((tmp_path / "run" / "config.json").read_text(encoding="utf-8"))
    assert saved["data"] == Counting(tokenizer_path).provenance()


def test_checkpoints_are_written_through_the_codec(tmp_path, tokenizer_path):
    """Each checkpoint's files come from the codec's checkpoint_files, every file it names
    (a second file too), and the run folder loads what it wrote."""

    class Halved(LMCodec):
        calls = 0

        def checkpoint_files(self, model, state=None):
            Halved.calls += 1
            files = super().checkpoint_files(model, state)
            tensors, meta = files["model.safetensors"]
            return {"model.safetensors": ({k: v / 2 for k, v in tensors.items()}, meta),
                    "extra.safetensors": ({"one": torch.ones(1)}, {})}

    cfg = TrainConfig(**FAST, ckpt_interval=2, keep_checkpoints=5)
    r = train(MODEL, cfg, Counting(tokenizer_path), tmp_path / "run", progress=False,
              codec=Halved())
    run = RunFolder(tmp_path / "run")
    assert Halved.calls == 2 == len(run.checkpoints()) and r.step == 4
    assert (run.latest() / "extra.safetensors").exists()
    model = run.load().model
    assert float(model.ln_f.weight[0].detach()) == pytest.approx(0.5, abs=0.05)  # gains start at 1


def test_a_resumed_run_saves_the_state_an_uninterrupted_one_does(tmp_path, tokenizer_path):
    """TrainState is restored whole: a checkpoint written after a resume but before the next
    evaluation records the same step, tokens and last val loss as the uninterrupted run's
    (the last val loss used to be forgotten on resume and saved as null)."""
    cfg = TrainConfig(**{**FAST, "max_steps": 8, "eval_interval": 4, "ckpt_interval": 2,
                         "keep_checkpoints": 10})

    class Crash(Exception):
        pass

    def crash_at_5(step):
        if step == 5:
            raise Crash

    train(MODEL, cfg, Counting(tokenizer_path), tmp_path / "full", progress=False)
    with pytest.raises(Crash):
        train(MODEL, cfg, Counting(tokenizer_path), tmp_path / "part", progress=False,
              on_step=crash_at_5)
    train(MODEL, cfg, Counting(tokenizer_path), tmp_path / "part", progress=False, resume=True)

    def state_at(run, step):
        s = RunFolder(run).read_state(run / "checkpoints" / f"step-{step:08d}")
        return TrainState.from_checkpoint(s, []).to_checkpoint() | {"elapsed": None}

    assert state_at(tmp_path / "part", 6) == state_at(tmp_path / "full", 6)
    assert state_at(tmp_path / "full", 6)["val_loss"] is not None


def test_train_state_budget():
    """TrainState.within_budget stops at whichever of steps, tokens and time binds first."""
    s = TrainState(step=3, tokens=300, elapsed=1.5)
    assert s.within_budget(TrainConfig(max_steps=4))
    assert not s.within_budget(TrainConfig(max_steps=3))
    assert not s.within_budget(TrainConfig(max_steps=10, max_tokens=300))
    assert not s.within_budget(TrainConfig(max_time=1.0))
    s.advance(100, 0.5)
    assert (s.step, s.tokens, s.elapsed) == (4, 400, 2.0)
