"""Continuous batching: many requests decoded together, each joining and leaving at any step.

One background thread owns the model and repeats one step (``Engine._step``):

    schedule  cancelled sequences leave; waiting ones take free slots (``scheduler``)
    prefill   their prompts go straight into their slots of the KV cache (``runner``)
    sample    every active sequence samples its next token (``sampler``)
    emit      its text goes out through the request's handle; finished ones leave (``output``)
    decode    one forward pass of the active sequences' new tokens (B, 1) (``runner``)

Other work on the model (scoring prompts for the server's ``echo``) is handed to the same
thread with ``run_job`` and runs between two steps, so it never races decoding.

Because every sequence has its own generator and is sampled on its own, a seeded request
gives the same text whether it ran alone or in a full batch (up to the last bits of batched
matrix products, which the tests check do not change the text).

The engine knows token ids, not HTTP: ``moorelm.serve.api`` turns HTTP requests into
``Request`` objects and the events of a ``RequestHandle`` into OpenAI responses.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

import torch

from moorelm.config import check_threads
from moorelm.errors import MoorelmError
from moorelm.generate import BanList
from moorelm.grammar import Grammar, grammars_for
from moorelm.inference.limits import ModelLimits, kv_bytes_per_token, kv_dtype_of, plan_kv
from moorelm.inference.output import ChoiceText, token_logprobs
from moorelm.inference.runner import Runner
from moorelm.inference.sampler import sample_all
from moorelm.inference.scheduler import Prefill, Scheduler
from moorelm.inference.sequence import (
    Request,
    RequestHandle,
    Sequence,
    TokenEvent,
    deliver,
    error_event,
)
from moorelm.model import GPT
from moorelm.tokenizer import Tokenizer

log = logging.getLogger("moorelm.inference")

Outbox = dict[RequestHandle, list[TokenEvent]]  # one step's events, per request
SHUTTING_DOWN = "the server is shutting down"  # the error of requests still running at stop
BAN_CACHE = 32  # compiled banned-phrase lists kept


class Engine:
    """A model served with continuous batching by one background thread.

    ``max_batch``: sequences decoded together (KV cache slots; default from the budget,
    ``limits.plan_kv``); ``max_queue``: requests allowed to wait while every slot is busy,
    beyond which ``submit`` raises ``QueueFull``. ``kv_memory``: bytes for the whole KV cache
    (default ``limits.KV_MEMORY``). On a CPU the cache takes memory only for the positions
    held, every slot may use the model's whole window (or ``max_seq_len``), and a request
    waits until its prompt + max tokens fit what the budget has left; on a GPU the budget
    is reserved up front and divided among the slots. Longer requests than a slot holds
    get a RequestError naming the window.

    ``stop_ids``: the tokens that end a choice with finish reason "stop" besides end of text
    (an imported model's EOS / end-of-turn ids, ``LanguageModel.stop_ids``); never emitted.

    ``kv_dtype``: "fp32" or "bf16" keys and values in the KV cache (default "auto": the
    model's dtype). A bf16 cache under fp32 weights holds twice the positions in the same
    budget (keys and values rounded to bf16, attention still in the weights' dtype).

    ``threads``: torch CPU threads for the engine's computations (default: torch's count
    when the engine is made). The engine's own thread applies it when it starts: torch's
    setting is per thread for MKL's matrix products, so a count set elsewhere would
    otherwise not reach them.
    """

    def __init__(self, model: GPT, tokenizer: Tokenizer, max_batch: int | None = None,
                 max_queue: int = 64, threads: int | None = None,
                 max_seq_len: int | None = None, kv_memory: int | None = None,
                 stop_ids: frozenset[int] | None = None, kv_dtype: str | None = None):
        if not isinstance(max_queue, int) or max_queue < 0:
            raise MoorelmError(f"max queue must be an integer >= 0, got {max_queue}")
        check_threads(threads)
        self.tokenizer = tokenizer
        # tokens that end a choice with finish_reason "stop" (the model's EOS / end-of-turn ids)
        self.stop_ids = frozenset(stop_ids or ()) | {tokenizer.eot_id}
        self.threads = threads or torch.get_num_threads()
        self.device = model.wte.weight.device
        self.vocab_size = model.config.vocab_size
        # slots and each slot's context from the KV-cache budget (and --max-seq-len)
        self.kv_dtype = kv_dtype_of(kv_dtype) or model.wte.weight.dtype
        value_bytes = self.kv_dtype.itemsize
        self.kv = plan_kv(model.config, self.device.type, max_batch, kv_memory, max_seq_len,
                          value_bytes)
        self.max_batch, self.max_queue = self.kv.slots, max_queue
        self.kv_cache_bytes = self.kv.token_budget * kv_bytes_per_token(model.config, value_bytes)
        # ids the model has but the tokenizer does not (vocab padding) are never sampled
        self.limits = ModelLimits(self.kv.context, min(tokenizer.vocab_size, self.vocab_size))
        self.scheduler = Scheduler(self.max_batch, max_queue, self.kv.token_budget)
        self.runner = Runner(model, self.max_batch, self.limits.token_vocab,
                             max_len=self.kv.context, kv_dtype=self.kv_dtype)
        self._thread: threading.Thread | None = None
        self._bans: dict[tuple[str, ...], BanList] = {}
        self._ban_lock = threading.Lock()
        self._stopping = False
        self._jobs: deque[tuple[Callable[[], object], Future]] = deque()  # run_job's queue
        self.failure: str | None = None  # set if the loop itself died
        self.counters = {"requests": 0, "finished": 0, "cancelled": 0, "rejected": 0,
                         "tokens": 0, "steps": 0, "errors": 0}

    @property
    def seq_len(self) -> int:
        return self.limits.seq_len

    @property
    def token_vocab(self) -> int:
        return self.limits.token_vocab

    # -- lifecycle

    def start(self) -> Engine:
        """Start the decode thread (idempotent)."""
        with self.scheduler.cond:
            if self._thread is not None:
                return self
            self._stopping = False
            self.runner.start()
            self._thread = threading.Thread(target=self._run, name="moorelm-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the decode thread; unfinished requests end with an error event."""
        with self.scheduler.cond:
            self._stopping = True
            self.scheduler.cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self._thread = None

    def pause(self) -> None:
        """Admit no new requests (running ones go on); ``resume()`` undoes it."""
        self.scheduler.pause(True)

    def resume(self) -> None:
        self.scheduler.pause(False)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> dict:
        return {"active": len(self.scheduler.active), "waiting": self.scheduler.waiting_count(),
                "max_batch": self.max_batch, "max_queue": self.max_queue,
                "kv_tokens": self.scheduler.reserved_tokens(),
                "kv_token_budget": self.kv.token_budget,
                "kv_dtype": str(self.kv_dtype).removeprefix("torch."), **self.counters}

    # -- requests

    def validate(self, request: Request) -> None:
        """``limits.RequestError`` unless the model can serve the request."""
        self.limits.check(request)

    def submit(self, request: Request,
               loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        """Queue a request; its events arrive through the returned handle.

        Raises ``RequestError`` (a MoorelmError) for a request the model cannot serve,
        ``QueueFull`` when the queue is full, and MoorelmError when the engine is not running.
        """
        self.limits.check(request)
        if request.bad_words:
            self.ban_list(request.bad_words)  # compiled here, off the engine's thread
        handle = RequestHandle(request, self.scheduler.poke, loop)
        if self._thread is None or self._stopping or self.failure:
            raise MoorelmError("the engine is not running")
        try:
            self.scheduler.add(handle)
        except Exception:
            self.counters["rejected"] += 1
            raise
        self.counters["requests"] += 1
        return handle

    def run_job(self, fn: Callable[[], object]) -> Future:
        """Run ``fn()`` on the engine's thread between two steps (that thread owns the model,
        so work such as scoring a prompt never races decoding); its result, or the exception
        it raised, arrives through the returned future. MoorelmError when the engine is not
        running; jobs still queued when it stops fail with the stop's reason."""
        future: Future = Future()
        with self.scheduler.cond:
            if self._thread is None or self._stopping or self.failure:
                raise MoorelmError("the engine is not running")
            self._jobs.append((fn, future))
            self.scheduler.cond.notify_all()
        return future

    def ban_list(self, phrases: tuple[str, ...]) -> BanList:
        """``phrases`` compiled for this tokenizer, cached (the last ``BAN_CACHE`` lists)."""
        with self._ban_lock:
            bans = self._bans.pop(phrases, None)
        if bans is None:
            bans = BanList(self.tokenizer, phrases, self.vocab_size)
        with self._ban_lock:
            self._bans[phrases] = bans  # most recently used last
            while len(self._bans) > BAN_CACHE:
                self._bans.pop(next(iter(self._bans)))
        return bans

    def compile_grammar(self, schema: dict | bool | None = None,
                        what: str = "json schema") -> Grammar:
        """A JSON schema (None: any JSON object) compiled for ``Request.grammar`` over this
        model's vocabulary and stop ids (cached; ``grammar.GrammarError`` names a schema it
        cannot compile). Compile off the engine's thread: it can take milliseconds."""
        return grammars_for(self.tokenizer, self.vocab_size, self.stop_ids).compile(schema, what)

    def generate(self, request: Request) -> list[list[TokenEvent]]:
        """Submit and wait: each choice's events, in choice order (for scripts and tests)."""
        handle = self.submit(request)
        out: list[list[TokenEvent]] = [[] for _ in range(request.num_choices)]
        for events in handle:
            for e in events:
                out[e.index].append(e)
        return out

    # -- the loop

    def _run(self) -> None:
        if self.device.type == "cpu":
            torch.set_num_threads(self.threads)
        sched = self.scheduler
        try:
            with torch.no_grad():
                while True:
                    with sched.cond:
                        while not (self._stopping or sched.has_work() or self._jobs):
                            sched.cond.wait()
                        if self._stopping:
                            break
                        work = sched.has_work()
                        sched.poked = False
                        job = self._jobs.popleft() if self._jobs else None
                    if job is not None:  # one job per step, so decoding goes on between them
                        _run_one(*job)
                    if work:
                        self._step()
        except BaseException as e:  # the loop must never die silently
            log.exception("engine loop failed")
            self.failure = f"{type(e).__name__}: {e}"
        finally:
            self._fail_all(self.failure or SHUTTING_DOWN)

    def _step(self) -> None:
        out: Outbox = {}
        active = self.scheduler.active
        try:
            self._drop_cancelled()
            for chunk in self.scheduler.admit():
                self._prefill(chunk, out)
            tokens = sample_all(active)
            self._leave([i for i, (seq, tok) in enumerate(zip(active, tokens))
                         if self._emit(seq, tok, out)])
            if active:
                logits = self.runner.decode([seq.last for seq in active])  # (B, V)
                for i, seq in enumerate(active):
                    seq.logits = logits[i : i + 1]
        except Exception as e:  # a failure of one step fails its sequences, not the server
            log.exception("engine step failed")
            self.counters["errors"] += 1
            for seq in self.scheduler.clear():
                out.setdefault(seq.handle, []).append(error_event(seq.index, str(e)))
                seq.handle.finish_one()
            self.runner.reset()
        self.counters["steps"] += 1
        deliver(out)

    def _drop_cancelled(self) -> None:
        gone, count = self.scheduler.cancelled()
        self.counters["cancelled"] += count
        if gone:
            self._leave(gone)

    def _leave(self, slots: list[int]) -> None:
        for dst, src in self.scheduler.leave(slots):
            if dst != src:
                self.runner.copy(dst, src)
            self.runner.free(src)

    def _prefill(self, chunk: list[Prefill], out: Outbox) -> None:
        """Prefill a pass of equal-length prompts into the next slots; further choices of a
        prompt get copies of its slot. A failure fails these requests only."""
        first = len(self.scheduler.active)
        try:
            logits = self.runner.prefill(first, [p.prompt for p in chunk])  # (k, V)
        except Exception as e:
            log.exception("prefill failed")
            self.counters["errors"] += 1
            for p in chunk:
                out.setdefault(p.handle, []).extend(error_event(c, str(e)) for c in p.choices)
                for _ in p.choices:
                    p.handle.finish_one()
            return
        for j, p in enumerate(chunk):
            self._join(p.handle, p.choices[0], logits[j : j + 1])
        for j, p in enumerate(chunk):
            for c in p.choices[1:]:
                self.runner.copy(len(self.scheduler.active), first + j)
                self._join(p.handle, c, logits[j : j + 1])

    def _join(self, handle: RequestHandle, choice: int, logits: torch.Tensor) -> None:
        req = handle.request
        # a grammar ends its output at a stop id, which must then end the choice
        text = ChoiceText(self.tokenizer, req.stop, req.stop_at_eot or req.grammar is not None,
                          req.params.max_new_tokens, self.stop_ids)
        bans = self.ban_list(req.bad_words) if req.bad_words else None
        seq = Sequence(handle, choice, text, self.vocab_size, self.device, bans)
        seq.logits = logits
        self.scheduler.join(seq)

    def _emit(self, seq: Sequence, tok: int | str, out: Outbox) -> bool:
        """Record a sequence's sampled token and emit its text; True when it has finished.
        A message in place of a token (its sampling failed) ends it with an error."""
        if isinstance(tok, str):
            self.counters["errors"] += 1
            out.setdefault(seq.handle, []).append(error_event(seq.index, tok))
            seq.handle.finish_one()
            return True
        if seq.grammar is not None and not seq.grammar.push(tok):
            tok = "the JSON grammar allows no token here (a banned phrase may rule out " \
                "every token it allows)"
            return self._emit(seq, tok, out)
        seq.last = tok
        self.counters["tokens"] += 1
        if seq.controlled:
            if seq.counts is not None:
                seq.counts[tok] += 1
            if seq.seen is not None:
                seq.seen[0, tok] = True
            if seq.ban is not None:
                seq.ban.push(tok)
        event = TokenEvent(seq.index, "", tok, step=self.counters["steps"])
        top = seq.handle.request.logprobs
        if top is not None:
            event.logprob, event.top_logprobs = token_logprobs(seq.logits, tok, top)
        event.text, event.finish_reason = seq.text.push(tok)
        if event.finish_reason and seq.handle.finish_one():
            self.counters["finished"] += 1
        out.setdefault(seq.handle, []).append(event)
        return event.finish_reason is not None

    def _fail_all(self, message: str) -> None:
        with self.scheduler.cond:
            jobs, self._jobs = list(self._jobs), deque()
        for _, future in jobs:
            if future.set_running_or_notify_cancel():
                future.set_exception(MoorelmError(message))
        out: Outbox = {}
        for seq in self.scheduler.clear():
            out.setdefault(seq.handle, []).append(error_event(seq.index, message))
        for handle in self.scheduler.take_waiting():
            out.setdefault(handle, []).extend(error_event(c, message) for c in handle.pending)
            handle.pending.clear()
        deliver(out)


def _run_one(fn: Callable[[], object], future: Future) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(fn())
    except Exception as e:  # the job's failure is its caller's, not the loop's
        future.set_exception(e)
