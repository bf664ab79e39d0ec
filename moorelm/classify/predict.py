"""Running a fine-tuned Hugging Face classifier: label texts, or the rows of a file.

    classify("runs/genre", ["a text", ...])        # [{"label": ..., "score": ...}, ...]
    classify_file("runs/genre", "texts.csv")       # writes texts.predictions.csv

The output is that of ``transformers.pipeline("text-classification")``: the top label and its
softmax score. ``predict_file`` writes any backend's predictions for a file the same way
(the CLI uses it for classifiers on moorelm's own GPTs, ``moorelm.finetune.gpt_classifier``).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from moorelm.atomic import atomic_write_text, check_writable
from moorelm.classify.data import TABLE_FORMATS, read_texts, table_format
from moorelm.classify.encoder import (
    is_sequence_classifier,
    load_config,
    load_sequence_classifier,
    load_tokenizer,
    resolve_model,
)
from moorelm.errors import MoorelmError

Predictions = list[dict[str, Any]]


class _LoadedClassifier:
    """A saved sequence classifier and its tokenizer, ready to label texts."""

    def __init__(self, model_dir: str | os.PathLike):
        if model_dir is None or str(model_dir) == "":
            raise MoorelmError("pass the folder of a fine-tuned classifier")
        source, local = resolve_model(model_dir)
        config = load_config(source, local)
        if not is_sequence_classifier(config):
            kind = ", ".join(config.architectures or []) or config.model_type
            raise MoorelmError(
                f"{source} holds a {kind} model, not a text classifier; fine-tune one first "
                f"(moorelm finetune-classifier)"
            )
        self.tok = load_tokenizer(source, local)
        self.model = load_sequence_classifier(source, local)
        self.model.eval()
        self.source = source
        self.id2label = {int(i): str(n) for i, n in self.model.config.id2label.items()}
        limits = [getattr(self.model.config, "max_position_embeddings", None)]
        tok_limit = getattr(self.tok, "model_max_length", None)
        if tok_limit and tok_limit < 1_000_000:
            limits.append(tok_limit)
        self.max_length = min(x for x in limits if x) if any(limits) else 512

    def predict(
        self, texts: Sequence[str], batch_size: int = 64, max_length: int | None = None
    ) -> Predictions:
        import torch

        if isinstance(texts, str):
            raise MoorelmError("classify takes a list of texts, not a single string")
        if batch_size < 1:
            raise MoorelmError(f"batch_size must be positive, not {batch_size}")
        max_length = min(max_length or self.max_length, self.max_length)
        device = next(self.model.parameters()).device
        multi_label = (
            getattr(self.model.config, "problem_type", None) == "multi_label_classification"
        )
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # batch similar lengths
        results: list[dict[str, Any] | None] = [None] * len(texts)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                batch = self.tok(
                    [texts[i] for i in idx],
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                    return_tensors="pt",
                ).to(device)
                logits = self.model(**batch).logits.float()
                if logits.shape[-1] == 1 or multi_label:
                    probs = torch.sigmoid(logits)
                else:
                    probs = torch.softmax(logits, dim=-1)
                score, top = probs.max(dim=-1)
                for i, s, c in zip(idx, score.tolist(), top.tolist()):
                    results[i] = {"label": self.id2label.get(c, f"LABEL_{c}"), "score": s}
        return results  # type: ignore[return-value]


def classify(
    model_dir: str | os.PathLike,
    texts: list[str],
    *,
    batch_size: int = 64,
    max_length: int | None = None,
) -> Predictions:
    """Label each text with a fine-tuned classifier: ``[{"label": str, "score": float}, ...]``.

    Like ``transformers.pipeline("text-classification")``: the top label and its softmax
    probability (sigmoid for single-output or multi-label models). Texts are truncated to
    ``max_length`` tokens (default: the model's limit). A classifier on a moorelm GPT (a run
    folder) is run by ``moorelm.finetune.gpt_classifier.classify_gpt`` instead.
    """
    return _LoadedClassifier(model_dir).predict(texts, batch_size=batch_size, max_length=max_length)


def _default_out_file(in_file: Path) -> Path:
    suffix = in_file.suffix.lower() if in_file.suffix.lower() in TABLE_FORMATS else ".csv"
    return in_file.with_name(f"{in_file.stem}.predictions{suffix}")


def predict_file(
    predict: Callable[[list[str]], Predictions],
    in_file: str | os.PathLike,
    out_file: str | os.PathLike | None = None,
    *,
    text_column: str = "text",
) -> dict[str, Any]:
    """Label the texts of a CSV/TSV/JSONL file with ``predict`` (texts -> predictions) and
    write text,label,score rows to ``out_file`` atomically.

    The output format follows ``out_file``'s extension (.csv, .tsv or .jsonl; in TSV, tabs and
    newlines inside texts become spaces). Without ``out_file``, writes
    ``<in_file stem>.predictions.<ext>`` next to the input. Returns ``{"out_file", "rows",
    "label_counts"}``.
    """
    in_path = Path(in_file)
    out_path = Path(out_file) if out_file else _default_out_file(in_path)
    fmt = table_format(out_path)
    if out_path.exists() and in_path.exists() and out_path.resolve() == in_path.resolve():
        raise MoorelmError(f"{out_path} is the input file; choose another output file")
    if out_path.is_dir():
        raise MoorelmError(f"{out_path} is a folder; choose an output file")
    check_writable(out_path)  # written once every text is labelled
    texts, _ = read_texts(in_path, text_column)
    predictions = predict(texts)
    f = io.StringIO(newline="")
    if fmt == "jsonl":
        for text, p in zip(texts, predictions):
            f.write(json.dumps({"text": text, **p}, ensure_ascii=False) + "\n")
    elif fmt == "tsv":
        f.write("text\tlabel\tscore\n")
        for text, p in zip(texts, predictions):
            flat = re.sub(r"[\t\r\n]+", " ", text)
            f.write(f"{flat}\t{p['label']}\t{p['score']:.6f}\n")
    else:
        writer = csv.writer(f)
        writer.writerow(["text", "label", "score"])
        for text, p in zip(texts, predictions):
            writer.writerow([text, p["label"], f"{p['score']:.6f}"])
    atomic_write_text(out_path, f.getvalue())
    counts = Counter(p["label"] for p in predictions)
    ordered = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return {"out_file": str(out_path), "rows": len(texts), "label_counts": ordered}


def classify_file(
    model_dir: str | os.PathLike,
    in_file: str | os.PathLike,
    out_file: str | os.PathLike | None = None,
    *,
    text_column: str = "text",
    batch_size: int = 64,
    max_length: int | None = None,
) -> dict[str, Any]:
    """``predict_file`` with the Hugging Face classifier in ``model_dir`` (see ``classify``)."""
    def predict(texts: list[str]) -> Predictions:
        return classify(model_dir, texts, batch_size=batch_size, max_length=max_length)

    return predict_file(predict, in_file, out_file, text_column=text_column)
