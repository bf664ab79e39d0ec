"""``GET /metrics``: the server's counters in Prometheus' text format (``prometheus-client``).

Each app has its own registry (never the process-wide one), so several servers in one
process, as in the tests, keep separate counts. What is measured:

    moorelm_requests_total{route, status}        HTTP requests answered, by route and status
    moorelm_prompt_tokens_total                  prompt tokens taken in (tokens in)
    moorelm_generation_tokens_total              tokens generated (tokens out)
    moorelm_queue_depth                          requests waiting for a slot
    moorelm_active_slots, moorelm_slots          KV-cache slots decoding now, and in all
    moorelm_time_to_first_token_seconds          from a request reaching its route to its first token
    moorelm_inter_token_latency_seconds          between two tokens of one choice

Each token event carries the time the engine made it (``TokenEvent.at``), so the
histograms measure the engine (queueing, prefill, decode steps) even when the event loop
reads a few events at once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from moorelm.inference.engine import Engine
from moorelm.inference.sequence import RequestHandle, TokenEvent

# seconds; decode steps of small models on a CPU are milliseconds, first tokens can queue
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
ROUTES = ("/", "/health", "/metrics", "/tokenize", "/detokenize", "/tokenizer_info",
          "/openapi.json", "/v1/completions", "/v1/chat/completions", "/v1/inspect",
          "/v1/models")


def route_label(path: str) -> str:
    """The route a path belongs to, as a bounded label (unknown paths are "other")."""
    if path in ROUTES:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model_id}"
    return "other"


class ServerMetrics:
    """The counters of one app, over its ``engine``."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine: Engine):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("moorelm_requests", "HTTP requests answered, by route and "
                                "status code", ["route", "status"], registry=registry)
        self.prompt_tokens = Counter("moorelm_prompt_tokens", "Prompt tokens taken in",
                                     registry=registry)
        self.generation_tokens = Counter("moorelm_generation_tokens", "Tokens generated",
                                         registry=registry)
        Gauge("moorelm_queue_depth", "Requests waiting for a slot",
              registry=registry).set_function(engine.scheduler.waiting_count)
        Gauge("moorelm_active_slots", "KV-cache slots decoding now",
              registry=registry).set_function(lambda: len(engine.scheduler.active))
        Gauge("moorelm_slots", "KV-cache slots in all (--max-batch)",
              registry=registry).set(engine.max_batch)
        Gauge("moorelm_kv_tokens", "KV-cache positions the active requests hold (prompt + "
              "max tokens each)", registry=registry).set_function(engine.scheduler.reserved_tokens)
        Gauge("moorelm_kv_token_budget", "KV-cache positions all requests may hold together "
              "(--kv-memory)", registry=registry).set(engine.kv.token_budget)
        self.ttft = Histogram("moorelm_time_to_first_token_seconds", "From a request "
                              "reaching its route to its first token", buckets=TTFT_BUCKETS,
                              registry=registry)
        self.itl = Histogram("moorelm_inter_token_latency_seconds", "Between two tokens of "
                             "one choice", buckets=ITL_BUCKETS, registry=registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def events(self, handle: RequestHandle,
                     start: float) -> AsyncIterator[list[TokenEvent]]:
        """``handle``'s events, timed and counted on their way to the client (``start``:
        ``time.perf_counter()`` when the request reached its route)."""
        first = True
        last: dict[int, float] = {}  # choice -> when its last token came
        async for events in handle:
            tokens = 0
            for e in events:
                if e.token is None:
                    continue
                tokens += 1
                if first:
                    self.ttft.observe(max(0.0, e.at - start))
                    first = False
                if e.index in last:
                    self.itl.observe(max(0.0, e.at - last[e.index]))
                last[e.index] = e.at
            if tokens:
                self.generation_tokens.inc(tokens)
            yield events


class CountRequests:
    """ASGI middleware (outermost): counts every HTTP response by route and status, those
    the guard answers itself (401, 413, 421) and crashes (500) included."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status: list[int] = []

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            code = str(status[0]) if status else "500"
            self.metrics.requests.labels(route_label(scope["path"]), code).inc()
