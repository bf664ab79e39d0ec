"""Tests for moorelm.classify (HF encoder classifiers) and moorelm.finetune.genre.

Training tests use a tiny randomly initialised BERT (2 layers, width 32) with a WordPiece
tokenizer over the toy words, so nothing downloads and each run takes seconds. One test loads
the real bundled MiniLM-L6 with the network blocked, without training it.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest

from moorelm.classify.data import label_names, read_labeled, stratified_sample, stratified_split
from moorelm.classify.encoder import default_encoder_path, resolve_model
from moorelm.classify.metrics import TruncationWarning, classification_metrics, save_confusion_png
from moorelm.classify.predict import classify, classify_file
from moorelm.classify.train import finetune_classifier, work_folder
from moorelm.errors import MoorelmError
from moorelm.finetune.genre import GENRES, SPLITS_FILE, make_genre_dataset, play_passages

NEUTRAL = "the movie was plot actors really quite very ending story music film scenes".split()


def _toy_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "good" if i % 2 == 0 else "bad"
        words = rng.choices(NEUTRAL, k=rng.randint(3, 6))
        words.insert(rng.randint(0, len(words)), label)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def _write_csv(path: Path, rows: list[dict], columns=("text", "label")) -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            w.writerow([r[c] for c in columns])
    return path


def _block_network(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise OSError("network access is blocked in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and don't thrash a busy shared CPU)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory) -> Path:
    """A tiny random BERT encoder folder: BertModel (2 layers, width 32) and a WordPiece
    tokenizer whose vocabulary is just the toy words."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", "."] + sorted(
        set(NEUTRAL) | {"good", "bad"}
    )
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 64}
        )
    )
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.unk_token_id not in tok("the movie was good")["input_ids"]
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def toy_run(tiny_encoder, tmp_path_factory) -> dict:
    """Fine-tune the tiny encoder once on the good/bad toy set (with 3 over-long texts)."""
    root = tmp_path_factory.mktemp("toy")
    train_rows = _toy_rows(120, seed=1)
    for i in range(3):  # long texts: the keyword comes first, so truncation keeps it
        label = "good" if i % 2 == 0 else "bad"
        train_rows.append({"text": label + " " + " ".join(["story"] * 40), "label": label})
    train = _write_csv(root / "train.csv", train_rows)
    evalf = _write_csv(root / "eval.csv", _toy_rows(40, seed=2))
    out = root / "model"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = finetune_classifier(
            str(tiny_encoder),
            train,
            out,
            eval_file=evalf,
            epochs=6,
            lr=5e-3,
            batch_size=16,
            max_length=16,
            seed=0,
            group_by_length=True,
            progress=False,
        )
    return {
        "result": result,
        "out": out,
        "root": root,
        "warnings": [str(w.message) for w in caught],
        "warned_from": {w.filename for w in caught if issubclass(w.category, TruncationWarning)},
    }


# ----------------------------------------------------------------------------- training


def test_finetune_toy_set_reaches_high_accuracy_and_saves_hf_folder(toy_run):
    """Fine-tuning on a separable good/bad set scores >= 0.95 on eval and leaves a standard
    HF folder (config with id2label, safetensors, tokenizer), metrics.json and the PNG, and no
    Trainer checkpoint folders."""
    result, out = toy_run["result"], toy_run["out"]
    assert result["accuracy"] >= 0.95 and result["macro_f1"] >= 0.95
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "bad", "1": "good"}
    assert config["label2id"] == {"bad": 0, "good": 1}
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    assert (out / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rows"] == {
        "train": 123,
        "eval": 40,
        "train_file": 123,
        "train_seen": round(123 * metrics["epochs_run"]),
    }
    assert metrics["class_balance"]["eval"] == {"bad": 20, "good": 20}
    assert set(metrics["per_class"]) == {"bad", "good"}
    assert sum(map(sum, metrics["confusion_matrix"])) == 40
    assert metrics["train_time_s"] > 0
    assert not list(out.glob("checkpoint-*"))


def test_truncated_texts_are_counted_in_a_warning(toy_run):
    """The three 41-word training texts exceed max_length=16 and are reported as a count."""
    msg = "3 of 123 texts (train) were longer than max_length=16 tokens and were truncated"
    assert msg in toy_run["warnings"]
    assert toy_run["warned_from"] == {__file__}  # attributed to the caller's line
    assert toy_run["result"]["truncated"] == {"train": 3, "eval": 0}


def test_classify_gives_label_and_score_matching_pipeline(toy_run):
    """classify() returns one {label, score} per text, in input order, equal to what
    transformers.pipeline("text-classification") says for the saved folder."""
    from transformers import pipeline

    texts = ["the film was good", "bad", "really bad ending music story", "good good plot"]
    ours = classify(toy_run["out"], texts, batch_size=3)
    assert [r["label"] for r in ours] == ["good", "bad", "bad", "good"]
    reference = pipeline("text-classification", model=str(toy_run["out"]), device="cpu")(texts)
    for mine, theirs in zip(ours, reference):
        assert mine["label"] == theirs["label"]
        assert mine["score"] == pytest.approx(theirs["score"], abs=1e-5)
        assert 0.5 <= mine["score"] <= 1.0


def test_classify_file_writes_csv_and_jsonl(toy_run):
    """classify_file writes text,label,score rows as CSV or JSONL by the output extension,
    reading a 'sentence' column when 'text' is absent."""
    root = toy_run["root"]
    rows = [{"sentence": "good movie"}, {"sentence": "bad, very bad"}]
    src = _write_csv(root / "unlabeled.csv", rows, columns=("sentence",))
    info = classify_file(toy_run["out"], src, root / "pred.csv")
    assert info["rows"] == 2 and info["label_counts"] == {"bad": 1, "good": 1}
    with (root / "pred.csv").open(encoding="utf-8", newline="") as f:
        got = list(csv.DictReader(f))
    assert [r["text"] for r in got] == ["good movie", "bad, very bad"]
    assert [r["label"] for r in got] == ["good", "bad"]
    assert all(0.5 <= float(r["score"]) <= 1 for r in got)
    classify_file(toy_run["out"], src, root / "pred.jsonl")
    lines = [json.loads(x) for x in (root / "pred.jsonl").read_text().splitlines()]
    assert [(x["text"], x["label"]) for x in lines] == [
        ("good movie", "good"),
        ("bad, very bad", "bad"),
    ]


def test_time_limit_stops_training_and_still_saves(tiny_encoder, tmp_path):
    """With time_limit_s, training ends at the deadline (long before 500 epochs), the state
    at that point is evaluated on the held-out share of train, and the folder is saved."""
    train = _write_csv(tmp_path / "t.csv", _toy_rows(40, 3))
    result = finetune_classifier(
        str(tiny_encoder),
        train,
        tmp_path / "m",
        epochs=500,
        lr=5e-3,
        batch_size=8,
        max_length=16,
        time_limit_s=1.5,
        lr_by_time=True,
        early_stopping_patience=None,
        progress=False,
    )
    assert result["time_limit_hit"] and not result["stopped_early"]
    assert 0 < result["steps"] < 500 * 5
    assert result["rows"] == {
        "train": 36,
        "eval": 4,
        "train_file": 40,
        "train_seen": result["rows"]["train_seen"],
    }
    assert result["hyperparameters"]["lr_schedule"] == "linear over time"
    assert (tmp_path / "m" / "model.safetensors").is_file() and (
        tmp_path / "m" / "metrics.json"
    ).is_file()


def test_non_classifier_folders_are_rejected(tiny_encoder, tmp_path):
    """classify() on an encoder without a classification head, or on a folder that is not a
    model, raises MoorelmError."""
    with pytest.raises(MoorelmError, match="not a text classifier"):
        classify(tiny_encoder, ["hello"])
    with pytest.raises(MoorelmError, match="no config.json"):
        classify(tmp_path, ["hello"])
    with pytest.raises(MoorelmError, match="does not exist"):
        classify(tmp_path / "no-such-folder", ["hello"])


def test_unknown_hub_model_offline_is_a_clear_error(tmp_path, monkeypatch):
    """A hub id that is not cached fails with MoorelmError (offline), not a traceback."""
    _block_network(monkeypatch)
    train = _write_csv(tmp_path / "t.csv", _toy_rows(20, 0))
    with pytest.raises(MoorelmError, match="not available locally .*HF_HUB_OFFLINE is set"):
        finetune_classifier("no-such-org/no-such-model", train, tmp_path / "o", progress=False)



def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_hub_reachable_opens_a_connection():
    """The hub probe says yes for an endpoint that accepts connections, no for a closed port
    or an endpoint without a host."""
    from moorelm.hub import hub_reachable

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert hub_reachable(f"http://127.0.0.1:{server.getsockname()[1]}")
    assert not hub_reachable(f"http://127.0.0.1:{_closed_port()}")
    assert not hub_reachable("not a url")


def test_hub_id_with_the_hub_unreachable_fails_at_once(tmp_path, monkeypatch, capfd):
    """Online mode (HF_HUB_OFFLINE unset) with no route to the hub: a hub id that is not cached
    is one clear line from the cache alone, without huggingface_hub's retries and warnings
    (which took ~25 s)."""
    from huggingface_hub import constants

    from moorelm.hub import hub_reachable

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    hub_reachable.cache_clear()
    try:
        with pytest.raises(MoorelmError, match="hub cannot be reached from this machine"):
            classify("no-such-org/no-such-model", ["hello"])
    finally:
        hub_reachable.cache_clear()
    assert "Retrying" not in capfd.readouterr().err

def test_default_minilm_loads_offline_and_classifies(tmp_path, monkeypatch):
    """The bundled MiniLM-L6 loads with the network blocked; given a (fresh) two-label head it
    classifies texts through classify(). No training."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    _block_network(monkeypatch)
    path = default_encoder_path()
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    source, local = resolve_model(None)
    assert local and Path(source) == path
    model = AutoModelForSequenceClassification.from_pretrained(
        source,
        num_labels=2,
        id2label={0: "neg", 1: "pos"},
        label2id={"neg": 0, "pos": 1},
        local_files_only=True,
    )
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(source, local_files_only=True).save_pretrained(tmp_path)
    out = classify(tmp_path, ["a wonderful film", "a dull mess"])
    assert len(out) == 2 and all(
        r["label"] in {"neg", "pos"} and 0.5 <= r["score"] <= 1 for r in out
    )


# ----------------------------------------------------------------------------- crash safety

KILLED_JOB = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(1)
    from moorelm.classify.train import finetune_classifier
    encoder, train, out = sys.argv[1:4]
    finetune_classifier(encoder, train, out, **RESUMABLE, progress=False, resume=sys.argv[4] == "1")
    """
)
RESUMABLE = dict(epochs=40, lr=5e-3, batch_size=8, max_length=16, seed=0, eval_steps=5,
                 early_stopping_patience=None)


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.slow
def test_kill_9_then_resume_matches_an_uninterrupted_run(tiny_encoder, tmp_path):
    """A fine-tune killed with SIGKILL (twice, at different instants) leaves no --out folder
    and its work folder; resume=True continues from the newest complete checkpoint and ends
    with the weights and metrics of an uninterrupted run, then removes the work folder."""
    train = _write_csv(tmp_path / "t.csv", _toy_rows(40, 5))
    full = finetune_classifier(str(tiny_encoder), train, tmp_path / "full", **RESUMABLE,
                               progress=False)
    out = tmp_path / "part"
    script = "RESUMABLE = " + repr(RESUMABLE) + "\n" + KILLED_JOB
    trainer_dir = work_folder(out) / "trainer"
    for attempt, wait_for_step in enumerate((10, 40)):
        proc = subprocess.Popen([sys.executable, "-c", script, str(tiny_encoder), str(train),
                                 str(out), str(int(attempt > 0))])
        deadline = time.time() + 120
        while time.time() < deadline and not any(
            int(c.name.split("-")[1]) >= wait_for_step for c in trainer_dir.glob("checkpoint-*")
        ):
            time.sleep(0.01)
        time.sleep(0.05 * attempt)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not out.exists() and (work_folder(out) / "job.json").is_file()
    with pytest.raises(MoorelmError, match="--resume"):
        finetune_classifier(str(tiny_encoder), train, out, **RESUMABLE, progress=False)
    with pytest.raises(MoorelmError, match="lr differs"):
        finetune_classifier(str(tiny_encoder), train, out, **{**RESUMABLE, "lr": 1e-3},
                            progress=False, resume=True)
    part = finetune_classifier(str(tiny_encoder), train, out, **RESUMABLE, progress=False,
                               resume=True)
    assert part["resumed_from_step"] >= 40
    assert not work_folder(out).exists()
    assert part["steps"] == full["steps"] == 200
    for key in ("confusion_matrix", "best_metric_macro_f1", "accuracy"):
        assert part[key] == full[key], key
    a, b = _weights(tmp_path / "full"), _weights(out)
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    assert json.loads((out / "metrics.json").read_text())["steps"] == 200


def test_a_full_disk_is_one_line_that_says_resume(tiny_encoder, tmp_path, monkeypatch, capsys):
    """A full disk met while Trainer writes its checkpoint (or the finished folder) into the
    work folder: one line naming the folder and --resume, no --out; once there is room,
    --resume finishes the job from the checkpoints that were written."""
    import transformers

    from moorelm.cli import main

    train = _write_csv(tmp_path / "t.csv", _toy_rows(24, 6))
    out = tmp_path / "clf"
    argv = ["finetune-classifier", "--model", str(tiny_encoder), "--train", str(train),
            "--out", str(out), "--epochs", "2", "--lr", "5e-3", "--batch-size", "8",
            "--max-length", "16", "--quiet"]
    real = transformers.Trainer._save_checkpoint
    saved = []

    def full_after_one(self, *args, **kwargs):
        if saved:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        saved.append(real(self, *args, **kwargs))

    monkeypatch.setattr(transformers.Trainer, "_save_checkpoint", full_after_one)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"moorelm: error: cannot write {work_folder(out)}: no space left "
                                "on the device; free some space and run the same command with "
                                "--resume"], err
    assert not out.exists() and saved
    monkeypatch.setattr(transformers.Trainer, "_save_checkpoint", real)
    assert main(argv + ["--resume"]) == 0
    assert json.loads((out / "metrics.json").read_text())["resumed_from_step"] == 3
    assert not work_folder(out).exists()


def test_out_appears_whole_and_replaces_only_a_classifier(tiny_encoder, tmp_path):
    """--out receives the finished folder in one rename: a folder of someone else's files is
    refused before training, an earlier classifier is replaced, and no work folder stays."""
    train = _write_csv(tmp_path / "t.csv", _toy_rows(24, 6))
    fast = dict(epochs=1, lr=5e-3, batch_size=8, max_length=16, progress=False)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(MoorelmError, match="not a classifier"):
        finetune_classifier(str(tiny_encoder), train, mine, **fast)
    assert (mine / "notes.txt").read_text() == "keep me" and not work_folder(mine).exists()
    out = tmp_path / "clf"
    first = finetune_classifier(str(tiny_encoder), train, out, **fast)
    again = finetune_classifier(str(tiny_encoder), train, out, **{**fast, "epochs": 2})
    assert again["epochs_run"] == 2 and first["epochs_run"] == 1
    assert json.loads((out / "metrics.json").read_text())["epochs_run"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clf", "mine", "t.csv"]


def test_cli_resume_needs_an_interrupted_encoder_job(tiny_encoder, tmp_path, capsys):
    """`finetune-classifier --resume` with no interrupted job, or for a moorelm run (whose
    classifier trains in one go), exits 2 with one line."""
    from moorelm.cli import main

    train = _write_csv(tmp_path / "t.csv", _toy_rows(20, 0))
    argv = ["finetune-classifier", "--train", str(train), "--out", str(tmp_path / "o"), "--resume"]
    assert main([*argv, "--model", str(tiny_encoder)]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": {"n_layer": 2}}))
    assert main([*argv, "--model", str(run)]) == 2
    err = capsys.readouterr().err
    assert "--resume is for Hugging Face encoders" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- model folders


def _copy_encoder(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_folders_with_code_or_pickled_weights_are_refused(tiny_encoder, tmp_path):
    """A model folder that ships Python code (a .py file or an auto_map entry) or holds only
    pickled .bin weights is refused with one line before transformers loads anything; a moorelm
    run is named as such."""
    train = _write_csv(tmp_path / "t.csv", _toy_rows(20, 0))
    code = _copy_encoder(tiny_encoder, tmp_path / "code")
    (code / "modeling_evil.py").write_text("raise SystemExit('ran the folder code')\n")
    mapped = _copy_encoder(tiny_encoder, tmp_path / "mapped")
    cfg = json.loads((mapped / "config.json").read_text())
    cfg["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (mapped / "config.json").write_text(json.dumps(cfg))
    pickled = _copy_encoder(tiny_encoder, tmp_path / "pickled")
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    for folder, why in ((code, "ships its own model code"), (mapped, "auto_map in config.json"),
                        (pickled, "only pickled weights")):
        with pytest.raises(MoorelmError, match=why):
            finetune_classifier(str(folder), train, tmp_path / "o", progress=False)
        with pytest.raises(MoorelmError, match=why):
            classify(folder, ["good"])
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": {"n_layer": 2}}))
    with pytest.raises(MoorelmError, match="is a moorelm run"):
        classify(run, ["good"])


def test_every_load_switches_off_folder_code_and_pickles(tiny_encoder, monkeypatch):
    """Each from_pretrained call passes trust_remote_code=False, and model loads pass
    use_safetensors=True."""
    import transformers

    from moorelm.classify import encoder

    calls, depth = [], [0]
    for name in ("AutoConfig", "AutoTokenizer", "AutoModelForSequenceClassification"):
        real = getattr(transformers, name).from_pretrained

        def spy(*args, _real=real, _name=name, **kwargs):
            if not depth[0]:  # moorelm's own calls, not transformers' calls inside them
                calls.append((_name, kwargs))
            depth[0] += 1
            try:
                return _real(*args, **kwargs)
            finally:
                depth[0] -= 1

        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", spy)
    source, local = encoder.resolve_model(str(tiny_encoder))
    encoder.load_config(source, local)
    encoder.load_tokenizer(source, local)
    encoder.load_sequence_classifier(source, local, num_labels=2)
    assert [c[0] for c in calls] == ["AutoConfig", "AutoTokenizer",
                                     "AutoModelForSequenceClassification"]
    assert all(kw["trust_remote_code"] is False for _, kw in calls)
    assert calls[2][1]["use_safetensors"] is True


# ----------------------------------------------------------------------------- bad inputs


def test_missing_file_and_unknown_extension(tmp_path):
    """A missing training file and an unsupported extension each raise MoorelmError."""
    with pytest.raises(MoorelmError, match="does not exist"):
        finetune_classifier(None, tmp_path / "nope.csv", tmp_path / "o", progress=False)
    (tmp_path / "data.xlsx").write_text("x")
    with pytest.raises(MoorelmError, match="unknown file type"):
        read_labeled(tmp_path / "data.xlsx")


def test_non_utf8_file(tmp_path):
    """Latin-1 bytes are reported as not UTF-8, with the line of the first bad byte."""
    p = tmp_path / "latin.csv"
    p.write_bytes("text,label\nfine,a\ncaf\u00e9,b\n".encode("latin-1"))
    with pytest.raises(MoorelmError, match=r"not valid UTF-8 .*line 3"):
        finetune_classifier(None, p, tmp_path / "o", progress=False)


def test_missing_columns_name_the_columns_found(tmp_path):
    """Missing text/label columns are named together with the columns the file has."""
    p = _write_csv(tmp_path / "t.csv", [{"review": "x", "stars": "1"}], columns=("review", "stars"))
    with pytest.raises(
        MoorelmError, match=r"no columns 'text', 'label' \(columns found: 'review', 'stars'\)"
    ):
        finetune_classifier(None, p, tmp_path / "o", progress=False)
    with pytest.raises(MoorelmError, match=r"no column 'label'"):
        read_labeled(p, text_column="review")


def test_empty_rows_are_counted_with_first_line(tmp_path):
    """Rows with blank text or no label are counted, and the first one's line is given."""
    p = tmp_path / "t.jsonl"
    rows = [
        {"text": "ok", "label": "a"},
        {"text": "   ", "label": "b"},
        {"text": "x"},
        {"text": "y", "label": "b"},
    ]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(
        MoorelmError, match=r"2 of 4 rows have an empty text or a missing label \(first on line 2\)"
    ):
        finetune_classifier(None, p, tmp_path / "o", progress=False)


def test_single_class_training_set(tmp_path):
    """A training set whose rows all share one label is rejected."""
    p = _write_csv(tmp_path / "t.csv", [{"text": f"t{i}", "label": "pos"} for i in range(5)])
    with pytest.raises(MoorelmError, match="every training row has the label 'pos'"):
        finetune_classifier(None, p, tmp_path / "o", progress=False)


def test_eval_labels_unseen_in_training(tmp_path):
    """Eval labels that training never saw are named, with their row count and first line."""
    train = _write_csv(tmp_path / "t.csv", _toy_rows(10, 0))
    ev = _write_csv(
        tmp_path / "e.csv", [{"text": "a", "label": "good"}, {"text": "b", "label": "meh"}]
    )
    with pytest.raises(MoorelmError, match=r"label 'meh' \(1 rows, first on line 3\) never occur"):
        finetune_classifier(None, train, tmp_path / "o", eval_file=ev, progress=False)


# ----------------------------------------------------------------------------- pure helpers


def test_read_labeled_formats_and_label_order(tmp_path):
    """TSV (unquoted, GLUE 'sentence' column) and JSONL read alike; integer labels (ints or
    digit strings) are one label and sort numerically; CSV multi-line rows keep line numbers."""
    tsv = tmp_path / "d.tsv"
    tsv.write_text('sentence\tlabel\nit "works" \t10\nno\t2\n\nyes\t10\n', encoding="utf-8")
    data = read_labeled(tsv)
    assert data.text_column == "sentence" and data.texts[0] == 'it "works" '
    assert label_names(data.labels) == ["2", "10"]
    assert data.lines == [2, 3, 5]
    jl = tmp_path / "d.jsonl"
    jl.write_text('{"text": "a", "label": 10}\n{"text": "b", "label": "2"}\n')
    assert read_labeled(jl).labels == ["10", "2"]
    c = tmp_path / "d.csv"
    c.write_text('text,label\n"two\nlines",x\nthird,y\n', encoding="utf-8")
    data = read_labeled(c)
    assert data.texts == ["two\nlines", "third"] and data.lines == [2, 4]
    assert data.class_balance() == {"x": 1, "y": 1}


def test_classification_metrics_by_hand():
    """Accuracy, per-class precision/recall/F1, macro-F1 and the confusion matrix agree with
    values worked out by hand."""
    m = classification_metrics([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2], ["a", "b", "c"])
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_class"]["a"] == {
        "precision": 1.0,
        "recall": pytest.approx(2 / 3),
        "f1": pytest.approx(0.8),
        "support": 3,
    }
    assert m["per_class"]["b"]["f1"] == pytest.approx(0.5)
    assert m["per_class"]["c"]["f1"] == pytest.approx(2 / 3)
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)


def test_stratified_split_and_sample_are_seeded_and_balanced():
    """Held-out rows keep class shares, are disjoint from kept rows and repeat for a seed;
    stratified_sample returns exactly n rows with every class present."""
    labels = ["a"] * 90 + ["b"] * 10
    keep, held = stratified_split(labels, 0.1, seed=3)
    assert sorted(keep + held) == list(range(100)) and not set(keep) & set(held)
    assert [labels[i] for i in held].count("a") == 9 and [labels[i] for i in held].count("b") == 1
    assert (keep, held) == stratified_split(labels, 0.1, seed=3)
    assert held != stratified_split(labels, 0.1, seed=4)[1]
    sample = stratified_sample(labels, 7, seed=0)
    assert len(sample) == 7 and {labels[i] for i in sample} == {"a", "b"}


def test_confusion_png_is_written(tmp_path):
    """save_confusion_png writes a PNG file."""
    p = save_confusion_png([[3, 1], [0, 4]], ["neg", "pos"], tmp_path / "cm.png", title="t")
    assert p.read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------- genre demo


def test_genre_dataset_splits_by_play_with_all_genres_in_eval(tmp_path):
    """No play contributes passages to both splits, all three genres are in eval, every
    passage is verbatim text of a play of its label's genre, and the files are reproducible."""
    from moorelm.corpus import shakespeare_plays

    train_path, eval_path = make_genre_dataset(tmp_path / "g", passages_per_play=3, seed=0)
    splits = json.loads((tmp_path / "g" / SPLITS_FILE).read_text())
    assert not set(splits["train_plays"]) & set(splits["eval_plays"])
    assert set(splits["eval_plays"].values()) == set(GENRES)
    plays = {p.name: (p.genre, p.text()) for p in shakespeare_plays()}
    for path, side in ((train_path, "train_plays"), (eval_path, "eval_plays")):
        data = read_labeled(path)
        assert set(data.labels) == set(GENRES)
        for text, label in zip(data.texts, data.labels):
            sources = [name for name, (_, body) in plays.items() if text in body]
            assert sources and all(name in splits[side] for name in sources), text[:60]
            assert plays[sources[0]][0] == label
            assert 400 <= len(text) <= 800
    again = make_genre_dataset(tmp_path / "g2", passages_per_play=3, seed=0)
    assert again[1].read_bytes() == eval_path.read_bytes()


def test_play_passages_cut_at_line_boundaries():
    """Passages are whole lines, between min and max characters, and in play order."""
    text = "Title\n\nACT I\n\n" + "\n\n".join(f"A{i}:\n" + "word " * 20 for i in range(30)) + "\n"
    passages = play_passages(text, 150, 300)
    assert passages and all(150 <= len(p) <= 300 for p in passages)
    assert all(p in text for p in passages) and "ACT I" not in "".join(passages)
