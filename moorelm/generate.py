"""Sampling and incremental decoding.

The pieces, from pure to stateful:

- ``SamplingParams``: validated sampling settings (the one place their limits are checked);
- ``apply_penalties``, ``apply_repetition_penalty`` and ``sample_next_token``: pure functions
  of logits and a generator (top-k, top-p and min-p restrict what is drawn);
- ``BanList`` / ``BanState``: phrases that can never be produced, at the text level, whatever
  tokens would spell them (``BanState.mask`` gives the tokens that would complete one);
- ``generate_tokens``: prefill once, then decode one token at a time with the KV cache;
- ``generate_batch``: the same for prompts of different lengths together, one KV cache;
- ``TextStreamer``: turns a stream of token ids into printable text pieces without ever
  splitting a multi-byte character;
- ``LanguageModel`` (what ``moorelm.load`` returns): model + tokenizer. ``generate(prompt)``
  returns the continuation's text (``stream=True``: yields it piece by piece; a list of
  prompts: a list of texts, decoded together by ``generate_batch``);
  ``score(text)`` gives per-token log-probabilities (``TokenScores``, through
  ``moorelm.scoring``); ``chat(messages)`` replies; ``format_prompt(text)`` wraps user
  text in the run's prompt template (stored by fine-tuning in config.json as
  ``prompt_template``, see ``apply_template``), the one place the CLI and the server turn
  a request into model input.

The server's engine reuses these functions; it does not have its own sampler.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from moorelm.errors import MoorelmError
from moorelm.grammar import Grammar, GrammarState, apply_grammars, grammars_for
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
    min_p: float = 0.0  # vLLM's: drop tokens below min_p x the most likely one's probability
    repetition_penalty: float = 1.0  # vLLM's / CTRL's: > 1 discourages tokens already seen

    def __post_init__(self) -> None:
        t = self.temperature
        if not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:  # NaN, inf too
            raise MoorelmError(f"temperature must be >= 0 and finite, got {t!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise MoorelmError(f"top-k must be an integer >= 1, got {self.top_k!r}")
        if self.top_p is not None and not (0 < self.top_p <= 1):
            raise MoorelmError(f"top-p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise MoorelmError(f"max-new-tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not -2.0 <= v <= 2.0:
                raise MoorelmError(f"{name.replace('_', ' ')} must be in [-2, 2], got {v}")
        if not isinstance(self.min_p, (int, float)) or not 0.0 <= self.min_p <= 1.0:
            raise MoorelmError(f"min-p must be in [0, 1], got {self.min_p}")
        rp = self.repetition_penalty
        if not isinstance(rp, (int, float)) or not (0.0 < rp <= MAX_REPETITION_PENALTY):
            raise MoorelmError(f"repetition penalty must be in (0, {MAX_REPETITION_PENALTY:g}], "
                               f"got {rp}")


MAX_REPETITION_PENALTY = 100.0  # vLLM only asks > 0; past this it is a ban, use --ban


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, presence: float,
                    frequency: float) -> torch.Tensor:
    """OpenAI-style penalties: logits (..., V) minus presence*[count>0] + frequency*count."""
    if presence == 0.0 and frequency == 0.0:
        return logits
    counts = counts.to(logits.dtype)
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor,
                             penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty, as vLLM and transformers apply it: the logit of every token
    already seen (``seen`` (..., V) bool, prompt and output) is divided by ``penalty`` when
    positive and multiplied by it when negative."""
    if penalty == 1.0:
        return logits
    scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, scaled, logits)


GREEDY_BELOW = 1e-4  # temperatures below this sample like 0 (greedy): no float32 overflow


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None,
                      generator: torch.Generator | Sequence[torch.Generator] | None = None,
                      min_p: float = 0.0) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). Temperature 0 (or below ``GREEDY_BELOW``) is greedy.

    ``generator``: one for the whole batch, or a sequence of one per row; then each row's
    draw depends on its own generator only, and a seeded row samples the same token whatever
    else is in the batch (the serving engine samples all its rows in one call so).

    Defined for any logits but NaN: tokens at +inf share the row's whole probability, -inf
    tokens are never drawn, a row with nothing above -inf takes its first token, and top-p
    always keeps the most likely token however small p is. NaN logits (a broken checkpoint)
    raise ``MoorelmError``. ``min_p`` (after top-k and top-p) drops the tokens whose
    probability is below ``min_p`` times the most likely token's (vLLM's min-p).
    """
    logits = logits.float()
    if temperature < GREEDY_BELOW:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    probs = _restrict(logits, top_k, top_p, min_p).softmax(dim=-1)  # (B, V)
    cdf = probs.cumsum(dim=-1)  # (B, V)
    if not bool(torch.isfinite(cdf[:, -1]).all()):  # rare: +inf, all -inf or NaN somewhere
        cdf = _restrict(_tame(logits), top_k, top_p, min_p).softmax(dim=-1).cumsum(dim=-1)
    return _draw(cdf, generator)


def _restrict(logits: torch.Tensor, top_k: int | None, top_p: float | None,
              min_p: float = 0.0) -> torch.Tensor:
    """Logits (B, V) with the tokens outside top-k, the top-p nucleus and min-p set to -inf."""
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
    if min_p > 0.0:
        # p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p): no softmax needed
        floor = logits.amax(dim=-1, keepdim=True) + math.log(min_p)  # (B, 1)
        logits = logits.masked_fill(logits < floor, float("-inf"))
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


SEED_MASK = 2**64 - 1  # torch generators take seeds in [-2**63, 2**64), negatives as 2**64 + s


def nth_seed(seed: int | None, i: int) -> int | None:
    """The ``i``-th of a run of seeds starting at ``seed`` (prompt ``i`` of a call, sample or
    turn ``i`` of the command line): ``seed`` itself for ``i == 0``, so that one out of
    torch's range is still refused as given, then ``seed + i`` modulo 2**64."""
    return seed if seed is None or i == 0 else (seed + i) & SEED_MASK


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded with ``seed`` modulo 2**64 (the same seed torch would make of any
    seed in its range; a derived seed such as ``seed + i`` past the top wraps), or at random."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed) & SEED_MASK)
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
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    logit_bias: dict[int, float] | None = None,
    bans: BanList | None = None,
    grammars: Sequence[GrammarState] | None = None,
) -> Iterator[torch.Tensor]:
    """Continue idx (B, T); yields the sampled tokens (B,) step by step.

    ``logit_bias`` (token id -> value added to its logit), ``repetition_penalty`` (over the
    prompt and the output) and ``bans`` (phrases never produced) shape each step's logits
    before sampling; without them a step samples the model's logits as they are.
    ``grammars`` (one ``moorelm.grammar.GrammarState`` per row) restrict each row to what
    its JSON grammar allows next.

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
    # the cache holds what this call can reach (prompt + new tokens, at most the window): an
    # 8k-context model asked for a short reply does not reserve and zero 8k positions a row
    cache = model.new_cache(idx.shape[0], min(seq_len, idx.shape[1] + max(max_new_tokens, 1)))
    logits, _ = model(idx, kv_cache=cache, last_only=True)
    cached = idx.shape[1]  # every row has the same length here: no need to read the cache's
    done = torch.zeros(idx.shape[0], dtype=torch.bool, device=device)
    stop = torch.tensor(sorted(stop_ids), device=device) if stop_ids else None
    control = _Control(model.config.vocab_size, idx, logit_bias, repetition_penalty, bans,
                       grammars=grammars) \
        if logit_bias or repetition_penalty != 1.0 or bans or grammars else None
    try:
        for _ in range(max_new_tokens):
            step = logits[:, -1, :] if control is None else control.apply(logits[:, -1, :])
            nxt = sample_next_token(step, temperature, top_k, top_p, gen, min_p)  # (B,)
            if control is not None:
                control.push(nxt)
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


@torch.no_grad()
def generate_batch(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seeds: Sequence[int | None] | None = None,
    stop_ids: set[int] | None = None,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    logit_bias: dict[int, float] | None = None,
    bans: BanList | None = None,
    grammars: Sequence[GrammarState] | None = None,
) -> Iterator[torch.Tensor]:
    """Continue prompts of any lengths together; yields the sampled tokens (B,) step by step,
    in the order of ``prompts``.

    Prompts of one length are prefilled in one pass into their rows of a shared KV cache;
    then every row decodes one token per step, each row at its own position. Row ``i``
    samples from its own generator (seeded ``seeds[i]``), so its tokens are those
    ``generate_tokens`` gives it alone with that seed (up to the last bits of batched
    matrix products). Every prompt plus ``max_new_tokens`` must fit the context window
    (there is no sliding here: ``generate_tokens`` slides). Stops early when every row
    has produced a token in ``stop_ids``; rows that have stopped keep being sampled until
    then, and their later tokens mean nothing.
    """
    B = len(prompts)
    seq_len = model.config.seq_len
    longest = max(len(p) for p in prompts)
    if min(len(p) for p in prompts) < 1 or longest + max_new_tokens > seq_len:
        raise MoorelmError(f"batched prompts need 1..{seq_len - max_new_tokens} tokens each "
                           f"to leave room for {max_new_tokens} new ones")
    was_training = model.training
    model.eval()
    device = model.wte.weight.device
    gens = [make_generator(s, device) for s in (seeds or [None] * B)]
    # rows sorted by length so that each length's prompts fill consecutive rows of the cache
    order = sorted(range(B), key=lambda i: len(prompts[i]))
    back = torch.tensor(sorted(range(B), key=order.__getitem__), device=device)  # row of i
    cache = model.new_cache(B, longest + max_new_tokens)
    logits = torch.empty(B, model.config.vocab_size, device=device)  # (B, V), cache-row order
    start = 0
    while start < B:
        n = len(prompts[order[start]])
        stop = start
        while stop < B and len(prompts[order[stop]]) == n:
            stop += 1
        idx = torch.tensor([list(prompts[i]) for i in order[start:stop]], device=device)
        out, _ = model(idx, kv_cache=cache.rows(start, stop), last_only=True)  # (k, 1, V)
        logits[start:stop] = out[:, -1].float()
        start = stop
    gens = [gens[i] for i in order]
    rows = [list(prompts[i]) for i in order]
    row_grammars = [grammars[i] for i in order] if grammars else None
    control = _Control(model.config.vocab_size, rows, logit_bias, repetition_penalty, bans,
                       device, row_grammars) \
        if logit_bias or repetition_penalty != 1.0 or bans or grammars else None
    done = torch.zeros(B, dtype=torch.bool, device=device)
    stop_t = torch.tensor(sorted(stop_ids), device=device) if stop_ids else None
    try:
        for step in range(max_new_tokens):
            shaped = logits if control is None else control.apply(logits)
            nxt = sample_next_token(shaped, temperature, top_k, top_p, gens, min_p)  # (B,)
            if control is not None:
                control.push(nxt)
            yield nxt[back]
            if stop_t is not None:
                done |= torch.isin(nxt, stop_t)
                if bool(done.all()):
                    return
            if step + 1 < max_new_tokens:
                logits = model(nxt[:, None], kv_cache=cache, last_only=True)[0][:, -1].float()
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------- banned phrases


MAX_BIAS = 100.0  # |logit bias|, OpenAI's range


def check_logit_bias(bias: dict[int, float] | None, vocab_size: int) -> dict[int, float] | None:
    """A logit bias (token id -> value) with ids in the vocabulary and values in
    [-100, 100], as OpenAI's API takes it; MoorelmError otherwise."""
    if not bias:
        return None
    for tok, value in bias.items():
        if not isinstance(tok, int) or not 0 <= tok < vocab_size:
            raise MoorelmError(f"logit bias token id {tok} is not in the vocabulary "
                               f"(ids 0..{vocab_size - 1})")
        if not isinstance(value, (int, float)) or not -MAX_BIAS <= value <= MAX_BIAS:
            raise MoorelmError(f"logit bias value {value} for token {tok} must be in "
                               f"[-{MAX_BIAS:g}, {MAX_BIAS:g}]")
    return dict(bias)


def parse_logit_bias(items: Iterable[str]) -> dict[int, float] | None:
    """``["ID=VALUE", ...]`` (the CLI's ``--logit-bias``) -> {id: value}, values checked."""
    bias: dict[int, float] = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            tok, val = int(key), float(value)
        except ValueError:
            tok = val = None
        if not sep or tok is None or not math.isfinite(val):
            raise MoorelmError(f"logit bias {item!r} must be TOKEN_ID=VALUE, e.g. 198=-100")
        if not -MAX_BIAS <= val <= MAX_BIAS:
            raise MoorelmError(f"logit bias value {val:g} for token {tok} must be in "
                               f"[-{MAX_BIAS:g}, {MAX_BIAS:g}]")
        bias[tok] = val
    return bias or None


def check_phrases(phrases: Iterable[str]) -> tuple[str, ...]:
    """Banned phrases as given, refusing empty or whitespace-only ones (they would ban
    everything or nothing) and removing duplicates."""
    out: list[str] = []
    for phrase in phrases:
        if not isinstance(phrase, str) or not phrase.strip():
            raise MoorelmError(f"a banned phrase must be text with something besides "
                               f"whitespace, got {phrase!r}")
        if phrase not in out:
            out.append(phrase)
    return tuple(out)


class BanList:
    """Phrases a model may never produce, compiled for one tokenizer.

    The ban is on text, not on token sequences: a token is refused when its bytes, appended
    to the bytes produced so far, would complete a banned phrase, whichever tokens spelled
    the phrase's beginning (one token, several, a byte at a time). So every tokenisation of
    a phrase is refused, and so is a phrase that starts in one token and ends inside
    another. Matching is exact (case-sensitive) on UTF-8 bytes; banning "bad" also bans
    "badge". Special tokens (end of text) stand for no text and are never refused.

    Compiled once per phrase list: for every proper prefix of a phrase, the tokens whose
    bytes begin with the rest of it (``_after``), and the tokens that hold a whole phrase
    (``always``). A step then costs a few ``endswith`` checks on the recent text.
    """

    def __init__(self, tokenizer: Tokenizer, phrases: Iterable[str], vocab_size: int | None = None):
        self.phrases = check_phrases(phrases)
        V = vocab_size or tokenizer.vocab_size
        self.vocab_size = V
        self.pieces = pieces = token_bytes(tokenizer, V)
        encoded = [p.encode("utf-8") for p in self.phrases]
        self.always = torch.zeros(V, dtype=torch.bool)  # (V,)
        # prefix bytes already produced -> tokens (ids) that would complete a phrase after it
        self._after: dict[bytes, torch.Tensor] = {}
        for phrase in encoded:
            for t, piece in enumerate(pieces):
                if phrase in piece:
                    self.always[t] = True
            for k in range(1, len(phrase)):
                head, rest = phrase[:k], phrase[k:]
                ids = [t for t, piece in enumerate(pieces) if piece.startswith(rest)]
                if ids:
                    prev = self._after.get(head)
                    new = torch.tensor(ids, dtype=torch.long)
                    self._after[head] = new if prev is None else torch.cat([prev, new]).unique()
        self.longest = max((len(p) for p in encoded), default=0)
        self._devices: dict[str, tuple[torch.Tensor, dict[bytes, torch.Tensor]]] = {}

    def on(self, device: torch.device | str) -> tuple[torch.Tensor, dict[bytes, torch.Tensor]]:
        """The compiled tables on ``device`` (copied there once)."""
        key = str(torch.device(device))
        tables = self._devices.get(key)
        if tables is None:
            tables = (self.always.to(device), {k: v.to(device) for k, v in self._after.items()})
            self._devices[key] = tables
        return tables

    def state(self, prompt: Sequence[int] = (), device: torch.device | str = "cpu") -> BanState:
        """A fresh per-sequence state; the prompt's tail counts as text produced so far, so a
        phrase the prompt begins cannot be finished by the output."""
        st = BanState(self, device)
        for t in prompt[-self.longest:] if self.longest else ():
            st.push(int(t))
        return st


class BanState:
    """One sequence's position against a ``BanList``: the recent bytes it has produced."""

    def __init__(self, bans: BanList, device: torch.device | str = "cpu"):
        self.bans = bans
        self.tail = b""
        self._pieces = bans.pieces
        self._always, self._after = bans.on(device)

    def push(self, token: int) -> None:
        """Record a produced token."""
        if 0 <= token < len(self._pieces):
            keep = max(self.bans.longest - 1, 0)
            self.tail = (self.tail + self._pieces[token])[-keep:] if keep else b""

    def mask(self) -> torch.Tensor:
        """Tokens (V,) bool that must not come next."""
        mask = self._always
        tail = self.tail
        for head, ids in self._after.items():
            if tail.endswith(head):
                if mask is self._always:
                    mask = mask.clone()
                mask[ids] = True
        return mask

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (1, V) or (V,) with the refused tokens at -inf (padding ids are left)."""
        mask = self.mask()
        V = logits.shape[-1]
        if mask.shape[0] != V:
            full = torch.zeros(V, dtype=torch.bool, device=logits.device)
            n = min(V, mask.shape[0])
            full[:n] = mask[:n]
            mask = full
        return logits.masked_fill(mask, float("-inf"))


_TOKEN_BYTES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Tokenizer -> pieces


def token_bytes(tokenizer: Tokenizer, vocab_size: int | None = None) -> list[bytes]:
    """The bytes each token id stands for in text (special tokens: none), cached per
    tokenizer."""
    V = vocab_size or tokenizer.vocab_size
    pieces = _TOKEN_BYTES.get(tokenizer)
    if pieces is None or len(pieces) < V:
        specials = set(tokenizer.hf.get_added_tokens_decoder())
        pieces = [b"" if t in specials or t >= tokenizer.vocab_size else tokenizer.piece_bytes(t)
                  for t in range(max(V, tokenizer.vocab_size))]
        _TOKEN_BYTES[tokenizer] = pieces
    return pieces


class _Control:
    """Per-row logit shaping of ``generate_tokens``: bias, repetition penalty, bans."""

    def __init__(self, vocab_size: int, idx: torch.Tensor | Sequence[Sequence[int]],
                 logit_bias: dict[int, float] | None, repetition_penalty: float,
                 bans: BanList | None, device: torch.device | str | None = None,
                 grammars: Sequence[GrammarState] | None = None):
        """``idx``: the prompts, (B, T) or B lists of ids of any lengths; ``grammars``: one
        ``moorelm.grammar.GrammarState`` per row, or None."""
        device = idx.device if isinstance(idx, torch.Tensor) else device
        rows = idx.tolist() if isinstance(idx, torch.Tensor) else [list(r) for r in idx]
        self.grammars = list(grammars) if grammars else None
        self.bias = None
        if logit_bias:
            self.bias = torch.zeros(vocab_size, device=device)  # (V,)
            for tok, value in logit_bias.items():
                self.bias[int(tok)] = float(value)
        self.penalty = repetition_penalty
        self.seen = None
        if repetition_penalty != 1.0:
            self.seen = torch.zeros(len(rows), vocab_size, dtype=torch.bool, device=device)
            for r, row in enumerate(rows):
                self.seen[r, row] = True  # (B, V)
        self.bans = [bans.state(row, device) for row in rows] if bans else None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:
            logits = logits + self.bias
        if self.seen is not None:
            logits = apply_repetition_penalty(logits, self.seen, self.penalty)
        if self.bans is not None:
            logits = torch.stack([st.apply(row) for st, row in zip(self.bans, logits)])
        if self.grammars is not None:
            logits = logits.clone()
            apply_grammars(logits, range(len(self.grammars)), self.grammars)
        return logits

    def push(self, tokens: torch.Tensor) -> None:
        if self.seen is not None:
            self.seen.scatter_(1, tokens[:, None], True)
        if self.bans is not None:
            for st, t in zip(self.bans, tokens.tolist()):
                st.push(t)
        if self.grammars is not None:
            for st, t in zip(self.grammars, tokens.tolist()):
                st.push(t)


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


class StopText:
    """Text in, text out, cut before the first stop sequence.

    Text that could be the beginning of a stop sequence is held back until the next piece
    shows whether it is one, so a stop sequence never leaks out split across two tokens.
    """

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """-> (text safe to emit, whether a stop sequence was found)."""
        if not self.stops:
            return text, False
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[: min(hits)], True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        self.held = buf[len(buf) - hold:]
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text

    def finish(self, text: str = "") -> tuple[str, bool]:
        """A text's last piece -> (everything still to emit, what was held back included,
        whether a stop sequence was found); nothing is held after a stop sequence."""
        out, hit = self.push(text)
        return out + self.flush(), hit


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


BATCH_SLOTS = 32  # prompts of one generate() call decoded at once; the rest wait for a slot


@dataclass(frozen=True)
class _Decoding:
    """The settings of one ``LanguageModel.generate`` call, checked, shared by its prompts."""

    params: SamplingParams
    bias: dict[int, float] | None = None
    bans: BanList | None = None
    stop: frozenset[int] | None = None  # tokens that end the text (not emitted); None: none
    grammar: Grammar | None = None  # a compiled JSON schema every prompt's output follows
    stop_text: tuple[str, ...] = ()  # strings that end the text (not emitted)


def check_stop_strings(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    """``generate``'s ``stop``: a string or a list of strings, as a tuple (empty ones dropped:
    they would end every text at once)."""
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, Sequence) or not all(isinstance(s, str) for s in stops):
        raise MoorelmError(f"stop must be text or a list of texts, got {stop!r}")
    return tuple(s for s in stops if s)


@dataclass(frozen=True)
class TokenScores:
    """Per-token log-probabilities of one text (``LanguageModel.score``), position by
    position: ``ids[i]`` has text ``tokens[i]`` and ``log p = logprobs[i]`` given everything
    before it; ``greedy[i]`` says whether it was the model's most likely token there, and
    ``top[i]`` (with ``top_k``) holds the most likely (id, text, log-prob), best first."""

    ids: list[int]
    tokens: list[str]
    logprobs: list[float]
    greedy: list[bool]
    top: list[list[tuple[int, str, float]]] | None = None

    @classmethod
    def of(cls, scored, start: int, tokenizer: Tokenizer) -> TokenScores:
        """The positions ``start:`` of a ``scoring.Scored``, with each token's text."""
        ids = scored.ids[start:]
        top = None
        if scored.top is not None:
            top = [[(t, tokenizer.decode([t]), lp) for t, lp in row]
                   for row in scored.top[start:]]
        return cls(ids, [tokenizer.decode([t]) for t in ids], scored.logprobs[start:],
                   scored.greedy[start:], top)

    @property
    def total(self) -> float:
        """The text's log-likelihood: the sum of its tokens' log-probs (nats)."""
        return float(sum(self.logprobs))

    @property
    def perplexity(self) -> float:
        """exp of the mean negative log-prob per token."""
        return math.exp(-self.total / len(self.logprobs))


class LanguageModel:
    """A trained model with its tokenizer: what ``moorelm.load(run)`` returns."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, run_dir: Path | None = None,
                 meta: dict | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.run_dir = run_dir
        self.meta = meta or {}
        config = self.meta.get("config") or {}
        # set by fine-tuning (moorelm.finetune.sft); None for pretrained runs
        self.prompt_template: str | None = config.get("prompt_template")
        chat = config.get("chat") if isinstance(config.get("chat"), dict) else {}
        name = config.get("name")
        self.name: str = name if isinstance(name, str) and name.strip() else \
            (Path(run_dir).resolve().name if run_dir is not None else "moorelm")
        # an imported model's own template (None: the default one of moorelm.chat)
        self.chat_template: str | None = chat.get("template")
        ids = [i for i in chat.get("stop_ids") or () if isinstance(i, int) and
               0 <= i < tokenizer.vocab_size]
        # every token that ends the model's turn: its EOS ids (an import keeps them all)
        self.stop_ids: frozenset[int] = frozenset(ids or (tokenizer.eot_id,)) | {tokenizer.eot_id}
        self._told_old = False

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

    def generate(self, prompt: str | Sequence[str] = "", max_new_tokens: int = 256,
                 temperature: float = 0.8, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, stop_at_eot: bool = True, min_p: float = 0.0,
                 repetition_penalty: float = 1.0, logit_bias: dict[int, float] | None = None,
                 ban: Sequence[str] | BanList = (), stream: bool = False,
                 json_schema: dict | bool | None = None,
                 stop: str | Sequence[str] | None = None,
                 ) -> str | list[str] | Iterator[str] | Iterator[tuple[int, str]]:
        """The continuation of ``prompt`` as text (``str``).

        ``stream=True``: an iterator of text pieces as they are produced instead.

        A list of prompts returns a list of texts, decoded together as one batch
        (``generate_batch``, one KV cache for all); with ``stream=True`` it yields
        ``(index, piece)`` pairs. With a ``seed``, prompt ``i`` samples with ``seed + i``
        (as the server and ``moorelm generate --num-samples`` number their samples), so
        ``generate(prompts, seed=s)[i] == generate(prompts[i], seed=s + i)`` and a list
        repeating one prompt gives different samples of it. A prompt whose tokens plus
        ``max_new_tokens`` do not fit the context window runs alone after the batch, sliding
        the window as a single prompt does.

        ``ban``: phrases never produced (or a ``BanList`` from ``ban_list``, compiled once
        for many calls); ``logit_bias``: token id -> value in [-100, 100] added to its logit;
        ``min_p`` and ``repetition_penalty`` as vLLM's.
        ``json_schema``: the output is JSON valid against this schema (``{"type": "object"}``:
        any JSON object), ending at the end-of-text token once complete (``moorelm.grammar``).
        ``stop``: a string or list of strings that end the text where one first appears
        (itself not included), as the server's ``stop``; a stream holds back a piece that
        could be the start of one until the next piece shows it is not.
        """
        job = self._decoding(max_new_tokens=max_new_tokens, temperature=temperature,
                             top_k=top_k, top_p=top_p, seed=seed, stop_at_eot=stop_at_eot,
                             min_p=min_p, repetition_penalty=repetition_penalty,
                             logit_bias=logit_bias, ban=ban, json_schema=json_schema,
                             stop=stop)
        if isinstance(prompt, str):
            pieces = self._stream_one(self.encode_prompt(prompt), job, seed)
            return pieces if stream else "".join(pieces)
        if not isinstance(prompt, Sequence) or not all(isinstance(p, str) for p in prompt):
            raise MoorelmError("prompt must be text or a list of texts")
        encoded = []
        for p in prompt:  # a loop, not a comprehension: warnings point at the caller
            encoded.append(self.encode_prompt(p))
        pairs = self._stream_batch(encoded, job, seed)
        if stream:
            return pairs
        texts = [""] * len(encoded)
        for i, piece in pairs:
            texts[i] += piece
        return texts

    def _decoding(self, *, ban: Sequence[str] | BanList = (),
                  logit_bias: dict[int, float] | None = None, stop_at_eot: bool = True,
                  json_schema: dict | bool | None = None,
                  stop: str | Sequence[str] | None = None, **sampling) -> _Decoding:
        """``generate``'s keywords checked once, for every prompt of a call."""
        seed = sampling.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)
                                 or not -(2**63) <= seed <= SEED_MASK):  # torch's range
            raise MoorelmError(f"seed must be an integer in -2**63..2**64-1, got {seed!r}")
        bans = ban if isinstance(ban, BanList) else self.ban_list(ban) if ban else None
        grammar = None
        if json_schema is not None:  # compiled once per schema and tokenizer (cached)
            grammar = grammars_for(self.tokenizer, self.config.vocab_size,
                                   self.stop_ids).compile(json_schema)
        return _Decoding(params=SamplingParams(**sampling),
                         bias=check_logit_bias(logit_bias, self.tokenizer.vocab_size),
                         bans=bans, grammar=grammar,
                         stop=frozenset(self.stop_ids) if stop_at_eot or grammar else None,
                         stop_text=check_stop_strings(stop))

    def _stream_one(self, ids: list[int], job: _Decoding, seed: int | None) -> Iterator[str]:
        """One prompt's continuation as text pieces (``generate_tokens``, batch of one)."""
        p = job.params
        streamer = TextStreamer(self.tokenizer)
        text = StopText(job.stop_text)
        stop = job.stop
        grammars = [job.grammar.state()] if job.grammar is not None else None
        for tok in generate_tokens(self.model, torch.tensor([ids], dtype=torch.long),
                                   p.max_new_tokens, p.temperature, p.top_k, p.top_p, seed,
                                   stop_ids=set(stop) if stop else None, min_p=p.min_p,
                                   repetition_penalty=p.repetition_penalty,
                                   logit_bias=job.bias, bans=job.bans, grammars=grammars):
            t = int(tok[0])
            if stop and t in stop:
                break
            piece, ended = text.push(streamer.push(t))
            if piece:
                yield piece
            if ended:
                return
        tail, _ = text.finish(streamer.flush())
        if tail:
            yield tail

    def _stream_batch(self, prompts: list[list[int]], job: _Decoding,
                      seed: int | None) -> Iterator[tuple[int, str]]:
        """Several prompts decoded together (``generate_batch``, up to ``BATCH_SLOTS`` at a
        time) -> (prompt index, piece) pairs. Prompt ``i`` samples with ``seed + i``; the
        prompts a batch cannot hold (prompt + new tokens beyond the window) run alone
        afterwards, sliding the window."""
        p = job.params
        seeds = [nth_seed(seed, i) for i in range(len(prompts))]
        room = self.config.seq_len - p.max_new_tokens
        together = [i for i, ids in enumerate(prompts) if p.max_new_tokens and len(ids) <= room]
        stop = job.stop
        for c in range(0, len(together), BATCH_SLOTS):
            chunk = together[c:c + BATCH_SLOTS]
            streamers = [TextStreamer(self.tokenizer) for _ in chunk]
            texts = [StopText(job.stop_text) for _ in chunk]
            live = [True] * len(chunk)
            for toks in generate_batch(
                    self.model, [prompts[i] for i in chunk], p.max_new_tokens, p.temperature,
                    p.top_k, p.top_p, [seeds[i] for i in chunk],
                    stop_ids=set(stop) if stop else None, min_p=p.min_p,
                    repetition_penalty=p.repetition_penalty, logit_bias=job.bias,
                    bans=job.bans, grammars=None if job.grammar is None else
                    [job.grammar.state() for _ in chunk]):
                for r, t in enumerate(toks.tolist()):
                    if not live[r]:
                        continue
                    if stop and t in stop:
                        live[r] = False
                        piece, _ = texts[r].finish(streamers[r].flush())
                    else:
                        piece, ended = texts[r].push(streamers[r].push(t))
                        live[r] = not ended
                    if piece:
                        yield chunk[r], piece
                if not any(live):  # every row ended (a stop token or string): no more steps
                    break
            for r, s in enumerate(streamers):
                if not live[r]:
                    continue
                tail, _ = texts[r].finish(s.flush())
                if tail:
                    yield chunk[r], tail
        alone = sorted(set(range(len(prompts))) - set(together))
        for i in alone:
            for piece in self._stream_one(prompts[i], job, seeds[i]):
                yield i, piece

    def complete(self, prompt: str | Sequence[str] = "", **kwargs) -> str | list[str]:
        """``generate(prompt, **kwargs)`` (its text); kept for code written before
        ``generate`` returned text."""
        kwargs.pop("stream", None)
        return self.generate(prompt, **kwargs)

    def score(self, text: str | Sequence[str], context: str | None = None,
              top_k: int = 0) -> TokenScores | list[TokenScores]:
        """Per-token log-probabilities of ``text`` under the model (``TokenScores``).

        Every token of ``text`` is scored given ``context`` and the tokens before it; without
        a context, the end-of-text token (what the model sees at the start of a document)
        stands before it, so the first token is scored too. ``context`` and ``text`` are
        tokenized separately. ``top_k`` > 0 also gives that many most likely alternatives at
        each position. A list of texts returns a list, scored in batches
        (``moorelm.scoring.score_sequences``, the path every likelihood in moorelm takes).
        Text and context together must fit the context window plus one token.
        """
        from moorelm.scoring import score_sequences

        texts = [text] if isinstance(text, str) else text
        if not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
            raise MoorelmError("text to score must be text or a list of texts")
        if context is not None and not isinstance(context, str):
            raise MoorelmError("context must be text")
        head = self.tokenizer.encode(context) if context else []
        head = head or [self.tokenizer.eot_id]
        seqs = []
        for n, t in enumerate(texts):
            ids = self.tokenizer.encode(t)
            if not ids:
                raise MoorelmError(f"text {n} is empty: there is nothing to score")
            if len(head) + len(ids) > self.config.seq_len + 1:
                raise MoorelmError(
                    f"text {n} is {len(ids)} tokens after {len(head)} of context; the model "
                    f"scores at most {self.config.seq_len + 1} at once (its context window is "
                    f"{self.config.seq_len}): split it")
            seqs.append(head + ids)
        scored = score_sequences(self.model, seqs, top_k=top_k)
        out = [TokenScores.of(s, len(head), self.tokenizer) for s in scored]
        return out[0] if isinstance(text, str) else out

    def template(self):
        """The run's ``moorelm.chat.ChatTemplate`` (its own, or the documented default)."""
        from moorelm.chat import ChatTemplate

        if getattr(self, "_template", None) is None:
            self._template = ChatTemplate.from_config(self.meta.get("config"))
        return self._template

    def chat_prompt(self, messages: Sequence[dict], max_new_tokens: int = 256,
                    ) -> tuple[str, int]:
        """The conversation rendered for the model, its oldest turns dropped (system
        messages kept) until it leaves room for ``max_new_tokens`` (at least one) in the
        context window -> (prompt text, number of messages dropped)."""
        from moorelm.chat import check_messages, fit_history

        tpl = self.template()
        config = self.meta.get("config") or {}
        if "imported_from" in config and "chat" not in config and not self._told_old:
            self._told_old = True
            warnings.warn("this run was imported before imports kept the model's chat template "
                          "and stop ids; it chats through the default template (re-import it "
                          "with --force)", MoorelmWarning, stacklevel=2)
        budget = self.config.seq_len - max(1, min(max_new_tokens, self.config.seq_len // 2))
        kept, dropped = fit_history(
            check_messages(messages), lambda ms: len(self.tokenizer.encode(tpl.render(ms))),
            budget)
        return tpl.render(kept), dropped

    def chat(self, messages: Sequence[dict], stream: bool = False, max_new_tokens: int = 256,
             **kwargs) -> str | Iterator[str]:
        """The model's reply to ``messages`` (``[{"role": "user", "content": ...}, ...]``),
        rendered with the run's chat template and ending at its end-of-turn token; with
        ``stream=True`` an iterator of text pieces. Other arguments as ``generate``'s."""
        prompt, _ = self.chat_prompt(messages, max_new_tokens)
        pieces = self.chat_pieces(prompt, max_new_tokens=max_new_tokens, **kwargs)
        return pieces if stream else "".join(pieces)

    def chat_pieces(self, prompt: str, stop: str | Sequence[str] | None = None,
                    **kwargs) -> Iterator[str]:
        """``generate(prompt)`` as pieces, ending at the chat template's stop text too (the
        default template's blank line) besides ``stop``; neither is yielded."""
        stops = (*self.template().stop, *check_stop_strings(stop))
        return self.generate(prompt, stream=True, stop=stops, **kwargs)

    def ban_list(self, phrases: Sequence[str]) -> BanList:
        """``phrases`` compiled against this model's tokenizer (reuse it across calls)."""
        return BanList(self.tokenizer, phrases, self.config.vocab_size)

    def inspect(self, prompt: str | Sequence[int], **kwargs):
        """See ``moorelm.inspect.inspect``: per-token probabilities, attention, logit lens."""
        from moorelm.inspect import inspect

        return inspect(self.model, self.tokenizer, prompt, **kwargs)
