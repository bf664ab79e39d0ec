"""Continuous batching: many requests decoded together, each joining and leaving at any step.

One background thread owns the model and repeats one step:

    admit    waiting sequences take free slots: prompts are prefilled straight into their
             slots of the batched KV cache, those of equal length in one pass (a prompt with
             n > 1 choices once, then copied to its further slots)
    sample   every active row samples its next token from its own logits with its own
             settings and its own seeded generator (``generate.sample_next_token`` and
             ``generate.apply_penalties``: the server has no sampler of its own)
    emit     text goes out through the request's handle: ``TextStreamer`` never splits a
             character, and text that could be the start of a stop sequence is held back
    leave    rows that finished, or whose client went away, leave at once: the last active
             row moves into the hole, so active rows always fill the front of the cache
    decode   one forward pass of the active rows' new tokens (B, 1) over their cache rows

Because every row has its own generator and is sampled on its own, a seeded request gives
the same text whether it ran alone or in a full batch (up to the last bits of batched
matrix products, which the tests check do not change the text).

The engine knows token ids, not HTTP: ``moorelm.serve.api`` turns requests into ``Request``
objects and the events of a ``RequestHandle`` into OpenAI responses.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import torch

from moorelm.errors import MoorelmError
from moorelm.generate import (
    SamplingParams,
    TextStreamer,
    apply_penalties,
    make_generator,
    sample_next_token,
)
from moorelm.model import GPT
from moorelm.tokenizer import Tokenizer

log = logging.getLogger("moorelm.serve")

SEED_MASK = 2**64 - 1  # torch generators take seeds in [0, 2**64)
PREFILL_TOKENS = 8192  # at most this many prompt tokens in one prefill pass


class QueueFull(Exception):
    """The waiting queue is at its bound; the client should retry later (HTTP 429)."""


@dataclass(frozen=True)
class Request:
    """What to generate: ``n`` samples for each prompt (token ids), with one set of settings.

    ``logprobs``: how many most likely alternatives to report per token (0: only the chosen
    token's log-probability; None: none). ``logit_bias``: token id -> value added to its logit.
    Choice ``i * n + j`` is sample j of prompt i; with a seed, it samples with seed + i*n + j.
    """

    prompts: tuple[tuple[int, ...], ...]
    params: SamplingParams = field(default_factory=SamplingParams)
    n: int = 1
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    stop_at_eot: bool = True

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.n


@dataclass
class TokenEvent:
    """One sampled token of one choice: the text it completed (often the whole token, ""
    while a character or possible stop sequence is incomplete) and, on the choice's last
    event, why it finished: "stop" (end of text or a stop sequence), "length" (max tokens),
    or "error" (``error`` says what happened)."""

    index: int
    text: str
    token: int | None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None
    error: str | None = None
    step: int = -1  # the engine step that produced it (shows who was decoded together)


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


class RequestHandle:
    """The consumer's side of a request: events as they come, and ``cancel()``.

    Events arrive in lists (everything one engine step produced for this request). Iterate
    with ``async for`` when created with an event loop, plain ``for`` otherwise.
    """

    def __init__(self, request: Request, engine: Engine,
                 loop: asyncio.AbstractEventLoop | None = None):
        self.request = request
        self.prompt_tokens = sum(len(p) for p in request.prompts)
        self.created = time.time()
        self.cancelled = False
        self._engine = engine
        self._loop = loop
        self._queue: asyncio.Queue | queue.Queue = asyncio.Queue() if loop else queue.Queue()
        self._pending = deque(range(request.num_choices))  # choices not yet admitted
        self._open = request.num_choices  # choices not yet finished (engine side)

    def cancel(self) -> None:
        """Stop generating: the request's rows leave the batch at the engine's next step."""
        if not self.cancelled:
            self.cancelled = True
            self._engine._wake()

    def _done(self, events: list[TokenEvent]) -> bool:
        return any(e.finish_reason for e in events)

    async def __aiter__(self) -> AsyncIterator[list[TokenEvent]]:
        assert isinstance(self._queue, asyncio.Queue), "created without an event loop"
        remaining = self.request.num_choices
        while remaining:
            events = await self._queue.get()
            remaining -= sum(1 for e in events if e.finish_reason)
            yield events

    def __iter__(self) -> Iterator[list[TokenEvent]]:
        assert isinstance(self._queue, queue.Queue), "created with an event loop; use async for"
        remaining = self.request.num_choices
        while remaining:
            events = self._queue.get()
            remaining -= sum(1 for e in events if e.finish_reason)
            yield events


class _Row:
    """One choice being decoded: its slot's state besides the KV cache."""

    def __init__(self, handle: RequestHandle, index: int, engine: Engine):
        req = handle.request
        p = req.params
        self.handle, self.index = handle, index
        self.params = p
        self.generator = make_generator(
            None if p.seed is None else (p.seed + index) & SEED_MASK, engine.device)
        self.streamer = TextStreamer(engine.tokenizer)
        self.stop = StopText(req.stop)
        self.counts = (torch.zeros(engine.vocab_size, device=engine.device)
                       if p.presence_penalty or p.frequency_penalty else None)  # (V,)
        self.bias = engine._bias_vector(req.logit_bias)  # (V,) or None
        self.logits: torch.Tensor | None = None  # (1, V): what the next token samples from
        self.last = -1  # the token sampled last, fed at the next decode
        self.generated = 0


class Engine:
    """A model served with continuous batching by one background thread.

    ``max_batch``: rows decoded together (KV cache slots); ``max_queue``: requests allowed to
    wait while every slot is busy, beyond which ``submit`` raises ``QueueFull``.

    ``threads``: torch CPU threads for the engine's computations (default: torch's count
    when the engine is made). The engine's own thread applies it when it starts: torch's
    setting is per thread for MKL's matrix products, so a count set elsewhere would
    otherwise not reach them.
    """

    def __init__(self, model: GPT, tokenizer: Tokenizer, max_batch: int = 16,
                 max_queue: int = 64, threads: int | None = None):
        if not isinstance(max_batch, int) or max_batch < 1:
            raise MoorelmError(f"max batch must be an integer >= 1, got {max_batch}")
        if not isinstance(max_queue, int) or max_queue < 0:
            raise MoorelmError(f"max queue must be an integer >= 0, got {max_queue}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise MoorelmError(f"threads must be an integer >= 1, got {threads}")
        self.threads = threads or torch.get_num_threads()
        self.device = model.wte.weight.device
        self.seq_len = model.config.seq_len
        self.vocab_size = model.config.vocab_size
        # ids the model has but the tokenizer does not (vocab padding) are never sampled
        self.token_vocab = min(tokenizer.vocab_size, self.vocab_size)
        self._cond = threading.Condition()
        self._waiting: deque[RequestHandle] = deque()
        self._rows: list[_Row] = []  # row i lives in cache slot i
        self._cache = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._paused = False
        self._poke = False
        self.failure: str | None = None  # set if the loop itself died
        self.counters = {"requests": 0, "finished": 0, "cancelled": 0, "rejected": 0,
                         "tokens": 0, "steps": 0, "errors": 0}

    # -- lifecycle

    def start(self) -> Engine:
        """Start the decode thread (idempotent)."""
        with self._cond:
            if self._thread is not None:
                return self
            self._stopping = False
            self._cache = self.model.new_cache(self.max_batch)
            self._thread = threading.Thread(target=self._run, name="moorelm-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the decode thread; unfinished requests end with an error event."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self._thread = None

    def pause(self) -> None:
        """Admit no new requests (running ones go on); ``resume()`` undoes it."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> dict:
        with self._cond:
            waiting = len(self._waiting)
        return {"active": len(self._rows), "waiting": waiting, "max_batch": self.max_batch,
                "max_queue": self.max_queue, **self.counters}

    # -- requests

    def validate(self, request: Request) -> None:
        """MoorelmError unless the request fits the model (ids, context window, settings)."""
        if not request.prompts:
            raise MoorelmError("no prompt given; send at least one")
        if not isinstance(request.n, int) or request.n < 1:
            raise MoorelmError(f"n must be an integer >= 1, got {request.n}")
        max_new = request.params.max_new_tokens
        if max_new < 1:
            raise MoorelmError(f"max_tokens must be at least 1, got {max_new}")
        for prompt in request.prompts:
            if not prompt:
                raise MoorelmError("prompt is empty; send at least one token of text")
            if len(prompt) + max_new > self.seq_len:
                raise MoorelmError(
                    f"prompt ({len(prompt)} tokens) + max_tokens ({max_new}) = "
                    f"{len(prompt) + max_new} tokens exceeds this model's context window of "
                    f"{self.seq_len} tokens; shorten the prompt or lower max_tokens")
            bad = [t for t in prompt if not 0 <= t < self.token_vocab]
            if bad:
                raise MoorelmError(f"token id {bad[0]} is not in the vocabulary "
                                   f"(ids 0..{self.token_vocab - 1})")
        for tok, value in (request.logit_bias or {}).items():
            if not 0 <= tok < self.token_vocab:
                raise MoorelmError(f"logit_bias token id {tok} is not in the vocabulary "
                                   f"(ids 0..{self.token_vocab - 1})")
            if not -100 <= value <= 100:  # NaN fails too
                raise MoorelmError(f"logit_bias value {value} for token {tok} must be in "
                                   "[-100, 100]")
        if request.logprobs is not None and not 0 <= request.logprobs <= self.token_vocab:
            raise MoorelmError(f"logprobs must be in [0, {self.token_vocab}], got {request.logprobs}")

    def submit(self, request: Request,
               loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        """Queue a request; its events arrive through the returned handle.

        Raises MoorelmError for a request the model cannot serve, QueueFull when the queue is
        full, and MoorelmError when the engine is not running.
        """
        self.validate(request)
        handle = RequestHandle(request, self, loop)
        with self._cond:
            if self._thread is None or self._stopping or self.failure:
                raise MoorelmError("the engine is not running")
            # requests that free slots will take at the next step do not count as queued
            free = max(0, self.max_batch - len(self._rows))
            if len(self._waiting) - free >= self.max_queue:
                self.counters["rejected"] += 1
                raise QueueFull(f"every slot is busy and {self.max_queue} requests are "
                                "already waiting")
            self._waiting.append(handle)
            self.counters["requests"] += 1
            self._cond.notify_all()
        return handle

    def generate(self, request: Request) -> list[list[TokenEvent]]:
        """Submit and wait: each choice's events, in choice order (for scripts and tests)."""
        handle = self.submit(request)
        out: list[list[TokenEvent]] = [[] for _ in range(request.num_choices)]
        for events in handle:
            for e in events:
                out[e.index].append(e)
        return out

    # -- the loop

    def _wake(self) -> None:
        with self._cond:
            self._poke = True
            self._cond.notify_all()

    def _run(self) -> None:
        if self.device.type == "cpu":
            torch.set_num_threads(self.threads)
        try:
            with torch.no_grad():
                while True:
                    with self._cond:
                        while not (self._stopping or self._rows or self._poke
                                   or (self._waiting and not self._paused)):
                            self._cond.wait()
                        if self._stopping:
                            break
                        self._poke = False
                    self._step()
        except BaseException as e:  # the loop must never die silently
            log.exception("engine loop failed")
            self.failure = f"{type(e).__name__}: {e}"
        finally:
            self._fail_all(self.failure or "the server is shutting down")

    def _step(self) -> None:
        out: dict[RequestHandle, list[TokenEvent]] = {}
        self._drop_cancelled()
        try:
            self._admit(out)
            tokens = self._sample()
            leaving = [i for i, (row, tok) in enumerate(zip(self._rows, tokens))
                       if self._emit(row, tok, out)]
            self._leave(leaving)
            if self._rows:
                self._decode()
        except Exception as e:  # a failure of one step fails its rows, not the server
            log.exception("engine step failed")
            self.counters["errors"] += 1
            for row in self._rows:
                out.setdefault(row.handle, []).append(
                    TokenEvent(row.index, "", None, finish_reason="error", error=str(e)))
                row.handle._open -= 1
            self._rows = []
            self._cache.reset()
        self.counters["steps"] += 1
        self._deliver(out)

    def _drop_cancelled(self) -> None:
        gone = [i for i, row in enumerate(self._rows) if row.handle.cancelled]
        if gone:
            self.counters["cancelled"] += len({id(self._rows[i].handle) for i in gone})
            self._leave(gone)
        with self._cond:
            if any(h.cancelled for h in self._waiting):
                for h in [h for h in self._waiting if h.cancelled]:
                    if h._open == h.request.num_choices:  # never admitted: count it here
                        self.counters["cancelled"] += 1
                    self._waiting.remove(h)

    def _admit(self, out: dict[RequestHandle, list[TokenEvent]]) -> None:
        """Waiting sequences take the free slots; prompts of one length are prefilled together
        (one forward pass of (k, T)), each once however many choices (n) it has."""
        groups: list[tuple[RequestHandle, tuple[int, ...], list[int]]] = []
        with self._cond:
            free = self.max_batch - len(self._rows)
            while free > 0 and self._waiting and not self._paused:
                handle = self._waiting[0]
                take = [handle._pending.popleft() for _ in range(min(free, len(handle._pending)))]
                free -= len(take)
                if not handle._pending:
                    self._waiting.popleft()
                n = handle.request.n
                for c in take:
                    if groups and groups[-1][0] is handle and groups[-1][2][0] // n == c // n:
                        groups[-1][2].append(c)
                    else:
                        groups.append((handle, handle.request.prompts[c // n], [c]))
        by_length: dict[int, list] = {}
        for g in groups:
            by_length.setdefault(len(g[1]), []).append(g)
        for T, same in by_length.items():
            per_pass = max(1, PREFILL_TOKENS // T)
            for start in range(0, len(same), per_pass):
                chunk = same[start:start + per_pass]
                try:
                    self._prefill(chunk)
                except Exception as e:  # fail these requests only; the batch goes on
                    log.exception("prefill failed")
                    self.counters["errors"] += 1
                    for handle, _, choices in chunk:
                        out.setdefault(handle, []).extend(
                            TokenEvent(c, "", None, finish_reason="error", error=str(e))
                            for c in choices)

    def _prefill(self, groups: list[tuple[RequestHandle, tuple[int, ...], list[int]]]) -> None:
        """Prefill k prompts of equal length straight into the next k slots; further choices
        of a prompt get copies of its slot."""
        first, k = len(self._rows), len(groups)
        slots = self._cache.rows(first, first + k)
        slots.reset()
        idx = torch.tensor([p for _, p, _ in groups], dtype=torch.long, device=self.device)  # (k, T)
        logits, _ = self.model(idx, kv_cache=slots, last_only=True)  # (k, 1, V)
        logits = self._clean(logits[:, -1, :])  # (k, V)
        extra = []
        for j, (handle, _, choices) in enumerate(groups):
            row = _Row(handle, choices[0], self)
            row.logits = logits[j : j + 1]
            self._rows.append(row)
            extra += [(j, handle, c) for c in choices[1:]]
        for j, handle, c in extra:
            self._cache.insert(len(self._rows), self._cache, first + j)
            row = _Row(handle, c, self)
            row.logits = logits[j : j + 1]
            self._rows.append(row)

    def _decode(self) -> None:
        n = len(self._rows)
        idx = torch.tensor([[row.last] for row in self._rows], device=self.device)  # (B, 1)
        logits, _ = self.model(idx, kv_cache=self._cache.rows(0, n), last_only=True)
        logits = self._clean(logits[:, -1, :])  # (B, V)
        for i, row in enumerate(self._rows):
            row.logits = logits[i : i + 1]

    def _clean(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.token_vocab < logits.shape[-1]:
            logits[:, self.token_vocab:] = float("-inf")
        return logits

    def _bias_vector(self, bias: dict[int, float] | None) -> torch.Tensor | None:
        if not bias:
            return None
        vec = torch.zeros(self.vocab_size, device=self.device)  # (V,)
        for tok, value in bias.items():
            vec[int(tok)] = float(value)
        return vec

    def _sample(self) -> list[int | str]:
        """Every active row's next token: rows with the same temperature, top-k and top-p in
        one ``sample_next_token`` call, each drawing from its own generator. When that call
        fails, its rows are sampled one by one and only a row that fails alone gets an
        error message in place of its token."""
        if not self._rows:
            return []
        logits, groups = [], {}
        for i, row in enumerate(self._rows):
            p, lg = row.params, row.logits  # (1, V)
            if row.bias is not None:
                lg = lg + row.bias
            if row.counts is not None:
                lg = apply_penalties(lg, row.counts, p.presence_penalty, p.frequency_penalty)
            logits.append(lg)
            groups.setdefault((p.temperature, p.top_k, p.top_p), []).append(i)
        logits = torch.cat(logits)  # (B, V)
        tokens: list[int | str] = [0] * len(self._rows)
        for (temperature, top_k, top_p), rows in groups.items():
            part = logits if len(rows) == len(self._rows) else logits[rows]
            gens = [self._rows[i].generator for i in rows]
            try:
                drawn = sample_next_token(part, temperature, top_k, top_p, gens).tolist()
            except Exception:  # find the row(s) at fault; the others sample as they would
                drawn = [self._sample_one(logits[i : i + 1], self._rows[i]) for i in rows]
            for i, tok in zip(rows, drawn):
                tokens[i] = tok
        return tokens

    def _sample_one(self, logits: torch.Tensor, row: _Row) -> int | str:
        """One row's token, or the error message when sampling it fails. Its generator has
        not moved: every draw takes the uniform number after the settings are applied."""
        p = row.params
        try:
            return int(sample_next_token(logits, p.temperature, p.top_k, p.top_p,
                                         [row.generator])[0])
        except Exception as e:
            log.warning("sampling failed for one row: %s", e)
            self.counters["errors"] += 1
            return str(e)

    def _emit(self, row: _Row, tok: int | str, out: dict[RequestHandle, list[TokenEvent]]) -> bool:
        """Record row's sampled token and emit its text; True when the row has finished.
        A message instead of a token (its sampling failed) ends the row with an error."""
        if isinstance(tok, str):
            out.setdefault(row.handle, []).append(
                TokenEvent(row.index, "", None, finish_reason="error", error=tok))
            row.handle._open -= 1
            return True
        p = row.params
        row.last = tok
        row.generated += 1
        self.counters["tokens"] += 1
        if row.counts is not None:
            row.counts[tok] += 1
        event = TokenEvent(row.index, "", tok, step=self.counters["steps"])
        if row.handle.request.logprobs is not None:
            self._logprobs(event, row.logits, tok, row.handle.request.logprobs)

        eot = row.handle.request.stop_at_eot and tok == self.tokenizer.eot_id
        text = row.streamer.flush() if eot else row.streamer.push(tok)
        text, hit = row.stop.push(text)
        finish = None
        if hit or eot:
            finish = "stop"
        elif row.generated >= p.max_new_tokens:
            finish = "length"
        if finish:
            if not hit:
                tail, hit = row.stop.push(row.streamer.flush())
                text += tail if hit else tail + row.stop.flush()
                finish = "stop" if hit else finish
            event.finish_reason = finish
            row.handle._open -= 1
            if row.handle._open == 0:
                self.counters["finished"] += 1
        event.text = text
        out.setdefault(row.handle, []).append(event)
        return finish is not None

    @staticmethod
    def _logprobs(event: TokenEvent, logits: torch.Tensor, tok: int, top: int) -> None:
        """Log-probabilities under the model's own distribution (before temperature,
        penalties and bias), as OpenAI reports them."""
        lp = torch.log_softmax(logits[0], dim=-1)  # (V,)
        event.logprob = float(lp[tok])
        if top:
            values, ids = torch.topk(lp, top)
            event.top_logprobs = list(zip(ids.tolist(), values.tolist()))

    def _leave(self, indices: list[int]) -> None:
        """Remove rows; the last active row moves into each hole (descending order keeps the
        rows still to be removed out of the way)."""
        for i in sorted(indices, reverse=True):
            last = len(self._rows) - 1
            if i != last:
                self._cache.insert(i, self._cache, last)
                self._rows[i] = self._rows[last]
            self._rows.pop()
            self._cache.lengths[last] = 0

    def _deliver(self, out: dict[RequestHandle, list[TokenEvent]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for handle, events in out.items():
            if handle.cancelled:
                continue
            if handle._loop is None:
                handle._queue.put(events)
            else:
                by_loop.setdefault(handle._loop, []).append((handle._queue, events))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the loop closed (server shutting down)
                pass

    def _fail_all(self, message: str) -> None:
        out: dict[RequestHandle, list[TokenEvent]] = {}
        for row in self._rows:
            out.setdefault(row.handle, []).append(
                TokenEvent(row.index, "", None, finish_reason="error", error=message))
        self._rows = []
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        for handle in waiting:
            for c in handle._pending:
                out.setdefault(handle, []).append(
                    TokenEvent(c, "", None, finish_reason="error", error=message))
            handle._pending.clear()
        self._deliver(out)


def _put_all(items: list[tuple[asyncio.Queue, list[TokenEvent]]]) -> None:
    for q, events in items:
        q.put_nowait(events)
