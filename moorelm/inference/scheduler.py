"""The waiting queue and the batch slots: who decodes this step.

Sequence i of ``active`` lives in KV cache slot i, and active sequences always fill the
front of the cache. Each step the scheduler

    drops   the sequences whose client cancelled, and cancelled requests still waiting
    admits  waiting requests' choices into the free slots, in arrival order, while their
            prompt + max tokens fit the KV cache's token budget, and plans
            their prefill: prompts of equal length together (at most ``PREFILL_TOKENS``
            tokens a pass), each prompt once however many choices (n) it has
    leaves  finished sequences: the last active sequence moves into each hole
            (compaction), and the caller moves its cache slot the same way

All state that other threads touch (the queue, pausing) is guarded by ``cond``, which the
engine's thread also waits on.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

from moorelm.inference.sequence import RequestHandle, Sequence

PREFILL_TOKENS = 8192  # at most this many prompt tokens in one prefill pass


class QueueFull(Exception):
    """The waiting queue is at its bound; the client should retry later (HTTP 429)."""


@dataclass
class Prefill:
    """One prompt to prefill, for the choices of its request that take slots now (the
    first choice's slot gets the prompt, the others copies of it)."""

    handle: RequestHandle
    prompt: tuple[int, ...]
    choices: list[int] = field(default_factory=list)


class Scheduler:
    """``max_batch`` slots and a queue of at most ``max_queue`` waiting requests (requests
    that free slots will take at the next step do not count as waiting). A choice holds
    ``Sequence.reserved`` positions of the KV cache (its prompt + max tokens) while it is
    active; all active ones together hold at most ``token_budget`` (None: no bound but the
    slots). A request waits, first in line, until what it needs is free."""

    def __init__(self, max_batch: int, max_queue: int, token_budget: int | None = None):
        self.max_batch, self.max_queue, self.token_budget = max_batch, max_queue, token_budget
        self.cond = threading.Condition()
        self.waiting: deque[RequestHandle] = deque()
        self.active: list[Sequence] = []  # active[i] lives in cache slot i
        self.paused = False
        self.poked = False  # something (a cancel) wants the loop to run a step

    # -- from any thread (hold no lock)

    def add(self, handle: RequestHandle) -> None:
        """Queue a request, or QueueFull."""
        with self.cond:
            free = max(0, self.max_batch - len(self.active))
            if len(self.waiting) - free >= self.max_queue:
                raise QueueFull(f"every slot is busy and {self.max_queue} requests are "
                                "already waiting")
            self.waiting.append(handle)
            self.cond.notify_all()

    def poke(self) -> None:
        with self.cond:
            self.poked = True
            self.cond.notify_all()

    def pause(self, paused: bool) -> None:
        with self.cond:
            self.paused = paused
            self.cond.notify_all()

    def waiting_count(self) -> int:
        with self.cond:
            return len(self.waiting)

    def has_work(self) -> bool:
        """Whether the loop has a step to run (call holding ``cond``)."""
        return bool(self.active or self.poked or (self.waiting and not self.paused))

    # -- from the engine's thread

    def cancelled(self) -> tuple[list[int], int]:
        """-> (slots of active sequences whose client cancelled, how many requests were
        cancelled); cancelled requests never admitted leave the queue here."""
        gone = [i for i, seq in enumerate(self.active) if seq.handle.cancelled]
        count = len({id(self.active[i].handle) for i in gone})
        with self.cond:
            if any(h.cancelled for h in self.waiting):
                for h in [h for h in self.waiting if h.cancelled]:
                    count += not h.admitted  # an admitted one was counted by its slots
                    self.waiting.remove(h)
        return gone, count

    def admit(self) -> list[list[Prefill]]:
        """Waiting choices take the free slots -> the prefill passes to run, in slot order."""
        prefills: list[Prefill] = []
        budget = self.token_budget
        held = self.reserved_tokens()
        with self.cond:
            free = self.max_batch - len(self.active)
            while free > 0 and self.waiting and not self.paused:
                handle = self.waiting[0]
                take = []
                while handle.pending and len(take) < free:
                    need = handle.request.reserve_of(handle.pending[0])
                    if budget is not None and held + need > budget:
                        break
                    take.append(handle.pending.popleft())
                    held += need
                free -= len(take)
                if not handle.pending:
                    self.waiting.popleft()
                if not take:
                    break  # first in line until the budget frees what it needs
                n = handle.request.n
                for c in take:
                    last = prefills[-1] if prefills else None
                    if last and last.handle is handle and last.choices[0] // n == c // n:
                        last.choices.append(c)
                    else:
                        prefills.append(Prefill(handle, handle.request.prompt_of(c), [c]))
        by_length: dict[int, list[Prefill]] = {}
        for p in prefills:
            by_length.setdefault(len(p.prompt), []).append(p)
        passes = []
        for T, same in by_length.items():
            per_pass = max(1, PREFILL_TOKENS // T)
            passes += [same[i : i + per_pass] for i in range(0, len(same), per_pass)]
        return passes

    def reserved_tokens(self) -> int:
        """KV-cache positions the active sequences hold (their prompts + max tokens)."""
        return sum(seq.reserved for seq in self.active)

    def join(self, seq: Sequence) -> int:
        """A sequence takes the next slot -> its slot."""
        self.active.append(seq)
        return len(self.active) - 1

    def leave(self, slots: list[int]) -> list[tuple[int, int]]:
        """Remove the sequences in ``slots`` -> the slot moves (dst, src) to mirror in the
        cache, in order: src moves into dst (nothing when equal), then src is free.
        Descending order keeps the sequences still to be removed out of the way."""
        moves = []
        for i in sorted(slots, reverse=True):
            last = len(self.active) - 1
            if i != last:
                self.active[i] = self.active[last]
            self.active.pop()
            moves.append((i, last))
        return moves

    def clear(self) -> list[Sequence]:
        """Every active sequence leaves at once (the cache is to be reset) -> them."""
        gone, self.active = self.active, []
        return gone

    def take_waiting(self) -> list[RequestHandle]:
        """Empty the queue -> the requests that were in it."""
        with self.cond:
            waiting, self.waiting = list(self.waiting), deque()
        return waiting
