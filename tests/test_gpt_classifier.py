"""Tests for moorelm.finetune.gpt_classifier: a classification head on a moorelm GPT, from
the shared tiny run (2 layers, width 32, context 32)."""

from __future__ import annotations

import csv
import json
import random
import warnings

import pytest
import torch

import moorelm
from moorelm.classify.metrics import TruncationWarning
from moorelm.errors import MoorelmError
from moorelm.finetune.gpt_classifier import (
    GPTClassifier,
    classify_gpt,
    finetune_gpt_classifier,
    is_moorelm_run,
    load_gpt_classifier,
)
from moorelm.run import RunFolder

WORDS = "the a was it is of and to in on".split()


def _rows(n: int, seed: int) -> list[dict]:
    """'sun' texts vs 'moon' texts among neutral words."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "sun" if i % 2 == 0 else "moon"
        words = rng.choices(WORDS, k=rng.randint(1, 3))
        words.insert(rng.randint(0, len(words)), label)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def _csv(path, rows, columns=("text", "label")) -> str:
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            w.writerow([r.get(c, "") for c in columns])
    return str(path)


FAST = dict(epochs=4, lr=3e-3, batch_size=16, progress=False, device="cpu")


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_right_padding_never_changes_a_texts_logits(tiny_run, pooling):
    """A short text's logits are the same alone and right-padded in a batch of longer ones."""
    gpt = RunFolder(tiny_run).load().model
    torch.manual_seed(0)
    model = GPTClassifier(gpt, 3, pooling).eval()
    short, long = [5, 6, 7], [8, 9, 10, 11, 12, 13]
    with torch.no_grad():
        alone = model(torch.tensor([short]), torch.tensor([3]))
        padded = torch.tensor([short + [0, 0, 0], long])
        batch = model(padded, torch.tensor([3, 6]))
    torch.testing.assert_close(batch[0], alone[0], atol=1e-5, rtol=1e-5)


def test_finetune_saves_a_run_folder_that_classify_reads(tiny_run, tmp_path):
    """The saved folder is a moorelm run with a classifier section; classify_gpt on the eval
    texts reproduces the accuracy recorded in metrics.json; the task is learned."""
    train = _csv(tmp_path / "train.csv", _rows(160, 0))
    held = _rows(40, 1)
    evalf = _csv(tmp_path / "eval.csv", held)
    out = tmp_path / "clf"
    r = finetune_gpt_classifier(tiny_run, train, out, eval_file=evalf, **FAST)
    assert r["backend"] == "moorelm-gpt" and r["labels"] == ["moon", "sun"]
    cfg = RunFolder(out).read_config()
    assert cfg["classifier"]["labels"] == ["moon", "sun"] and cfg["classifier"]["pooling"] == "last"
    assert is_moorelm_run(out) and (out / "metrics.json").exists() and (out / "confusion_matrix.png").exists()
    assert json.loads((out / "metrics.json").read_text())["accuracy"] == r["accuracy"]
    preds = classify_gpt(out, [x["text"] for x in held], device="cpu")
    assert all(p["label"] in ("moon", "sun") and 0.5 <= p["score"] <= 1.0 for p in preds)
    accuracy = sum(p["label"] == x["label"] for p, x in zip(preds, held)) / len(held)
    assert accuracy == pytest.approx(r["accuracy"])
    assert r["accuracy"] >= 0.9, r["accuracy"]


def test_classifier_and_language_model_folders_are_told_apart(tiny_run, tmp_path):
    """moorelm.load refuses a classifier; classify_gpt refuses a language model; both in one line."""
    out = tmp_path / "clf"
    finetune_gpt_classifier(tiny_run, _csv(tmp_path / "t.csv", _rows(40, 2)), out,
                            max_steps=2, **{**FAST, "epochs": 1})
    with pytest.raises(MoorelmError, match="text classifier, not a language model"):
        moorelm.load(out, device="cpu")
    with pytest.raises(MoorelmError, match="not a classifier"):
        classify_gpt(tiny_run, ["x"])
    model, tok, cfg = load_gpt_classifier(out, device="cpu")
    assert model.score.out_features == 2 and tok.eot_id == 0
    assert not is_moorelm_run(tmp_path) and not is_moorelm_run(None)


@pytest.mark.parametrize("case,message", [
    ("columns", r"has no column 'label'"),
    ("empty", r"rows have an empty text or a missing label \(first on line 3\)"),
    ("single", r"every training row has the label 'sun'"),
    ("unseen", r"label 'star' .* never occur in the training data"),
    ("encoding", r"not valid UTF-8"),
])
def test_bad_input_fails_before_loading_the_model(tmp_path, case, message):
    """Each data problem is one MoorelmError, raised before any weights are read (the base
    run here does not even exist)."""
    rows = _rows(10, 3)
    train, evalf = tmp_path / "train.csv", None
    if case == "columns":
        _csv(train, rows, columns=("text",))
    elif case == "empty":
        rows[1]["text"] = ""
        _csv(train, rows)
    elif case == "single":
        _csv(train, [dict(r, label="sun") for r in rows])
    elif case == "unseen":
        _csv(train, rows)
        evalf = _csv(tmp_path / "eval.csv", [{"text": "x", "label": "star"}])
    else:
        train.write_bytes(b"text,label\ncaf\xe9,sun\nmoon,moon\n")
    with pytest.raises(MoorelmError, match=message) as e:
        finetune_gpt_classifier(tmp_path / "no-such-run", train, tmp_path / "o", eval_file=evalf, **FAST)
    assert "\n" not in str(e.value)


def test_long_texts_are_truncated_with_one_warning(tiny_run, tmp_path):
    """Texts longer than max_length are cut and counted; max_length beyond the context fails."""
    rows = _rows(20, 4)
    for r in rows[:3]:
        r["text"] = "sun " * 20 + r["text"]
    train = _csv(tmp_path / "t.csv", rows)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        finetune_gpt_classifier(tiny_run, train, tmp_path / "o", max_length=16, max_steps=1,
                                eval_fraction=0.2, **{**FAST, "epochs": 1})
    msgs = [str(w.message) for w in caught if issubclass(w.category, TruncationWarning)]
    assert msgs and "longer than max_length=16" in msgs[0]
    assert {w.filename for w in caught if issubclass(w.category, TruncationWarning)} == {__file__}
    with pytest.raises(MoorelmError, match="context length 32"):
        finetune_gpt_classifier(tiny_run, train, tmp_path / "o2", max_length=64, **FAST)


def test_an_unwritable_out_is_refused_before_training(tiny_run, tmp_path, monkeypatch):
    """The classifier is written only after training: an --out on a read-only disk (or in a
    folder that is not the user's) is refused up front, not after the training is done."""
    import os

    import moorelm.finetune.gpt_classifier as gc

    train = _csv(tmp_path / "t.csv", _rows(20, 4))
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: not str(p).startswith(str(locked))
                        and real(p, mode, **kw))

    def no_training(*args, **kwargs):
        raise AssertionError("trained before checking --out")

    monkeypatch.setattr(gc, "_train_loop", no_training)
    with pytest.raises(MoorelmError, match=f"cannot write in {locked}") as e:
        finetune_gpt_classifier(tiny_run, train, locked / "new" / "clf", **FAST)
    assert "\n" not in str(e.value) and list(locked.iterdir()) == []
