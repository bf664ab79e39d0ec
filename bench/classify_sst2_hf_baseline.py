"""Baseline for bench/classify_sst2.py: a plain Hugging Face ``Trainer`` script, nothing from
moorelm's training code, on the same model, split and rows.

    python bench/classify_sst2_hf_baseline.py --data PATH/TO/sst2 [--rows 20000] [--epochs 1]

It builds the same no-overlap split as ``bench/classify_sst2.py`` (whole held-out sentences;
pool rows that are phrases of one or share a 5-word run with one are dropped), takes the same
seeded, stratified ``--rows`` of the pool as ``moorelm finetune-classifier --max-train-rows``
does, and fine-tunes the bundled MiniLM-L6 with the settings a tutorial would use: batch 16,
500 warm-up steps then linear decay, lr 5e-5, weight decay 0.01, max length 64, fp32, random
batches padded per batch. Prints the accuracy on the held-out sentences, the wall time and the
load average.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

START = time.perf_counter()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as bench/classify_sst2.py; before torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from classify_sst2 import cpu_description, no_overlap_split  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="folder holding SST-2's train.tsv")
    ap.add_argument("--rows", type=int, default=20000, help="training rows drawn from the pool")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--holdout", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import numpy as np
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from moorelm.classify.data import read_labeled, stratified_sample
    from moorelm.classify.encoder import default_encoder_path

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    data = read_labeled(Path(args.data) / "train.tsv")
    held_idx, pool_idx, counts = no_overlap_split(
        data.texts, data.labels, args.holdout, seed=args.seed
    )
    pool_labels = [data.labels[i] for i in pool_idx]
    train_idx = [pool_idx[k] for k in stratified_sample(pool_labels, args.rows, seed=args.seed)]
    print(f"split: {counts}; training on {len(train_idx)} pool rows", flush=True)

    source = str(default_encoder_path())
    tok = AutoTokenizer.from_pretrained(source)
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=2)

    def rows(indices: list[int]) -> list[dict]:
        enc = tok([data.texts[i] for i in indices], truncation=True, max_length=64)
        return [
            {**{k: enc[k][j] for k in enc}, "labels": int(data.labels[i])}
            for j, i in enumerate(indices)
        ]

    train_ds, held_ds = rows(train_idx), rows(held_idx)

    def accuracy(p) -> dict[str, float]:
        return {"accuracy": float((np.argmax(p.predictions, axis=-1) == p.label_ids).mean())}

    with tempfile.TemporaryDirectory(prefix="sst2-hf-baseline-") as work:
        targs = TrainingArguments(
            output_dir=work,
            num_train_epochs=args.epochs,
            per_device_train_batch_size=16,
            per_device_eval_batch_size=64,
            learning_rate=5e-5,
            warmup_steps=500,
            weight_decay=0.01,
            eval_strategy="no",
            save_strategy="no",
            logging_steps=100,
            report_to="none",
            seed=args.seed,
            use_cpu=True,
        )
        trainer = Trainer(
            model=model,
            args=targs,
            train_dataset=train_ds,
            eval_dataset=held_ds,
            data_collator=DataCollatorWithPadding(tok),
            compute_metrics=accuracy,
        )
        started = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - started
        acc = trainer.evaluate()["eval_accuracy"]
    wall = time.perf_counter() - START
    report = {
        "benchmark": "SST-2 no-overlap held-out sentences, plain HF Trainer baseline",
        "accuracy": round(acc, 4),
        "held_out_rows": len(held_idx),
        "rows_trained": round(len(train_idx) * args.epochs),
        "train_time_s": round(train_s, 1),
        "wall_time_s": round(wall, 1),
        "settings": "batch 16, lr 5e-5, 500 warm-up steps + linear decay, weight decay 0.01, "
        "max length 64, fp32, random batches",
        "machine": cpu_description(),
        "threads": args.threads,
        "load_average_start_end": [load_start, os.getloadavg()[0]],
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
