"""The classification verbs end to end: genre-data, finetune-classifier on a moorelm run,
classify texts and files, and one-line errors for bad input."""

from __future__ import annotations

import csv
import json
import random

from moorelm.cli import main


def toy_csv(path, n=120, seed=0):
    rng = random.Random(seed)
    good = ["good", "great", "lovely", "fine"]
    bad = ["bad", "awful", "poor", "vile"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for _ in range(n):
            pos = rng.random() < 0.5
            word = rng.choice(good if pos else bad)
            w.writerow([f"a {word} day {word}", "pos" if pos else "neg"])
    return path


def test_genre_data_cli(capsys, tmp_path):
    """genre-data writes genre_train/genre_eval CSVs split by play."""
    assert main(["genre-data", "--out", str(tmp_path), "--passages-per-play", "3"]) == 0
    assert "split by play" in capsys.readouterr().out
    train = list(csv.DictReader(open(tmp_path / "genre_train.csv", encoding="utf-8")))
    assert {r["label"] for r in train} == {"comedy", "tragedy", "history"}


def test_gpt_run_classifier_through_the_cli(capsys, tmp_path, tiny_run):
    """finetune-classifier accepts a moorelm run; classify reads the result for texts and files."""
    data = toy_csv(tmp_path / "toy.csv")
    out = tmp_path / "clf"
    code = main(["finetune-classifier", "--model", str(tiny_run), "--train", str(data),
                 "--out", str(out), "--epochs", "4", "--batch-size", "16", "--lr", "3e-3",
                 "--quiet", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert "accuracy" in capsys.readouterr().out
    assert (out / "metrics.json").exists() and (out / "confusion_matrix.png").exists()

    assert main(["classify", str(out), "a great day great", "a vile day vile", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["label"] for r in rows] == ["pos", "neg"]
    assert all(0.5 <= r["score"] <= 1.0 for r in rows)

    pred = tmp_path / "pred.jsonl"
    assert main(["classify", str(out), "--file", str(data), "--output", str(pred)]) == 0
    assert "classified 120 rows" in capsys.readouterr().out
    assert len(pred.read_text(encoding="utf-8").splitlines()) == 120


def test_classification_bad_input_is_one_line(capsys, tmp_path, tiny_run):
    """Missing columns and an empty invocation give one line and exit 2."""
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence_x,y\nhello,1\n", encoding="utf-8")
    code = main(["finetune-classifier", "--model", str(tiny_run), "--train", str(bad),
                 "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "column" in err
    assert main(["classify", str(tiny_run)]) == 2
    assert "nothing to classify" in capsys.readouterr().err
