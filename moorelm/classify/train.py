"""The Hugging Face backend's training job: fine-tuning a pretrained encoder into a sequence
classifier with ``transformers.Trainer``, writing the model folder, ``metrics.json`` and the
confusion PNG.

The job works in ``OUT.work/`` next to ``OUT``: Trainer's checkpoints (one per evaluation)
and ``job.json``, the settings it was started with. Killed at any instant, it continues from
its newest complete checkpoint with ``resume=True`` (``--resume``). The finished folder is
assembled inside the work folder and renamed into place, so ``OUT`` is either absent (or the
previous classifier) or complete; the work folder is removed after that.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moorelm.atomic import atomic_write_json, fsync_dir
from moorelm.classify.data import check_settings, label_maps, prepare_splits
from moorelm.classify.encoder import (
    load_sequence_classifier,
    load_tokenizer,
    quiet_transformers,
    resolve_model,
)
from moorelm.classify.metrics import (
    CONFUSION_FILE,
    METRICS_FILE,
    TASK,
    classification_metrics,
    format_summary,
    run_record,
    save_confusion_png,
    say,
    warn_truncated,
)
from moorelm.errors import MoorelmError, disk_full, from_os_error

BIG_EPOCH_STEPS = 1000  # above this many steps per epoch, evaluate every EVAL_EVERY steps
EVAL_EVERY = 500
WORK_SUFFIX = ".work"  # OUT.work/ holds an unfinished job
JOB_FILE = "job.json"


def _encode(tok, texts: Sequence[str], max_length: int) -> tuple[dict[str, list], int]:
    """Tokenize with truncation; also count the texts that had to be cut."""
    enc = tok(list(texts), truncation=True, max_length=max_length)
    if enc.encodings is not None:  # fast tokenizer: overflow is recorded per text
        n_cut = sum(1 for e in enc.encodings if e.overflowing)
    else:
        full = tok(list(texts), truncation=False)["input_ids"]
        n_cut = sum(1 for ids in full if len(ids) > max_length)
    return dict(enc), n_cut


class _Rows:
    """A map-style dataset of tokenized rows for ``Trainer`` (dynamic padding by the collator)."""

    def __init__(self, enc: dict[str, list], labels: Sequence[int]):
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        self.items = [
            {**{k: enc[k][i] for k in keys}, "labels": int(y)} for i, y in enumerate(labels)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


def _time_limit_callback(seconds: float, lr_by_time: bool = False, warmup_ratio: float = 0.0):
    """A Trainer callback that ends training after ``seconds`` (evaluating and checkpointing
    the final state). With ``lr_by_time``, the learning rate follows the clock instead of the
    step count: linear warm-up over the first ``warmup_ratio`` of the time, then linear decay
    to zero at the deadline (use it with a constant Trainer schedule)."""
    from transformers import TrainerCallback

    class TimeLimit(TrainerCallback):
        def __init__(self) -> None:
            self.start = time.monotonic()
            self.deadline = math.inf
            self.hit = False

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.monotonic()
            self.deadline = self.start + seconds

        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            if not lr_by_time or optimizer is None:
                return
            frac = min(1.0, (time.monotonic() - self.start) / seconds)
            if frac < warmup_ratio:
                factor = frac / warmup_ratio
            else:
                factor = (1.0 - frac) / max(1e-9, 1.0 - warmup_ratio)
            for group in optimizer.param_groups:
                group["lr"] = args.learning_rate * max(factor, 0.0)

        def on_step_end(self, args, state, control, **kwargs):
            if time.monotonic() >= self.deadline and not control.should_training_stop:
                control.should_training_stop = True
                control.should_evaluate = True
                control.should_save = True
                self.hit = True
            return control

    return TimeLimit()


# ============================================================================ the work folder


def work_folder(out: Path) -> Path:
    """Where the job for ``out`` keeps its checkpoints until it is finished."""
    out = out.resolve()
    return out.with_name(out.name + WORK_SUFFIX)


def _is_classifier_folder(folder: Path) -> bool:
    try:
        metrics = json.loads((folder / METRICS_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(metrics, dict) and metrics.get("task") == TASK


def _check_out(out: Path) -> None:
    """``out`` is absent, an empty folder, or a classifier this function wrote (replaced)."""
    if out.exists() and not out.is_dir():
        raise MoorelmError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not _is_classifier_folder(out):
        raise MoorelmError(f"{out} holds files that are not a classifier; choose a new folder")


def _last_checkpoint(trainer_dir: Path) -> Path | None:
    """The newest Trainer checkpoint whose state file (written last) is whole."""
    found = []
    for folder in trainer_dir.glob("checkpoint-*"):
        try:
            state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
            found.append((int(state["global_step"]), folder))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
            continue  # killed while saving: the one before it is complete
    return max(found)[1] if found else None


def _start_work(work: Path, job: dict[str, Any], resume: bool) -> Path | None:
    """Create or reopen the work folder; the checkpoint to resume from, if any."""
    job_file = work / JOB_FILE
    if work.exists() and not job_file.is_file():
        raise MoorelmError(f"{work} exists and is not moorelm's work folder; move it away")
    if not resume:
        if work.exists():
            raise MoorelmError(f"{work} holds an interrupted fine-tune; pass --resume (resume=True) "
                               "to continue it, or delete that folder to start over")
        work.mkdir(parents=True)
        atomic_write_json(job_file, job)
        return None
    if not work.exists():
        raise MoorelmError(f"nothing to resume: {work} does not exist")
    before = json.loads(job_file.read_text(encoding="utf-8"))
    changed = [k for k in job if before.get(k) != job[k]]
    if changed:
        k = changed[0]
        raise MoorelmError(f"{k} differs from the interrupted run's ({job[k]!r}, was {before.get(k)!r}); "
                           "resume with the same settings")
    return _last_checkpoint(work / "trainer")


TRACKER_DIRS = ("tb", "wandb")  # what report_to's trackers write, kept in the result folder


@contextlib.contextmanager
def _tracker_env(report_to: Sequence[str], work: Path):
    """Point ``report_to``'s trackers at the work folder while training (TensorBoard event
    files in ``tb/``, wandb offline in ``wandb/``), restoring the environment afterwards."""
    want = {}
    if "tensorboard" in report_to:
        want["TENSORBOARD_LOGGING_DIR"] = str(work / "tb")
    if "wandb" in report_to:
        want.update(WANDB_DIR=str(work), WANDB_MODE=os.environ.get("WANDB_MODE", "offline"))
    before = {k: os.environ.get(k) for k in want}
    os.environ.update({k: v for k, v in want.items() if before[k] is None or k == "WANDB_MODE"})
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _native_bf16() -> bool:
    """Whether bf16 autocast runs natively here: a CUDA GPU with bf16, or a CPU with
    AVX-512 BF16 or AMX (elsewhere bf16 is emulated and slower than fp32)."""
    import torch

    from moorelm.device import cpu_supports_bf16

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_supports_bf16()


def _publish(staged: Path, out: Path, work: Path) -> None:
    """Put the finished folder in place of ``out`` (two renames), then drop the work folder."""
    previous = work / "previous"
    if out.exists():
        if previous.exists():
            shutil.rmtree(previous)
        os.rename(out, previous)
    os.rename(staged, out)
    fsync_dir(out.parent)
    shutil.rmtree(work, ignore_errors=True)


# ============================================================================ training


def finetune_classifier(
    model: str | None,
    train_file: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    eval_file: str | os.PathLike | None = None,
    text_column: str = "text",
    label_column: str = "label",
    epochs: float = 3.0,
    lr: float = 1e-4,
    batch_size: int = 32,
    max_length: int = 128,
    seed: int = 0,
    eval_fraction: float = 0.1,
    early_stopping_patience: int | None = 2,
    max_train_rows: int | None = None,
    progress: bool = True,
    max_steps: int | None = None,
    time_limit_s: float | None = None,
    eval_steps: int | None = None,
    lr_by_time: bool = False,
    bf16: bool | None = None,
    group_by_length: bool = True,
    warmup_ratio: float = 0.1,
    weight_decay: float = 0.01,
    resume: bool = False,
    report_to: Sequence[str] = (),
) -> dict[str, Any]:
    """Fine-tune a pretrained encoder into a text classifier with ``transformers.Trainer``.

    ``model``: None for the bundled MiniLM-L6 (offline), a local Hugging Face folder, or a hub
    id (needs the network or the local cache). Without ``eval_file``, a stratified, seeded
    ``eval_fraction`` of the training rows is held out for evaluation. Evaluation runs each
    epoch (every ``EVAL_EVERY`` steps when an epoch has more than ``BIG_EPOCH_STEPS`` steps, or
    every ``eval_steps`` if given); the best state by macro-F1 is kept, and training stops
    after ``early_stopping_patience`` evaluations without improvement (None or 0: never).
    ``max_train_rows`` keeps a stratified, seeded sample of the training rows;
    ``max_steps`` caps optimizer steps; ``time_limit_s`` stops training after that many
    seconds of this process (the state at that point is evaluated too); with ``lr_by_time``
    as well, the learning rate warms up and decays over those seconds rather than over steps,
    so a run sized by time still ends its schedule (set ``epochs``/``max_steps`` generously).
    ``bf16`` trains under bfloat16 autocast (fast on CPUs with AMX/AVX512-BF16 and on recent
    GPUs); None (the default) turns it on where the hardware has native bf16 and off
    elsewhere. ``group_by_length`` (default on) batches texts of similar length together,
    which cuts padding a lot when lengths vary (on SST-2, 1.7x the rows per second).

    ``out_dir`` (absent, empty, or an earlier classifier, which is replaced) receives a
    standard Hugging Face folder (config with id2label/label2id, model.safetensors, tokenizer
    files), ``metrics.json`` and ``confusion_matrix.png``, all at once. Until then the job
    checkpoints into ``out_dir.work/`` at every evaluation; ``resume=True`` continues an
    interrupted job from there with the same arguments. Returns the metrics (also written to
    metrics.json) plus ``metrics_path`` and ``confusion_png``.
    """
    check_settings(batch_size=batch_size, epochs=epochs, lr=lr, max_steps=max_steps,
                   time_limit_s=time_limit_s)
    if not isinstance(max_length, int) or max_length < 2:
        raise MoorelmError(f"max length must be an integer >= 2, got {max_length!r}")
    out = Path(out_dir)
    _check_out(out)
    work = work_folder(out)
    staged = work / "final"
    if resume and (staged / METRICS_FILE).is_file():  # killed while publishing: finish that
        result = json.loads((staged / METRICS_FILE).read_text(encoding="utf-8"))
        return _publish_result(staged, out, work, result, progress)

    # ---- data (backend-independent checks first, before loading any model)
    d = prepare_splits(train_file, eval_file, text_column, label_column,
                       eval_fraction=eval_fraction, seed=seed, max_train_rows=max_train_rows,
                       progress=progress)
    source, local = resolve_model(model)
    if bf16 is None:
        bf16 = _native_bf16()
    hp = {
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "max_length": max_length,
        "seed": seed,
        "eval_fraction": None if eval_file else eval_fraction,
        "early_stopping_patience": early_stopping_patience,
        "max_train_rows": max_train_rows,
        "max_steps": max_steps,
        "time_limit_s": time_limit_s,
        "lr_schedule": "linear over time" if lr_by_time and time_limit_s else "linear over steps",
        "eval_strategy": f"every {eval_steps} steps" if eval_steps else "every epoch",
        "bf16": bf16,
        "group_by_length": group_by_length,
        "warmup_ratio": warmup_ratio,
        "weight_decay": weight_decay,
    }
    job = {
        "task": TASK,
        "model": source,
        "train_file": str(d.train_all.path.resolve()),
        "eval_file": str(Path(eval_file).resolve()) if eval_file else None,
        "text_column": d.train.text_column,
        "label_column": d.train.label_column,
        "labels": d.names,
        "rows": {"train": len(d.train), "eval": len(d.eval)},
        **hp,
    }
    checkpoint = _start_work(work, job, resume)

    tok, net, label2id = _load_encoder(source, local, d.names, seed, max_length)
    train_ds, eval_ds, truncated = _tokenize(tok, d.train, d.eval, label2id, max_length)
    with _resume_after_full_disk(work):
        run = _run_trainer(net, tok, train_ds, eval_ds, d.names, hp, work=work,
                           eval_steps=eval_steps, checkpoint=checkpoint, report_to=report_to,
                           progress=progress)
    metrics = classification_metrics(run.y_true, run.y_pred, d.names)
    state = run.trainer.state
    result = run_record(
        backend="hf-encoder", model=source, splits=d, eval_file=eval_file,
        max_length=max_length, truncated=truncated, metrics=metrics, train_time=run.train_time,
        steps=int(state.global_step), epochs_run=float(state.epoch or 0.0),
        best_f1=state.best_metric,
        stopped_early=bool(state.global_step < state.max_steps and not run.time_limit_hit),
        time_limit_hit=run.time_limit_hit, out=out,
        resumed_from_step=int(checkpoint.name.split("-")[1]) if checkpoint else None,
        hyperparameters={**hp, "torch_threads": run.threads})
    result["rows"]["train_seen"] = min(  # rows trained on, repeats counted
        len(d.train) * math.ceil(epochs), round(float(state.epoch or 0) * len(d.train)))
    with _resume_after_full_disk(work):
        _assemble(staged, work, run.trainer.model, tok, result)
    return _publish_result(staged, out, work, result, progress)


@contextlib.contextmanager
def _resume_after_full_disk(work: Path) -> Iterator[None]:
    """A full disk met while writing into the work folder (Trainer's checkpoints, the
    finished folder) as one line that says how to go on: ``--resume`` continues from the
    last checkpoint written (the same command without it is refused while the work folder
    exists)."""
    try:
        yield
    except Exception as e:
        if not disk_full(e):
            raise
        raise from_os_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), f"write {work}",
                            again="run the same command with --resume") from None


def _load_encoder(source: str, local: bool, names: list[str], seed: int, max_length: int):
    """The tokenizer and a freshly headed sequence classifier for ``names``, seeded; and
    the label -> class id map."""
    from transformers import set_seed

    tok = load_tokenizer(source, local)
    id2label, label2id = label_maps(names)
    set_seed(seed)
    net = load_sequence_classifier(source, local, num_labels=len(names), id2label=id2label,
                                   label2id=label2id, ignore_mismatched_sizes=True)
    net.config.pad_token_id = tok.pad_token_id
    limit = getattr(net.config, "max_position_embeddings", None)
    if limit and max_length > limit:
        raise MoorelmError(
            f"max_length={max_length} exceeds the model's limit of {limit} positions"
        )
    return tok, net, label2id


def _tokenize(tok, train, eval_data, label2id: dict[str, int], max_length: int):
    """Both splits as Trainer datasets, and how many texts of each were truncated (warned)."""
    train_enc, train_cut = _encode(tok, train.texts, max_length)
    eval_enc, eval_cut = _encode(tok, eval_data.texts, max_length)
    warn_truncated(max_length, (train_cut, len(train), "train"),  # finetune_classifier's caller
                   (eval_cut, len(eval_data), "eval"), stacklevel=3)
    train_ds = _Rows(train_enc, [label2id[y] for y in train.labels])
    eval_ds = _Rows(eval_enc, [label2id[y] for y in eval_data.labels])
    return train_ds, eval_ds, {"train": train_cut, "eval": eval_cut}


def _training_arguments(hp: dict[str, Any], work: Path, steps_per_epoch: int,
                        eval_steps: int | None, report_to: Sequence[str], progress: bool):
    """Trainer's settings for the hyperparameters ``hp`` (see ``finetune_classifier``)."""
    import torch
    from transformers import TrainingArguments

    strategy = "steps" if eval_steps else "epoch"
    timed_lr = hp["lr_schedule"] == "linear over time"
    bf16 = hp["bf16"]
    # Checkpoints carry the optimizer, scheduler and RNG states for resuming: Trainer's own
    # files, which it reads back with torch.load(weights_only=True), and which are deleted
    # with the work folder once the safetensors result is in place.
    return TrainingArguments(
        output_dir=str(work / "trainer"),
        num_train_epochs=hp["epochs"],
        max_steps=hp["max_steps"] if hp["max_steps"] else -1,
        learning_rate=hp["lr"],
        lr_scheduler_type="constant" if timed_lr else "linear",
        warmup_steps=0 if timed_lr else hp["warmup_ratio"],
        weight_decay=hp["weight_decay"],
        per_device_train_batch_size=hp["batch_size"],
        per_device_eval_batch_size=max(hp["batch_size"], 64),
        eval_strategy=strategy,
        save_strategy=strategy,
        save_total_limit=1,
        load_best_model_at_end=True,
        metric_for_best_model="macro_f1",
        greater_is_better=True,
        logging_strategy="steps",
        logging_steps=max(1, min(50, steps_per_epoch // 2)),
        report_to=list(report_to) if report_to else "none",
        seed=hp["seed"],
        data_seed=hp["seed"],
        bf16=bf16,
        train_sampling_strategy="group_by_length" if hp["group_by_length"] else "random",
        use_cpu=bf16 and not torch.cuda.is_available(),  # bf16 autocast on CPU
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        **({"eval_steps": eval_steps, "save_steps": eval_steps} if eval_steps else {}),
    )


@dataclass
class _Run:
    """What one ``Trainer.train`` left: the trainer (its best model loaded), the kept model's
    predictions on the evaluation rows, and the clock."""

    trainer: Any
    y_true: np.ndarray
    y_pred: np.ndarray
    train_time: float
    time_limit_hit: bool
    threads: int


def _run_trainer(net, tok, train_ds: _Rows, eval_ds: _Rows, names: list[str],
                 hp: dict[str, Any], *, work: Path, eval_steps: int | None,
                 checkpoint: Path | None, report_to: Sequence[str], progress: bool) -> _Run:
    """Train with ``transformers.Trainer`` (from ``checkpoint`` if given), keeping the best
    evaluation by macro-F1, and predict the evaluation rows with the model kept."""
    import torch
    from transformers import (
        DataCollatorWithPadding,
        EarlyStoppingCallback,
        PrinterCallback,
        Trainer,
    )

    steps_per_epoch = math.ceil(len(train_ds) / hp["batch_size"])
    if eval_steps is None and steps_per_epoch > BIG_EPOCH_STEPS:
        eval_steps = EVAL_EVERY
    args = _training_arguments(hp, work, steps_per_epoch, eval_steps, report_to, progress)

    # global step -> (true, predicted) class ids of that evaluation. Labels are taken from
    # Trainer's output, not file order, since a length-grouping sampler may reorder rows.
    predictions_at: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def trainer_metrics(p) -> dict[str, float]:
        logits = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
        y_hat = np.argmax(logits, axis=-1)
        predictions_at[trainer.state.global_step] = (np.asarray(p.label_ids), y_hat)
        m = classification_metrics(p.label_ids, y_hat, names)
        return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}

    callbacks = []
    if hp["early_stopping_patience"]:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=hp["early_stopping_patience"]))
    timer = None
    if hp["time_limit_s"]:
        timer = _time_limit_callback(hp["time_limit_s"], hp["lr_schedule"] == "linear over time",
                                     hp["warmup_ratio"])
        callbacks.append(timer)
    env = contextlib.ExitStack()  # trackers read their folders when Trainer makes them
    env.enter_context(_tracker_env(report_to, work))
    trainer = Trainer(
        model=net,
        args=args,
        data_collator=DataCollatorWithPadding(tok),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tok,
        compute_metrics=trainer_metrics,
        callbacks=callbacks,
    )
    if not progress:
        trainer.remove_callback(PrinterCallback)
    if checkpoint is not None:
        say(progress, f"resuming from {checkpoint.name}")
    with quiet_transformers(not progress), env:
        started = time.perf_counter()
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        train_time = time.perf_counter() - started
        best = trainer.state.best_global_step
        if best in predictions_at:
            # the kept model is the one evaluated at that step: reuse its predictions
            y_true, y_pred = predictions_at[best]
        else:
            final = trainer.predict(eval_ds)
            logits = final.predictions
            logits = logits[0] if isinstance(logits, tuple) else logits
            y_true, y_pred = np.asarray(final.label_ids), np.argmax(logits, axis=-1)
    assert len(y_true) == len(eval_ds)
    return _Run(trainer, y_true, y_pred, train_time, bool(timer and timer.hit),
                torch.get_num_threads())


def _assemble(staged: Path, work: Path, model, tok, result: dict[str, Any]) -> None:
    """Write the finished folder in the work folder: the Hugging Face model and tokenizer,
    the confusion PNG, the trackers' logs, and ``metrics.json`` last (it marks it whole)."""
    if staged.exists():
        shutil.rmtree(staged)
    with quiet_transformers():
        model.save_pretrained(staged)
        tok.save_pretrained(staged)
    save_confusion_png(
        result["confusion_matrix"],
        result["labels"],
        staged / CONFUSION_FILE,
        title=f"accuracy {result['accuracy']:.3f}, macro-F1 {result['macro_f1']:.3f} "
        f"({result['rows']['eval']} eval rows)",
    )
    for name in TRACKER_DIRS:
        if (work / name).is_dir():
            shutil.copytree(work / name, staged / name, dirs_exist_ok=True)
    atomic_write_json(staged / METRICS_FILE, result)


def _publish_result(staged: Path, out: Path, work: Path, result: dict[str, Any],
                    progress: bool) -> dict[str, Any]:
    """Rename the assembled folder into place and return its metrics with their paths."""
    _publish(staged, out, work)
    result |= {"metrics_path": str(out / METRICS_FILE), "confusion_png": str(out / CONFUSION_FILE)}
    say(progress, format_summary(result))
    return result
