"""The one check of a request against the model it is for.

``ModelLimits.check`` refuses, with a ``RequestError`` naming the field, a request the model
cannot serve: no prompt, an empty prompt, token ids outside the vocabulary, prompt +
max tokens beyond the context window, too many choices, empty stop strings, logit_bias ids
or values out of range, a logprobs count out of range, an empty or whitespace-only banned
phrase. Sampling settings are checked where
they are made (``generate.SamplingParams``). The engine checks every request it is given;
the server turns a ``RequestError`` into a 400 with ``param`` set.
"""

from __future__ import annotations

from dataclasses import dataclass

from moorelm.errors import MoorelmError
from moorelm.generate import check_phrases
from moorelm.inference.sequence import Request

MAX_CHOICES = 64  # prompts x n in one request
MAX_BIAS = 100.0  # |logit_bias value|, as OpenAI
KV_MEMORY = 2 << 30  # default KV-cache budget in bytes, all slots together


def kv_bytes_per_token(cfg, bytes_per_value: int = 4) -> int:
    """Bytes one position of one sequence takes in the KV cache: keys and values of every
    layer (B=1, K heads of D values each)."""
    return 2 * cfg.n_layer * cfg.kv_heads * cfg.head_dim * bytes_per_value


def context_for_budget(cfg, max_batch: int, kv_memory: int | None = None,
                       max_seq_len: int | None = None, bytes_per_value: int = 4) -> int:
    """The context window each of ``max_batch`` slots gets: the model's own, or less where
    ``max_seq_len`` asks for less or the KV cache of every slot would not fit ``kv_memory``
    bytes (default ``KV_MEMORY``). An 8k-context model is not given 8k positions per slot
    up front unless the budget holds them. A budget that cannot hold one short request is
    a MoorelmError."""
    if max_seq_len is not None and (not isinstance(max_seq_len, int) or max_seq_len < 2):
        raise MoorelmError(f"max sequence length must be an integer >= 2, got {max_seq_len}")
    budget = KV_MEMORY if kv_memory is None else kv_memory
    if not isinstance(budget, int) or budget < 1:
        raise MoorelmError(f"the KV-cache memory budget must be a positive number of bytes, "
                           f"got {budget}")
    ctx = min(cfg.seq_len, max_seq_len or cfg.seq_len)
    per_token = kv_bytes_per_token(cfg, bytes_per_value) * max_batch
    fits = budget // per_token
    if fits < 2:
        raise MoorelmError(
            f"a KV-cache budget of {budget / 2**20:.1f} MiB cannot hold one request for "
            f"{max_batch} slots ({per_token / 2**10:.1f} KiB per position); raise the budget "
            "(--kv-memory) or lower --max-batch")
    return min(ctx, fits)


class RequestError(MoorelmError):
    """A request the model cannot serve; ``param`` names the field at fault, ``code`` is
    OpenAI's error code when it has one."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


@dataclass(frozen=True)
class ModelLimits:
    """What a model can serve: ``seq_len`` tokens of context and the token ids below
    ``token_vocab`` (ids the model has but the tokenizer does not are never used)."""

    seq_len: int
    token_vocab: int
    max_choices: int = MAX_CHOICES

    def check(self, request: Request) -> None:
        """RequestError unless the model can serve ``request``."""
        if not request.prompts:
            raise RequestError("no prompt given; send at least one", "prompt")
        if not isinstance(request.n, int) or request.n < 1:
            raise RequestError(f"n must be an integer >= 1, got {request.n}", "n")
        if request.num_choices > self.max_choices:
            raise RequestError(f"{len(request.prompts)} prompts x n={request.n} is more than "
                               f"{self.max_choices} completions in one request; split it", "n")
        max_new = request.params.max_new_tokens
        if max_new < 1:
            raise RequestError(f"max_tokens must be at least 1, got {max_new}", "max_tokens")
        for prompt in request.prompts:
            if not prompt:
                raise RequestError("prompt is empty; send at least one token of text", "prompt")
            bad = [t for t in prompt if not 0 <= t < self.token_vocab]
            if bad:
                raise RequestError(f"token id {bad[0]} in the prompt is not in the vocabulary "
                                   f"(ids 0..{self.token_vocab - 1})", "prompt")
        longest = max(len(p) for p in request.prompts)
        if longest + max_new > self.seq_len:
            raise RequestError(
                f"prompt ({longest} tokens) + max_tokens ({max_new}) = {longest + max_new} "
                f"tokens exceeds the context window of {self.seq_len} tokens served here; "
                "shorten the prompt or lower max_tokens", "max_tokens", "context_length_exceeded")
        if any(not isinstance(s, str) or not s for s in request.stop):
            raise RequestError("stop sequences must be non-empty strings", "stop")
        for tok, value in (request.logit_bias or {}).items():
            if not isinstance(tok, int) or not 0 <= tok < self.token_vocab:
                raise RequestError(f"logit_bias token id {tok} is not in the vocabulary "
                                   f"(ids 0..{self.token_vocab - 1})", "logit_bias")
            if not -MAX_BIAS <= value <= MAX_BIAS:  # NaN fails too
                raise RequestError(f"logit_bias value {value} for token {tok} must be in "
                                   f"[-{MAX_BIAS:g}, {MAX_BIAS:g}]", "logit_bias")
        try:
            check_phrases(request.bad_words)
        except MoorelmError as e:
            raise RequestError(str(e), "bad_words") from None
        if request.logprobs is not None and not 0 <= request.logprobs <= self.token_vocab:
            raise RequestError(f"logprobs must be in [0, {self.token_vocab}], got "
                               f"{request.logprobs}", "logprobs")
