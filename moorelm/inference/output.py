"""Output handling: one choice's token ids become text and a finish reason.

``ChoiceText`` streams text without ever splitting a character (``generate.TextStreamer``),
holds back text that could be the start of a stop string (``generate.StopText``), and says
when the choice is done: "stop" (one of the model's stop ids, e.g. its end-of-turn token, which
is not emitted; or a stop string) or "length" (max tokens).
``token_logprobs`` reports log-probabilities as OpenAI does.
"""

from __future__ import annotations

import torch

from moorelm.generate import StopText, TextStreamer
from moorelm.tokenizer import Tokenizer


class ChoiceText:
    """Token ids of one choice in; the text each completes and, at the end, why it ended."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...], stop_at_eot: bool,
                 max_new_tokens: int, stop_ids: frozenset[int] | None = None):
        self.streamer = TextStreamer(tokenizer)
        self.stop = StopText(stop)
        # the tokens that end the choice (not emitted): the model's EOS ids, else end of text
        self.stop_ids = (stop_ids or frozenset((tokenizer.eot_id,))) if stop_at_eot \
            else frozenset()
        self.max_new_tokens = max_new_tokens
        self.generated = 0

    def push(self, tok: int) -> tuple[str, str | None]:
        """-> (text to emit, finish reason or None while the choice goes on)."""
        self.generated += 1
        eot = tok in self.stop_ids
        text = self.streamer.flush() if eot else self.streamer.push(tok)
        text, hit = self.stop.push(text)
        if hit or eot:
            finish = "stop"
        elif self.generated >= self.max_new_tokens:
            finish = "length"
        else:
            return text, None
        if not hit:  # what the streamer and the stop check still hold goes out now
            tail, hit = self.stop.finish(self.streamer.flush())
            text += tail
            finish = "stop" if hit else finish
        return text, finish


def token_logprobs(logits: torch.Tensor, tok: int,
                   top: int) -> tuple[float, list[tuple[int, float]] | None]:
    """Log-probability of ``tok`` and the ``top`` most likely (id, log-probability) under the
    model's own distribution, logits (1, V) before temperature, penalties and bias, as
    OpenAI reports them."""
    lp = torch.log_softmax(logits[0], dim=-1)  # (V,)
    if not top:
        return float(lp[tok]), None
    values, ids = torch.topk(lp, top)
    return float(lp[tok]), list(zip(ids.tolist(), values.tolist()))
