"""Loss, perplexity and bits per byte of a trained model on any text.

The text is tokenized with the run's tokenizer, documents are joined with the end-of-text
token (as in training), and the token stream is scored in non-overlapping windows of the
model's context length, every token predicted once. Bits per byte divides the total loss in
bits by the UTF-8 size of the text, so models with different tokenizers compare fairly.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from moorelm.corpus import Corpus
from moorelm.errors import MoorelmError
from moorelm.generate import LanguageModel


@torch.no_grad()
def evaluate(lm: LanguageModel, corpus: Corpus, batch_size: int = 16,
             max_tokens: int | None = None, progress: bool = True) -> dict[str, float]:
    """Mean loss (nats/token), perplexity and bits per byte of ``lm`` on ``corpus``."""
    ids: list[int] = []
    nbytes = 0
    for doc in corpus.documents:
        for chunk in doc.chunks():
            ids.extend(lm.tokenizer.encode(chunk))
            nbytes += len(chunk.encode("utf-8"))
        ids.append(lm.tokenizer.eot_id)
        if max_tokens and len(ids) > max_tokens:
            break
    if max_tokens:
        ids = ids[: max_tokens + 1]
    if len(ids) < 2 or nbytes == 0:
        raise MoorelmError("the evaluation text is too short: it needs at least two tokens")
    T = lm.config.seq_len
    stream = torch.tensor(ids, dtype=torch.long)
    n_pred = len(ids) - 1
    windows = [(s, min(s + T, n_pred)) for s in range(0, n_pred, T)]
    total = 0.0
    model = lm.model
    device = lm.device
    bar = tqdm(total=n_pred, unit="tok", desc="evaluate", disable=not progress, leave=False)
    for i in range(0, len(windows), batch_size):
        group = windows[i : i + batch_size]
        width = max(e - s for s, e in group)
        x = torch.zeros(len(group), width, dtype=torch.long)
        y = torch.full((len(group), width), -1, dtype=torch.long)
        for row, (s, e) in enumerate(group):
            x[row, : e - s] = stream[s:e]
            y[row, : e - s] = stream[s + 1 : e + 1]
        _, loss = model(x.to(device), y.to(device), loss_reduction="none")
        total += float(loss[y.to(device) >= 0].sum())
        bar.update(sum(e - s for s, e in group))
    bar.close()
    mean = total / n_pred
    # bytes of the scored text: the final token predicted is part of it; the first is not, a
    # negligible edge effect on any text worth evaluating
    return {
        "loss": mean,
        "perplexity": math.exp(min(mean, 700.0)),
        "bits_per_byte": total / math.log(2) / nbytes,
        "tokens": n_pred,
        "bytes": nbytes,
    }
