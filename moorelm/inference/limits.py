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

import torch

from moorelm.errors import MoorelmError
from moorelm.generate import check_phrases
from moorelm.inference.sequence import Request
from moorelm.model import lazy_kv

MAX_CHOICES = 64  # prompts x n in one request
MAX_BIAS = 100.0  # |logit_bias value|, as OpenAI
KV_MEMORY = 2 << 30  # default KV-cache budget in bytes, all slots together
MAX_SLOTS = 64  # default slots of a CPU cache (memory taken as used)
RESERVED_SLOTS = 16  # default slots of a cache reserved up front (GPU)
MAX_BATCH = 1 << 16  # the most slots taken: beyond, the cache's shape overflows its sizes
KV_DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}  # None: the model's


def kv_dtype_of(name: str | None) -> torch.dtype | None:
    """The dtype of the KV cache's keys and values for a ``--kv-dtype`` name (None or "auto":
    the model's own); an unknown name is a MoorelmError."""
    if name is None:
        return None
    if name not in KV_DTYPES:
        raise MoorelmError(f"unknown KV-cache dtype {name!r}; choose one of: "
                           f"{', '.join(KV_DTYPES)}")
    return KV_DTYPES[name]


def kv_bytes_per_token(cfg, bytes_per_value: int = 4) -> int:
    """Bytes one position of one sequence takes in the KV cache: keys and values of every
    layer (B=1, K heads of D values each)."""
    return 2 * cfg.n_layer * cfg.kv_heads * cfg.head_dim * bytes_per_value


@dataclass(frozen=True)
class KVPlan:
    """How the KV cache serves: ``slots`` sequences decoded together, up to ``context``
    positions each, and at most ``token_budget`` positions held by all slots together
    (the scheduler admits a choice only when its prompt + max tokens fit what is left)."""

    slots: int
    context: int
    token_budget: int
    lazy: bool  # memory taken as positions are written (CPU), not reserved up front


def plan_kv(cfg, device_type: str = "cpu", max_batch: int | None = None,
            kv_memory: int | None = None, max_seq_len: int | None = None,
            bytes_per_value: int = 4) -> KVPlan:
    """The KV cache for ``kv_memory`` bytes (default ``KV_MEMORY``) and ``max_batch`` slots.

    On a CPU (POSIX) the cache's memory is taken only as positions are written, so
    every slot gets the model's whole window (or ``max_seq_len``, or the budget, whichever
    is less), slots default to ``MAX_SLOTS``, and the budget bounds the positions held at
    once: 32 chats of 500 tokens fit where 16 reserved 8k windows would not. Elsewhere (a
    GPU) the cache is reserved up front, so the budget is divided among the slots (default
    ``RESERVED_SLOTS``) and each slot's context cut to its share. A budget that cannot hold
    one short request is a MoorelmError."""
    if max_batch is not None and (not isinstance(max_batch, int)
                                  or not 1 <= max_batch <= MAX_BATCH):
        raise MoorelmError(f"max batch must be an integer in 1..{MAX_BATCH}, got {max_batch}")
    if max_seq_len is not None and (not isinstance(max_seq_len, int) or max_seq_len < 2):
        raise MoorelmError(f"max sequence length must be an integer >= 2, got {max_seq_len}")
    budget = KV_MEMORY if kv_memory is None else kv_memory
    if not isinstance(budget, int) or budget < 1:
        raise MoorelmError(f"the KV-cache memory budget must be a positive number of bytes, "
                           f"got {budget}")
    window = min(cfg.seq_len, max_seq_len or cfg.seq_len)
    per_token = kv_bytes_per_token(cfg, bytes_per_value)
    lazy = lazy_kv(device_type)
    slots = max_batch or (MAX_SLOTS if lazy else RESERVED_SLOTS)
    tokens = budget // per_token if lazy else budget // (per_token * slots)
    if tokens < 2:
        held = "" if lazy else f" for {slots} slots"
        raise MoorelmError(
            f"a KV-cache budget of {budget / 2**20:.1f} MiB cannot hold one request{held} "
            f"({per_token * (1 if lazy else slots) / 2**10:.1f} KiB per position); raise the "
            "budget (--kv-memory)" + ("" if lazy else " or lower --max-batch"))
    context = min(window, tokens)
    return KVPlan(slots, context, tokens if lazy else slots * context, lazy)


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
