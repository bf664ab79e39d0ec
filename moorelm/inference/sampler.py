"""The next token of every active sequence, each from its own settings and generator.

Sequences with the same temperature, top-k, top-p and min-p are sampled in one
``generate.sample_next_token`` call (each row drawing from its own generator, so a seeded
sequence samples the same token whatever else is in the batch), after its logit bias and
penalties (``generate.apply_penalties``, ``apply_repetition_penalty``) and banned phrases
(``generate.BanState``: tokens that would complete one are set to -inf) and, last, its JSON
grammar (``grammar.apply_grammars``: every constrained row's mask filled in one pass and
applied in place to the batch's logits). Rows without any
of these go through untouched, so constrained and plain rows share one batch. When such a call fails, its sequences are sampled
one by one, and only one that fails alone gets an error message in place of its token: one
bad request never fails the others.
"""

from __future__ import annotations

import logging

import torch

from moorelm.generate import apply_penalties, apply_repetition_penalty, sample_next_token
from moorelm.grammar import apply_grammars
from moorelm.inference.sequence import Sequence

log = logging.getLogger("moorelm.inference")


def sample_all(seqs: list[Sequence]) -> list[int | str]:
    """-> each sequence's next token, or the error message where sampling it failed."""
    if not seqs:
        return []
    logits, groups = [], {}
    for i, seq in enumerate(seqs):
        p, lg = seq.params, seq.logits  # (1, V)
        if seq.controlled:
            lg = _shape(seq, lg)
        logits.append(lg)
        groups.setdefault((p.temperature, p.top_k, p.top_p, p.min_p), []).append(i)
    logits = torch.cat(logits)  # (B, V), a fresh tensor: masked in place below
    constrained = [i for i, seq in enumerate(seqs) if seq.grammar is not None]
    if constrained:
        apply_grammars(logits, constrained, [seqs[i].grammar for i in constrained])
    tokens: list[int | str] = [0] * len(seqs)
    for (temperature, top_k, top_p, min_p), rows in groups.items():
        part = logits if len(rows) == len(seqs) else logits[rows]
        gens = [seqs[i].generator for i in rows]
        try:
            drawn = sample_next_token(part, temperature, top_k, top_p, gens, min_p).tolist()
        except Exception:  # find the sequence(s) at fault; the others sample as they would
            drawn = [_sample_one(logits[i : i + 1], seqs[i]) for i in rows]
        for i, tok in zip(rows, drawn):
            tokens[i] = tok
    return tokens


def _shape(seq: Sequence, lg: torch.Tensor) -> torch.Tensor:
    """A constrained sequence's logits (1, V): bias, penalties, then its bans."""
    p = seq.params
    if seq.bias is not None:
        lg = lg + seq.bias
    if seq.counts is not None:
        lg = apply_penalties(lg, seq.counts, p.presence_penalty, p.frequency_penalty)
    if seq.seen is not None:
        lg = apply_repetition_penalty(lg, seq.seen, p.repetition_penalty)
    if seq.ban is not None:
        lg = seq.ban.apply(lg)
    return lg


def _sample_one(logits: torch.Tensor, seq: Sequence) -> int | str:
    """One sequence's token, or the error message. Its generator has not moved: a draw
    takes its uniform number only once the settings have been applied."""
    p = seq.params
    try:
        return int(sample_next_token(logits, p.temperature, p.top_k, p.top_p,
                                     [seq.generator], p.min_p)[0])
    except Exception as e:
        log.warning("sampling failed for one sequence: %s", e)
        return str(e)
