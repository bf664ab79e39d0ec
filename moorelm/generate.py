"""Sampling and incremental decoding.

The pieces, from pure to stateful:

- ``SamplingParams``: validated sampling settings (the one place their limits are checked);
- ``apply_penalties`` and ``sample_next_token``: pure functions of logits and a generator;
- ``generate_tokens``: prefill once, then decode one token at a time with the KV cache;
- ``TextStreamer``: turns a stream of token ids into printable text pieces without ever
  splitting a multi-byte character;
- ``LanguageModel`` (what ``moorelm.load`` returns): model + tokenizer, ``generate(prompt)``
  yields text as it is produced; ``format_prompt(text)`` wraps user text in the run's prompt
  template (stored by fine-tuning in config.json as ``prompt_template``, see
  ``apply_template``), the one place the CLI and the server turn a request into model input.

The server's engine reuses these functions; it does not have its own sampler.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from moorelm.errors import MoorelmError
from moorelm.model import GPT
from moorelm.tokenizer import Tokenizer


class MoorelmWarning(UserWarning):
    """Something the user should know, printed as one line by the CLI."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None  # nucleus sampling, in (0, 1]
    max_new_tokens: int = 256
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise MoorelmError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise MoorelmError(f"top-k must be an integer >= 1, got {self.top_k}")
        if self.top_p is not None and not (0 < self.top_p <= 1):
            raise MoorelmError(f"top-p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise MoorelmError(f"max-new-tokens must be an integer >= 0, got {self.max_new_tokens}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not -2.0 <= v <= 2.0:
                raise MoorelmError(f"{name.replace('_', ' ')} must be in [-2, 2], got {v}")


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, presence: float,
                    frequency: float) -> torch.Tensor:
    """OpenAI-style penalties: logits (..., V) minus presence*[count>0] + frequency*count."""
    if presence == 0.0 and frequency == 0.0:
        return logits
    counts = counts.to(logits.dtype)
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts


GREEDY_BELOW = 1e-4  # temperatures below this sample like 0 (greedy): no float32 overflow


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None,
                      generator: torch.Generator | Sequence[torch.Generator] | None = None,
                      ) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). Temperature 0 (or below ``GREEDY_BELOW``) is greedy.

    ``generator``: one for the whole batch, or a sequence of one per row; then each row's
    draw depends on its own generator only, and a seeded row samples the same token whatever
    else is in the batch (the serving engine samples all its rows in one call so).

    Defined for any logits but NaN: tokens at +inf share the row's whole probability, -inf
    tokens are never drawn, a row with nothing above -inf takes its first token, and top-p
    always keeps the most likely token however small p is. NaN logits (a broken checkpoint)
    raise ``MoorelmError``.
    """
    logits = logits.float()
    if temperature < GREEDY_BELOW:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    probs = _restrict(logits, top_k, top_p).softmax(dim=-1)  # (B, V)
    cdf = probs.cumsum(dim=-1)  # (B, V)
    if not bool(torch.isfinite(cdf[:, -1]).all()):  # rare: +inf, all -inf or NaN somewhere
        cdf = _restrict(_tame(logits), top_k, top_p).softmax(dim=-1).cumsum(dim=-1)
    return _draw(cdf, generator)


def _restrict(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Logits (B, V) with the tokens outside top-k and the top-p nucleus set to -inf."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p; the top one
        # always stays (a p that rounds to 0 in float32 would otherwise drop every token)
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop_sorted[..., 0] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _tame(logits: torch.Tensor) -> torch.Tensor:
    """Logits (B, V) made safe for softmax: a row with +inf entries keeps only those (as
    equals), a row with nothing above -inf keeps its first token. NaN raises MoorelmError."""
    top = logits.amax(dim=-1, keepdim=True)  # (B, 1); NaN where the row holds one
    if bool(torch.isnan(top).any()):
        raise MoorelmError("the model's next-token logits are not finite (NaN): the "
                           "checkpoint or its inputs are broken")
    inf = float("inf")
    at_inf = torch.where(torch.isposinf(logits), 0.0, -inf)  # (B, V)
    logits = torch.where(torch.isposinf(top), at_inf, logits)
    first = torch.full_like(logits, -inf)
    first[:, 0] = 0.0
    return torch.where(torch.isneginf(top), first, logits)


def _draw(cdf: torch.Tensor, generator) -> torch.Tensor:
    """One token per row of the cumulative probabilities cdf (B, V) by inverse CDF: one
    uniform number r per row.

    u = (1 - r) * total lies in (0, total], and the first index whose cumulative sum reaches
    u always has a probability above zero (a zero adds nothing to the sum before it). Three
    kernels for the whole batch, where ``torch.multinomial`` costs ~30 us a row on a CPU.
    """
    if isinstance(generator, (list, tuple)):
        r = torch.stack([torch.rand((), generator=g, device=cdf.device) for g in generator])
    else:
        r = torch.rand(cdf.shape[0], generator=generator, device=cdf.device)
    u = (1 - r)[:, None] * cdf[:, -1:]  # (B, 1)
    return torch.searchsorted(cdf, u).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g


@torch.no_grad()
def generate_tokens(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    stop_ids: set[int] | None = None,
) -> Iterator[torch.Tensor]:
    """Continue idx (B, T); yields the sampled tokens (B,) step by step.

    The prompt is prefilled once into a KV cache; each step feeds only the new token. When the
    context window fills up, the cache is rebuilt from the most recent half window and decoding
    goes on (positions must stay below ``seq_len``). Stops early when every row has produced
    a token in ``stop_ids``.
    """
    was_training = model.training
    model.eval()
    seq_len = model.config.seq_len
    device = model.wte.weight.device
    idx = idx.to(device)
    if idx.shape[1] > seq_len:
        idx = idx[:, -seq_len:]
    gen = generator or make_generator(seed, device)
    recent = [idx[:, -(seq_len // 2):]]  # enough history to rebuild the cache from
    cache = model.new_cache(idx.shape[0])
    logits, _ = model(idx, kv_cache=cache, last_only=True)
    cached = idx.shape[1]  # every row has the same length here: no need to read the cache's
    done = torch.zeros(idx.shape[0], dtype=torch.bool, device=device)
    stop = torch.tensor(sorted(stop_ids), device=device) if stop_ids else None
    try:
        for _ in range(max_new_tokens):
            nxt = sample_next_token(logits[:, -1, :], temperature, top_k, top_p, gen)  # (B,)
            yield nxt
            if stop is not None:
                done |= torch.isin(nxt, stop)
                if bool(done.all()):
                    return
            recent.append(nxt[:, None])
            if cached >= seq_len:
                keep = torch.cat(recent, dim=1)[:, -(seq_len // 2):]
                recent = [keep]
                cache.reset()
                logits, _ = model(keep, kv_cache=cache, last_only=True)
                cached = keep.shape[1]
            else:
                logits, _ = model(nxt[:, None], kv_cache=cache, last_only=True)
                cached += 1
    finally:
        model.train(was_training)


PROMPT_PLACEHOLDER = "{prompt}"


def check_template(template: str) -> str:
    """A prompt template must hold the placeholder ``{prompt}`` exactly once."""
    if not isinstance(template, str) or template.count(PROMPT_PLACEHOLDER) != 1:
        raise MoorelmError(
            f"prompt template {template!r} must contain {PROMPT_PLACEHOLDER} exactly once, "
            f"e.g. 'Q: {PROMPT_PLACEHOLDER}\\nA: '"
        )
    return template


def apply_template(template: str | None, text: str) -> str:
    """``template`` with ``{prompt}`` replaced by ``text`` (``text`` itself when no template).

    Plain replacement, not ``str.format``: braces in the user's text or elsewhere in the
    template stay as they are.
    """
    if template is None:
        return text
    return template.replace(PROMPT_PLACEHOLDER, text, 1)


class TextStreamer:
    """Token ids in, text out, never splitting a multi-byte UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.pending: list[int] = []

    def push(self, token_id: int) -> str:
        self.pending.append(int(token_id))
        text = self.tokenizer.decode(self.pending)
        # a trailing replacement character means an incomplete character: wait for more bytes
        # (at most 4 byte tokens can be outstanding)
        if text.endswith("\ufffd") and len(self.pending) < 4:
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        text = self.tokenizer.decode(self.pending) if self.pending else ""
        self.pending = []
        return text


class LanguageModel:
    """A trained model with its tokenizer: what ``moorelm.load(run)`` returns."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, run_dir: Path | None = None,
                 meta: dict | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.run_dir = run_dir
        self.meta = meta or {}
        # set by fine-tuning (moorelm.finetune.sft); None for pretrained runs
        self.prompt_template: str | None = (self.meta.get("config") or {}).get("prompt_template")

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.wte.weight.device

    def format_prompt(self, user_text: str) -> str:
        """User text as the model saw prompts in fine-tuning (unchanged without a template)."""
        return apply_template(self.prompt_template, user_text)

    def encode_prompt(self, prompt: str) -> list[int]:
        """Prompt -> ids, left-truncated (with a warning) to leave room for one new token."""
        ids = self.tokenizer.encode(prompt) if prompt else [self.tokenizer.eot_id]
        limit = self.config.seq_len - 1
        if len(ids) > limit:
            warnings.warn(
                f"prompt is {len(ids)} tokens, longer than the context window allows "
                f"({limit}); keeping its last {limit} tokens",
                MoorelmWarning, stacklevel=3,
            )
            ids = ids[-limit:]
        return ids

    def generate(self, prompt: str = "", max_new_tokens: int = 256, temperature: float = 0.8,
                 top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, stop_at_eot: bool = True) -> Iterator[str]:
        """Yield the continuation of ``prompt`` as text pieces, as they are produced."""
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                                max_new_tokens=max_new_tokens, seed=seed)
        ids = torch.tensor([self.encode_prompt(prompt)], dtype=torch.long)
        streamer = TextStreamer(self.tokenizer)
        stop = {self.tokenizer.eot_id} if stop_at_eot else None
        for tok in generate_tokens(self.model, ids, params.max_new_tokens, params.temperature,
                                   params.top_k, params.top_p, params.seed, stop_ids=stop):
            t = int(tok[0])
            if stop and t in stop:
                break
            piece = streamer.push(t)
            if piece:
                yield piece
        tail = streamer.flush()
        if tail:
            yield tail

    def complete(self, prompt: str = "", **kwargs) -> str:
        return "".join(self.generate(prompt, **kwargs))
