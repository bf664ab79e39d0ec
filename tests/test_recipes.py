"""Recipes: every one loads and trains; the baseline is nanoGPT's recipe; fair evaluation."""

from __future__ import annotations

import math

import pytest
import torch

from moorelm.config import DEFAULT_RECIPE, RECIPES, TrainConfig, build_configs, with_vocab
from moorelm.data import PrepareOptions, TokenData, prepare
from moorelm.device import choose_precision
from moorelm.model import GPT
from moorelm.training.loop import train
from moorelm.training.validation import estimate_loss

TINY_MODEL = dict(n_layer=2, n_head=2, n_embd=32, seq_len=32)


@pytest.fixture
def small_data(small_corpus, tmp_path) -> TokenData:
    return TokenData(prepare(str(small_corpus), tmp_path / "data", PrepareOptions(),
                             progress=False))


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_loads_and_short_run_lowers_loss(recipe, small_data, tmp_path):
    """Each recipe's configs build, and 30 steps on a tiny model bring the val loss clearly
    below its starting value (uniform guessing, ln V)."""
    model_cfg, cfg = build_configs(
        recipe=recipe, model_overrides=TINY_MODEL,
        train_overrides=dict(batch_size=8, max_steps=30, warmup_steps=3, eval_interval=0,
                             eval_iters=2, ckpt_interval=0, threads=1, device="cpu"))
    model_cfg = with_vocab(model_cfg, small_data.vocab_size)
    for field, value in RECIPES[recipe].model.items():
        assert getattr(model_cfg, field) == value
    r = train(model_cfg, cfg, small_data, tmp_path / recipe, progress=False)
    assert r.step == 30
    assert r.val_loss < math.log(small_data.vocab_size) - 0.5


def test_default_recipe_is_used_without_a_name():
    """build_configs with no recipe gives the default recipe's fields."""
    m0, t0 = build_configs()
    m1, t1 = build_configs(recipe=DEFAULT_RECIPE)
    assert (m0, t0) == (m1, t1)


def test_baseline_is_nanogpt_recipe():
    """gpt2-baseline is the GPT-2/nanoGPT Shakespeare setup, field by field."""
    m, t = build_configs(recipe="gpt2-baseline")
    assert (m.pos, m.norm, m.mlp, m.bias, m.tie_embeddings) == ("learned", "layernorm", "gelu",
                                                                False, True)
    assert m.hidden_dim == 4 * m.n_embd
    assert not (m.qk_norm or m.zero_init_proj or m.logit_softcap)
    assert (t.optimizer, t.lr, t.min_lr, t.warmup_steps, t.schedule) == ("adamw", 1e-3, 1e-4,
                                                                         100, "cosine")
    assert (t.beta1, t.beta2, t.weight_decay, t.decay_embeddings) == (0.9, 0.99, 0.1, True)
    assert (t.grad_clip, t.dtype) == (1.0, "fp32")


def test_train_help_lists_recipes(capsys):
    """`moorelm train --help` names every recipe."""
    from moorelm.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in RECIPES:
        assert name in out


def test_eval_windows_do_not_depend_on_train_batch(small_data):
    """With eval_batch_size fixed, two recipes with different batch sizes are scored on the
    same val windows (the same model gets the same val loss)."""
    # a large init spread, so the untrained model's predictions differ between windows
    model_cfg, _ = build_configs(preset="tiny", recipe="gpt2-baseline",
                                 model_overrides=dict(seq_len=32, init_std=0.5))
    torch.manual_seed(0)
    model = GPT(with_vocab(model_cfg, small_data.vocab_size))
    device = torch.device("cpu")
    precision = choose_precision(device, "fp32")
    losses = [estimate_loss(model, small_data, TrainConfig(batch_size=b, eval_batch_size=4,
                                                           eval_iters=3), 32, device, precision)
              for b in (4, 16)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    unfixed = estimate_loss(model, small_data, TrainConfig(batch_size=16, eval_iters=3), 32,
                            device, precision)
    assert unfixed != pytest.approx(losses[0], abs=1e-6)
