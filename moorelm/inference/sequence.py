"""Per-request and per-sequence state.

``Request`` is what a client asks for, ``TokenEvent`` one piece of what it gets back, and
``RequestHandle`` the client's side of a request in flight (events as they come,
``cancel()``). ``Sequence`` is one choice being decoded: its slot's state besides the KV
cache (generator, penalty counts, bias, text output, last logits).
"""

from __future__ import annotations

import asyncio
import queue
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import torch

from moorelm.generate import BanList, SamplingParams, make_generator
from moorelm.grammar import Grammar
from moorelm.inference.output import ChoiceText


@dataclass(frozen=True)
class Request:
    """What to generate: ``n`` samples for each prompt (token ids), with one set of settings.

    ``logprobs``: how many most likely alternatives to report per token (0: only the chosen
    token's log-probability; None: none). ``logit_bias``: token id -> value in [-100, 100]
    added to its logit. ``bad_words``: phrases never produced (``generate.BanList``, at the
    text level, across token boundaries). ``grammar``: the output must be a JSON text of
    this grammar (``moorelm.grammar``, compiled by ``Engine.compile_grammar``); each choice
    then ends at a stop id once it is complete. Choice ``i * n + j`` is sample j of prompt i;
    with a seed, it samples with seed + i*n + j.
    """

    prompts: tuple[tuple[int, ...], ...]
    params: SamplingParams = field(default_factory=SamplingParams)
    n: int = 1
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    stop_at_eot: bool = True
    bad_words: tuple[str, ...] = ()
    grammar: Grammar | None = None

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.n

    def prompt_of(self, choice: int) -> tuple[int, ...]:
        return self.prompts[choice // self.n]

    def reserve_of(self, choice: int) -> int:
        """KV-cache positions a choice may hold: its prompt and every token it may add."""
        return len(self.prompt_of(choice)) + self.params.max_new_tokens


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
    at: float = field(default_factory=time.perf_counter)  # when (the server's latency metrics)


def error_event(index: int, message: str) -> TokenEvent:
    return TokenEvent(index, "", None, finish_reason="error", error=message)


class RequestHandle:
    """The consumer's side of a request: events as they come, and ``cancel()``.

    Events arrive in lists (everything one engine step produced for this request). Iterate
    with ``async for`` when created with an event loop, plain ``for`` otherwise. The engine
    side takes choices from ``pending`` as slots free up and counts finished ones with
    ``finish_one``.
    """

    def __init__(self, request: Request, on_cancel: Callable[[], None],
                 loop: asyncio.AbstractEventLoop | None = None):
        self.request = request
        self.prompt_tokens = sum(len(p) for p in request.prompts)
        self.created = time.time()
        self.cancelled = False
        self.loop = loop
        self.pending = deque(range(request.num_choices))  # choices not yet admitted
        self.open = request.num_choices  # choices not yet finished (engine side)
        self._on_cancel = on_cancel
        self._queue: asyncio.Queue | queue.Queue = asyncio.Queue() if loop else queue.Queue()

    def cancel(self) -> None:
        """Stop generating: the request's rows leave the batch at the engine's next step."""
        if not self.cancelled:
            self.cancelled = True
            self._on_cancel()

    @property
    def admitted(self) -> bool:
        """Whether any of its choices has taken a slot."""
        return len(self.pending) < self.request.num_choices

    def finish_one(self) -> bool:
        """One more choice has finished; True when it was the last."""
        self.open -= 1
        return self.open == 0

    def put(self, events: list[TokenEvent]) -> None:
        """Queue events for the consumer; on the handle's event loop when it has one (see
        ``deliver``, which calls this there)."""
        self._queue.put_nowait(events)

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


def deliver(out: dict[RequestHandle, list[TokenEvent]]) -> None:
    """Hand one step's events to their consumers: one wake-up per event loop, however
    many requests it serves."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for handle, events in out.items():
        if handle.cancelled:
            continue
        if handle.loop is None:
            handle.put(events)
        else:
            by_loop.setdefault(handle.loop, []).append((handle, events))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # the loop closed (server shutting down)
            pass


def _put_all(items: list[tuple[RequestHandle, list[TokenEvent]]]) -> None:
    for handle, events in items:
        handle.put(events)


class Sequence:
    """One choice being decoded: its slot's state besides the KV cache."""

    def __init__(self, handle: RequestHandle, index: int, text: ChoiceText,
                 vocab_size: int, device: torch.device, bans: BanList | None = None):
        req = handle.request
        p = req.params
        self.handle, self.index, self.params, self.text = handle, index, p, text
        self.generator = make_generator(
            None if p.seed is None else p.seed + index, device)  # modulo 2**64
        self.counts = (torch.zeros(vocab_size, device=device)
                       if p.presence_penalty or p.frequency_penalty else None)  # (V,)
        self.bias = _bias_vector(req.logit_bias, vocab_size, device)  # (V,) or None
        prompt = req.prompt_of(index)
        self.reserved = req.reserve_of(index)  # KV-cache positions held while active
        self.seen = None  # (1, V) bool: tokens of the prompt and output, for repetition_penalty
        if p.repetition_penalty != 1.0:
            self.seen = torch.zeros(1, vocab_size, dtype=torch.bool, device=device)
            self.seen[0, list(prompt)] = True
        self.ban = bans.state(prompt, device) if bans is not None else None
        # structured output: where the choice is in its JSON grammar (masked in the sampler)
        self.grammar = req.grammar.state() if req.grammar is not None else None
        # whether anything besides temperature/top-k/top-p shapes its logits (plain rows skip)
        self.controlled = bool(self.bias is not None or self.counts is not None
                               or self.seen is not None or self.ban is not None
                               or self.grammar is not None)
        self.logits: torch.Tensor | None = None  # (1, V): what the next token samples from
        self.last = -1  # the token sampled last, fed at the next decode


def _bias_vector(bias: dict[int, float] | None, vocab_size: int,
                 device: torch.device) -> torch.Tensor | None:
    if not bias:
        return None
    vec = torch.zeros(vocab_size, device=device)  # (V,)
    for tok, value in bias.items():
        vec[int(tok)] = float(value)
    return vec
