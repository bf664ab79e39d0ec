"""Experiment trackers: the loop's one logger seam, TensorBoard event files that TensorBoard's
own reader reads back, wandb and Trackio offline, and a missing tracker named with its extra."""

from __future__ import annotations

import csv
import sys

import pytest

from moorelm.cli import main
from moorelm.errors import MoorelmError
from moorelm.training.trackers import parse_logger_names, scalars
from tests.conftest import TINY_MODEL

TRAIN = dict(batch_size=4, max_steps=6, log_interval=2, eval_interval=3, eval_iters=1,
             threads=1, warmup_steps=1)


def _train_argv(out, corpus, *extra: str) -> list[str]:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in {**TINY_MODEL, **TRAIN}.items()]
    return ["train", "--out", str(out), "--corpus", str(corpus), *flags, "--quiet", *extra]


def _csv_rows(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


class Recorder:
    """A logger that keeps what the loop hands it."""

    def __init__(self):
        self.config, self.rows, self.plot = None, [], None

    def start(self, config):
        self.config = config

    def log(self, row):
        self.rows.append(dict(row))

    def finish(self, loss_plot):
        self.plot = loss_plot


def test_parse_logger_names():
    """--logger takes names repeated or comma-separated, once each; none means metrics.csv
    only; an unknown name is one line listing the choices."""
    assert parse_logger_names(["tensorboard,wandb", "tensorboard", " trackio "]) == [
        "tensorboard", "wandb", "trackio"]
    assert parse_logger_names(["none"]) == [] and parse_logger_names(None) == []
    with pytest.raises(MoorelmError, match="choose from: tensorboard, wandb, trackio, none"):
        parse_logger_names(["mlflow"])
    with pytest.raises(MoorelmError, match="cannot be combined"):
        parse_logger_names(["none,wandb"])


def test_scalars_are_the_csv_numbers():
    """A metrics row's numbers go to trackers as floats; blank cells (no eval) are left out."""
    row = {"step": 4, "tokens": 512, "lr": "1.000e-03", "train_loss": "2.5000", "val_loss": "",
           "val_bpb": "", "tokens_per_s": "100.0", "elapsed": "1.00", "mfu": ""}
    assert scalars(row) == {"tokens": 512.0, "lr": 1e-3, "loss/train": 2.5,
                            "speed/tokens_per_s": 100.0}


def test_loop_hands_loggers_every_csv_row(tmp_path, small_corpus):
    """The loop's seam: a logger gets the run's config once, exactly the rows metrics.csv
    holds, and the loss plot at the end."""
    from moorelm.training.pretrain import pretrain

    rec = Recorder()
    pretrain(tmp_path / "run", corpus=str(small_corpus), model_overrides=TINY_MODEL,
             train_overrides=TRAIN, progress=False, loggers=[rec])
    assert rec.config["model"]["n_layer"] == TINY_MODEL["n_layer"]
    assert rec.config["train"]["max_steps"] == TRAIN["max_steps"]
    assert rec.config["recipe"] == "moorelm"
    csv_rows = _csv_rows(tmp_path / "run" / "metrics.csv")
    assert [{k: str(v) for k, v in r.items()} for r in rec.rows] == csv_rows
    assert rec.plot == tmp_path / "run" / "loss.png" and rec.plot.exists()


def test_tensorboard_events_read_back(capsys, tmp_path, small_corpus):
    """--logger tensorboard writes event files under RUN/tb/ that TensorBoard's own reader
    reads: the scalars of metrics.csv at their steps, the config, the loss plot image."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(_train_argv(out, small_corpus, "--logger", "tensorboard")) == 0, \
        capsys.readouterr().err
    rows = _csv_rows(out / "metrics.csv")
    acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    train = acc.Scalars("loss/train")
    assert [e.step for e in train] == [int(r["step"]) for r in rows]
    assert [e.value for e in train] == pytest.approx([float(r["train_loss"]) for r in rows],
                                                     rel=1e-6)
    val = [(e.step, e.value) for e in acc.Scalars("loss/val")]
    assert val == [(int(r["step"]), pytest.approx(float(r["val_loss"]), rel=1e-6))
                   for r in rows if r["val_loss"]]
    assert {"lr", "speed/tokens_per_s"} <= set(tags["scalars"])
    assert "loss_plot" in tags["images"]
    assert any("config" in t for t in tags["tensors"])


def test_wandb_offline_in_the_run_folder(capsys, tmp_path, small_corpus, monkeypatch):
    """--logger wandb runs offline with its files in the run folder."""
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    assert main(_train_argv(out, small_corpus, "--logger", "wandb")) == 0, capsys.readouterr().err
    assert list((out / "wandb").glob("offline-run-*"))


def test_trackio_local(capsys, tmp_path, small_corpus, monkeypatch):
    """--logger trackio logs to Trackio's local store, no network."""
    pytest.importorskip("trackio")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    out = tmp_path / "run"
    assert main(_train_argv(out, small_corpus, "--logger", "trackio")) == 0, \
        capsys.readouterr().err


@pytest.mark.parametrize("verb, name", [("train", "tensorboard"), ("train", "wandb"),
                                        ("finetune", "trackio")])
def test_missing_tracker_names_the_extra(capsys, monkeypatch, tmp_path, tiny_run, small_corpus,
                                         verb, name):
    """A logger whose package is not installed: one line naming the extra, before training."""
    monkeypatch.setitem(sys.modules, name, None)
    out = tmp_path / "run"
    if verb == "train":
        argv = _train_argv(out, small_corpus, "--logger", f"none,{name}"[5:])
    else:
        data = tmp_path / "pairs.jsonl"
        data.write_text('{"prompt": "a", "completion": "b"}\n' * 20, encoding="utf-8")
        argv = ["finetune", str(tiny_run), "--data", str(data), "--out", str(out),
                "--logger", name, "--max-steps", "1", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'moorelm[track]'" in err and name in err, err
    assert not (out / "metrics.csv").exists()


def test_classifier_report_to_tensorboard(tmp_path):
    """The Hugging Face classifier passes report_to through to Trainer (no longer forced to
    "none"): TensorBoard's events land in the result folder's tb/, readable by its reader."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("transformers")
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from moorelm.classify.train import finetune_classifier
    from tests.test_classify import _toy_rows, _write_csv

    encoder = _tiny_encoder_folder(tmp_path)
    train = _write_csv(tmp_path / "t.csv", _toy_rows(40, 2))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        finetune_classifier(str(encoder), train, tmp_path / "m", epochs=2, lr=5e-3,
                            batch_size=8, max_length=16, early_stopping_patience=None,
                            report_to=["tensorboard"], progress=False)
    finally:
        torch.set_num_threads(threads)
    acc = EventAccumulator(str(tmp_path / "m" / "tb"))
    acc.Reload()
    assert any("macro_f1" in t for t in acc.Tags()["scalars"]), acc.Tags()


def _tiny_encoder_folder(tmp_path):
    """test_classify's tiny random BERT, built here (its fixture is module-scoped there)."""
    from tests.test_classify import tiny_encoder

    class _Factory:
        def mktemp(self, name):
            path = tmp_path / name
            path.mkdir()
            return path

    return tiny_encoder.__wrapped__(_Factory())


def test_report_to_checks_the_trackers(monkeypatch):
    """report_to (the classifier's choice of trackers) refuses a tracker that is not
    installed with an ImportError the CLI turns into one line naming the extra."""
    from moorelm.cli import missing_extra
    from moorelm.training.trackers import report_to

    assert report_to([]) == []
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError) as e:
        report_to(["wandb"])
    assert "pip install 'moorelm[track]'" in str(missing_extra(e.value, "finetune-classifier"))
