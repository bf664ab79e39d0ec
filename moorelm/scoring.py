"""Per-token log-probabilities of given token sequences: the one place that scores text.

``score_sequences`` runs the model over whole sequences (no sampling, no cache) and returns,
for every position ``i >= 1``, ``log p(ids[i] | ids[:i])``, whether that token was the
model's greedy choice, and optionally the ``top_k`` most likely tokens there. The first
position has no context and scores ``None`` (OpenAI's legacy ``echo`` shape does the same).

Likelihood evaluation (lm-evaluation-harness' ``loglikelihood``), the server's ``echo`` with
prompt log-probs, and ``LanguageModel.score`` all call this, so their numbers agree exactly.
Sequences of different lengths are batched by right-padding: the model is causal, so padding
after a sequence never changes its scores. The LM head is applied in slices of positions, so
a 49k-token vocabulary does not need a (batch, length, vocab) tensor at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moorelm.errors import MoorelmError
from moorelm.model import GPT

LOGITS_PER_SLICE = 1 << 24  # floats of logits computed at once (64 MiB in fp32)


@dataclass(frozen=True)
class Scored:
    """Scores of one sequence, indexed like ``ids`` (position 0 has none)."""

    ids: list[int]
    logprobs: list[float | None]  # log p(ids[i] | ids[:i]); None at i = 0
    greedy: list[bool | None]  # ids[i] was the argmax at i; None at i = 0
    top: list[list[tuple[int, float]]] | None = None  # top_k (id, log-prob), best first

    def total(self, start: int = 1) -> float:
        """Sum of the log-probs of ``ids[start:]`` (a continuation's log-likelihood)."""
        if not 1 <= start <= len(self.ids):
            raise MoorelmError(f"start {start} is outside 1..{len(self.ids)}")
        return float(sum(lp for lp in self.logprobs[start:]))

    def all_greedy(self, start: int = 1) -> bool:
        """Whether every token of ``ids[start:]`` was the greedy choice (lm-eval's is_greedy)."""
        return all(self.greedy[start:])


def _check(sequences: Sequence[Sequence[int]], vocab: int, context: int) -> list[list[int]]:
    out = []
    for n, seq in enumerate(sequences):
        ids = [int(t) for t in seq]
        if not ids:
            raise MoorelmError(f"sequence {n} is empty: there is nothing to score")
        if len(ids) > context + 1:
            raise MoorelmError(f"sequence {n} has {len(ids)} tokens; the model scores at most "
                               f"{context + 1} at once (its context is {context})")
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise MoorelmError(f"sequence {n} holds token id {bad}, outside the vocabulary "
                               f"(0..{vocab - 1})")
        out.append(ids)
    return out


@torch.no_grad()
def score_sequences(model: GPT, sequences: Sequence[Sequence[int]], *, top_k: int = 0,
                    batch_tokens: int = 4096) -> list[Scored]:
    """Score each sequence; ``top_k`` > 0 also returns that many alternatives per position.

    ``batch_tokens`` bounds the padded tokens run through the trunk at once.
    """
    cfg = model.config
    seqs = _check(sequences, cfg.vocab_size, cfg.seq_len)
    if top_k < 0:
        raise MoorelmError(f"top_k must be >= 0, got {top_k}")
    top_k = min(top_k, cfg.vocab_size)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    results: list[Scored | None] = [None] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    try:
        start = 0
        while start < len(order):
            longest = max(len(seqs[order[start]]) - 1, 1)
            count = max(1, batch_tokens // longest)
            group = order[start:start + count]
            start += count
            _score_group(model, [seqs[i] for i in group], top_k, device,
                         lambda j, s, g=group: results.__setitem__(g[j], s))
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


def _score_group(model: GPT, seqs: list[list[int]], top_k: int, device, put) -> None:
    width = max(len(s) for s in seqs) - 1
    if width == 0:  # only one-token sequences: nothing is predicted
        for j, s in enumerate(seqs):
            put(j, Scored(s, [None], [None], [[]] if top_k else None))
        return
    inputs = torch.zeros(len(seqs), width, dtype=torch.long)
    targets = torch.zeros(len(seqs), width, dtype=torch.long)
    for j, s in enumerate(seqs):
        inputs[j, :len(s) - 1] = torch.tensor(s[:-1])
        targets[j, :len(s) - 1] = torch.tensor(s[1:])
    inputs, targets = inputs.to(device), targets.to(device)
    hidden = model.hidden_states(inputs)  # (B, T, C)
    vocab = model.config.vocab_size
    step = max(1, LOGITS_PER_SLICE // (vocab * len(seqs)))
    picked, best, tops = [], [], []
    for t0 in range(0, width, step):
        logits = model.logits(hidden[:, t0:t0 + step]).float()
        logp = torch.log_softmax(logits, dim=-1)
        picked.append(logp.gather(-1, targets[:, t0:t0 + step, None])[..., 0])
        best.append(logits.argmax(-1))
        if top_k:
            tops.append(logp.topk(top_k, dim=-1))
    lp = torch.cat(picked, 1).cpu()
    argmax = torch.cat(best, 1).cpu()
    tgt = targets.cpu()
    if top_k:
        top_vals = torch.cat([t.values for t in tops], 1).cpu()
        top_ids = torch.cat([t.indices for t in tops], 1).cpu()
    for j, s in enumerate(seqs):
        n = len(s) - 1
        logprobs: list[float | None] = [None, *lp[j, :n].tolist()]
        greedy: list[bool | None] = [None, *(argmax[j, :n] == tgt[j, :n]).tolist()]
        top = None
        if top_k:
            top = [[]] + [list(zip(top_ids[j, i].tolist(), top_vals[j, i].tolist()))
                          for i in range(n)]
        put(j, Scored(s, logprobs, greedy, top))
