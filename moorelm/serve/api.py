"""An OpenAI-compatible HTTP API over the engine (FastAPI on uvicorn), and the playground.

Routes:

    POST /v1/completions        text completion; "stream": true for server-sent events
    POST /v1/chat/completions   chat, through the chat template below
    GET  /v1/models             the one model served (also /v1/models/{id})
    POST /v1/inspect            per-token probabilities and attention of a text (moorelm's)
    POST /tokenize              text or chat messages -> token ids (vLLM's shape)
    POST /detokenize            token ids -> text (vLLM's shape)
    GET  /tokenizer_info        the tokenizer's special tokens and chat template (vLLM's)
    GET  /metrics               counters and latency histograms, Prometheus' text format
    GET  /health                liveness and load (no API key needed)
    GET  /                      the web playground (static HTML, no build step)

Completions take ``echo``: the prompt comes back before the completion, with each prompt
token's log-probability (``moorelm.scoring.score_sequences``, run on the engine's thread
between decode steps) when ``logprobs`` is set, and ``max_tokens: 0`` asks for the prompt
alone, which is how lm-evaluation-harness scores likelihoods through an API.

Safe by default: ``serve`` binds 127.0.0.1; with an API key every route but the playground
and /health needs ``Authorization: Bearer KEY`` (401 otherwise); a request field the server
does not implement is a 400 naming it; bodies over ``max_body_bytes`` get 413; a full
queue gets 429 with Retry-After; prompt + max_tokens beyond the context window gets 400; a
client that goes away mid-request frees its batch rows at the engine's next step. Every error
is OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, without a traceback.

Chat: the messages are rendered by ``moorelm.chat.ChatTemplate``: an imported model's own template
(e.g. SmolLM2's ChatML), its reply ending at the model's end-of-turn / EOS ids; for a run trained
here the documented default, where each message becomes a speech, ``ROLE:\\n{content}\\n\\n``
(the message's ``name``, upper-cased, replaces the role when given), then ``ASSISTANT:\\n``
asks for the reply, which ends at the first blank line or end of text. A fine-tuned run with a
prompt template (``config.json`` ``prompt_template``) instead wraps each user message in its
template and ends the reply at end of text.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from importlib import resources

import anyio
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from moorelm.chat import ChatTemplate
from moorelm.errors import MoorelmError
from moorelm.generate import SamplingParams, apply_template
from moorelm.grammar import Grammar, GrammarError
from moorelm.inference.engine import SHUTTING_DOWN, Engine
from moorelm.inference.limits import RequestError
from moorelm.inference.scheduler import QueueFull
from moorelm.inference.sequence import Request, RequestHandle, TokenEvent
from moorelm.scoring import Scored, score_sequences
from moorelm.serve.inspection import inspection
from moorelm.serve.metrics import CountRequests, ServerMetrics
from moorelm.serve.policy import ServePolicy
from moorelm.serve.schema import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    InspectRequest,
    Message,
    SamplingBody,
    TokenizeRequest,
    checked_text,
    error_body,
    error_response,
    validation_error_response,
)

log = logging.getLogger("moorelm.serve")

MAX_BODY_BYTES = 1 << 20
BODY_TIMEOUT_S = 30.0  # to receive a whole request body
RETRY_AFTER_S = 1


# ----------------------------------------------------------------------------- turning requests into engine requests


def render_chat(messages: list[Message], template: str | None,
                chat: ChatTemplate | None = None, add_generation_prompt: bool = True) -> str:
    """The conversation as model input (see the module docstring): through the fine-tuned
    run's prompt ``template`` when it has one, else the chat template ``chat`` (the default
    one when None; ``add_generation_prompt`` False leaves out what asks for the reply). A
    template that cannot render the conversation is a 400."""
    if template is None:
        plain = []
        for i, m in enumerate(messages):
            content = "".join(p.text for p in m.content) if isinstance(m.content, list) \
                else (m.content or "")
            plain.append({"role": m.role, "content": checked_text(content, f"messages.{i}.content"),
                          "name": checked_text(m.name.strip(), f"messages.{i}.name") if m.name and m.name.strip()
                          else None})
        try:
            return (chat or ChatTemplate.default()).render(plain, add_generation_prompt)
        except MoorelmError as e:
            raise ApiError(400, str(e), "messages") from None
    parts = []
    for i, m in enumerate(messages):
        if isinstance(m.content, list):
            content = "".join(p.text for p in m.content)
        else:
            content = m.content or ""
        content = checked_text(content, f"messages.{i}.content")
        if template is None:
            speaker = (m.name or m.role).strip().upper() or m.role.upper()
            parts.append(f"{checked_text(speaker, f'messages.{i}.name')}:\n{content}\n\n")
        elif m.role == "user":
            parts.append(apply_template(template, content))
        else:
            parts.append(content + "\n")
    if template is None:
        parts.append("ASSISTANT:\n")
    return "".join(parts)


class Service:
    """What the routes share: the engine, the model's name, its prompt template, the
    deployment's policy (``serve.policy``)."""

    def __init__(self, engine: Engine, model_name: str, prompt_template: str | None = None,
                 policy: ServePolicy | None = None, chat: ChatTemplate | None = None):
        self.engine = engine
        self.policy = policy or ServePolicy()
        self.inspect_lock = threading.Lock()  # one inspection at a time
        self.tokenizer = engine.tokenizer
        self.model_name = model_name
        self.prompt_template = prompt_template
        self.chat = chat or ChatTemplate.default()
        self.created = int(time.time())
        self._token_text: dict[int, str] = {}
        self.metrics = ServerMetrics(engine)

    def token_text(self, tok: int) -> str:
        """A token as text; one that is only part of a character reads ``bytes:\\xNN``."""
        text = self._token_text.get(tok)
        if text is None:
            text = self.tokenizer.decode([tok])
            if "\ufffd" in text:
                raw = self.tokenizer.piece_bytes(tok)
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError:
                    text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            self._token_text[tok] = text
        return text

    def tokenizer_info(self) -> dict:
        """``GET /tokenizer_info``: what vLLM's route reports and lm-evaluation-harness'
        remote tokenizer reads (its special tokens, its chat template), and the window."""
        special = self.chat.special
        eos = special.get("eos_token") or self.tokenizer.decode([self.tokenizer.eot_id])
        return {"tokenizer_class": f"moorelm-{self.tokenizer.kind}", "eos_token": eos,
                "bos_token": special.get("bos_token"), "pad_token": special.get("pad_token"),
                "unk_token": special.get("unk_token"), "add_bos_token": False,
                "add_eos_token": False, "model_max_length": self.engine.seq_len,
                "vocab_size": self.engine.token_vocab,
                "chat_template": self.chat.source if self.prompt_template is None else None}

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise ApiError(404, f"model {name!r} does not exist; this server serves "
                           f"{self.model_name!r} (see GET /v1/models)", "model",
                           "model_not_found")

    async def encode(self, text: str) -> tuple[int, ...]:
        if len(text) < 4096:
            return tuple(self.tokenizer.encode(text))
        return tuple(await asyncio.to_thread(self.tokenizer.encode, text))

    def bad_words(self, body: SamplingBody) -> tuple[str, ...]:
        """The phrases a request may not produce: the deployment's, then the client's."""
        bans = [body.bad_words] if isinstance(body.bad_words, str) else list(body.bad_words or [])
        return tuple(dict.fromkeys((*self.policy.bad_words, *bans)))

    async def warm_bans(self, body: SamplingBody) -> None:
        """Compile the request's banned phrases off the event loop (a vocabulary scan); the
        engine's cache then has them when the request is submitted."""
        words = self.bad_words(body)
        if words and all(isinstance(w, str) and w.strip() for w in words):
            await asyncio.to_thread(self.engine.ban_list, words)

    async def grammar(self, body: SamplingBody) -> Grammar | None:
        """The grammar ``response_format`` asks for (None: free text), compiled off the event
        loop; a schema that is missing, malformed or cannot be compiled is a 400."""
        fmt = body.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            try:
                return await asyncio.to_thread(self.engine.compile_grammar, None)
            except MoorelmError as e:
                raise ApiError(400, str(e), "response_format") from None
        param = "response_format.json_schema"
        if fmt.json_schema is None:
            raise ApiError(400, f"{param} is required when response_format.type is "
                           "'json_schema'; send {\"name\": ..., \"schema\": {...}}", param)
        if fmt.json_schema.schema_ is None:
            raise ApiError(400, f"{param}.schema is required: the JSON schema the output "
                           "must fit", param + ".schema")
        try:
            return await asyncio.to_thread(self.engine.compile_grammar,
                                           fmt.json_schema.schema_, param + ".schema")
        except GrammarError as e:
            raise ApiError(400, str(e), param + ".schema", "invalid_json_schema") from None
        except MoorelmError as e:  # e.g. the grammar library is not installed here
            raise ApiError(400, str(e), "response_format") from None

    def check_prompts(self, prompts: list[tuple[int, ...]], param: str = "prompt") -> None:
        """400 unless there are at most as many prompts as the engine takes choices and each
        is non-empty, in the vocabulary and within the context window (for prompts that
        generate nothing; the engine checks the others)."""
        vocab, window = self.engine.token_vocab, self.engine.seq_len
        bound = self.engine.limits.max_choices
        if len(prompts) > bound:
            raise ApiError(400, f"{len(prompts)} prompts is more than {bound} in one request; "
                           "split it", param)
        for ids in prompts:
            if not ids:
                raise ApiError(400, f"{param} is empty; send at least one token of text", param)
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise ApiError(400, f"token id {bad} in the {param} is not in the vocabulary "
                               f"(ids 0..{vocab - 1})", param)
            if len(ids) > window:
                raise ApiError(400, f"the {param} is {len(ids)} tokens, more than the context "
                               f"window of {window} tokens served here; shorten it", param,
                               "context_length_exceeded")

    async def score(self, prompts: list[tuple[int, ...]], top: int) -> list[Scored]:
        """Each prompt's per-token log-probs and ``top`` alternatives
        (``scoring.score_sequences``), computed on the engine's thread between two decode
        steps: the event loop goes on, and the model is never used by two threads at once.
        Ids the tokenizer lacks (vocabulary padding) are never offered as alternatives."""
        model = self.engine.runner.model
        padding = model.config.vocab_size - self.engine.token_vocab
        k = min(model.config.vocab_size, top + padding) if top else 0
        try:
            scored = await self.on_engine(lambda: score_sequences(model, prompts, top_k=k))
        except MoorelmError as e:
            raise ApiError(400, str(e), "prompt") from None
        if padding and top:
            vocab = self.engine.token_vocab
            for s in scored:
                for alts in s.top or []:
                    alts[:] = [(t, lp) for t, lp in alts if t < vocab][:top]
        return scored

    async def on_engine(self, fn: Callable[[], object]):
        """``fn()`` run on the engine's thread between two decode steps (``Engine.run_job``),
        awaited without blocking the event loop; 503 when the engine is not running."""
        try:
            future: Future = self.engine.run_job(fn)
        except MoorelmError as e:
            raise ApiError(503, f"the model is not available ({e})", None, "engine_down",
                           "server_error") from None
        return await asyncio.wrap_future(future)

    async def inspect(self, body: InspectRequest) -> dict:
        """``POST /v1/inspect``'s answer (``serve.inspection``, on the engine's thread)."""
        return await self.on_engine(lambda: inspection(body, self.engine, self.model_name,
                                                       self.token_text, self.inspect_lock))

    def submit(self, body: SamplingBody, prompts: list[tuple[int, ...]], max_tokens: int | None,
               max_param: str, prompt_param: str, logprobs: int | None,
               extra_stop: tuple[str, ...] = (),
               grammar: Grammar | None = None) -> tuple[Request, RequestHandle]:
        """The engine request for an HTTP body, submitted. The engine checks it against the
        model (``inference.limits``); what it refuses is a 400 naming this route's field."""
        policy = self.policy
        if max_tokens is None:  # as much as the context window (and the policy) leaves
            max_tokens = max(1, self.engine.seq_len - max((len(p) for p in prompts), default=0))
            if policy.max_tokens is not None:
                max_tokens = min(max_tokens, policy.max_tokens)
        elif policy.max_tokens is not None and max_tokens > policy.max_tokens:
            if policy.over_max_tokens == "reject":
                raise ApiError(400, f"{max_param} {max_tokens} is more than this deployment "
                               f"allows ({policy.max_tokens}); ask for fewer", max_param)
            max_tokens = policy.max_tokens
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        for s in stops:
            checked_text(s, "stop")
        for s in self.bad_words(body):
            checked_text(s, "bad_words")
        bias: dict[int, float] = {}
        for key, value in (body.logit_bias or {}).items():
            try:
                bias[int(key)] = value
            except ValueError:
                raise ApiError(400, f"logit_bias key {key!r} is not a token id", "logit_bias") from None
        try:
            params = SamplingParams(
                temperature=1.0 if body.temperature is None else body.temperature,
                top_k=body.top_k, top_p=body.top_p, max_new_tokens=max_tokens,
                presence_penalty=body.presence_penalty or 0.0,
                frequency_penalty=body.frequency_penalty or 0.0, seed=body.seed,
                min_p=body.min_p or 0.0,
                repetition_penalty=1.0 if body.repetition_penalty is None
                else body.repetition_penalty)
        except MoorelmError as e:
            raise ApiError(400, str(e)) from None
        request = Request(tuple(prompts), params, body.n,
                          tuple(dict.fromkeys((*stops, *extra_stop, *policy.stop))), logprobs,
                          bias or None, bad_words=self.bad_words(body), grammar=grammar)
        try:
            handle = self.engine.submit(request, asyncio.get_running_loop())
            self.metrics.prompt_tokens.inc(handle.prompt_tokens)
            return request, handle
        except RequestError as e:
            param = {"prompt": prompt_param, "max_tokens": max_param}.get(e.param, e.param)
            raise ApiError(400, str(e), param, e.code) from None
        except QueueFull as e:
            raise ApiError(429, f"the server is busy ({e}); retry shortly", None,
                           "queue_full", "server_overloaded",
                           {"Retry-After": str(RETRY_AFTER_S)}) from None
        except MoorelmError as e:
            if not self.engine.alive:
                raise ApiError(503, f"the model is not available ({e})", None,
                               "engine_down", "server_error") from None
            raise ApiError(400, str(e)) from None


# ----------------------------------------------------------------------------- responses


class EventStream(StreamingResponse):
    """Server-sent events that notice a client going away at once, even between tokens,
    and then run ``on_close`` (which frees the request's batch rows)."""

    def __init__(self, content: AsyncIterator[bytes], on_close):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as tg:
                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client closed the connection while we wrote
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            self.on_close()


def sse(obj: dict | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"),
                                                       ensure_ascii=False)
    return f"data: {data}\n\n".encode()


def usage(handle: RequestHandle, completion_tokens: int) -> dict:
    return {"prompt_tokens": handle.prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": handle.prompt_tokens + completion_tokens}


def _generation_error(event: TokenEvent) -> ApiError:
    """The error a choice that ended with an error is answered with: 503 when the server
    was stopping (the drain ran out), 500 otherwise."""
    if event.error == SHUTTING_DOWN:
        return ApiError(503, "the server is shutting down and this request did not finish "
                        "in time; retry it", None, "shutting_down", "server_error")
    return ApiError(500, f"generation failed: {event.error}", None, "generation_failed",
                    "server_error")


def _raise_if_error(event: TokenEvent) -> None:
    if event.finish_reason == "error":
        raise _generation_error(event)


async def collect(handle: RequestHandle, receive,
                  stream: AsyncIterator[list[TokenEvent]] | None = None
                  ) -> list[list[TokenEvent]] | None:
    """All of a request's events per choice (read from ``stream``, default the handle);
    None when the client went away first."""
    out: list[list[TokenEvent]] = [[] for _ in range(handle.request.num_choices)]
    stream = handle if stream is None else stream

    async def consume() -> None:
        async for events in stream:
            for e in events:
                out[e.index].append(e)

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    work, watch = asyncio.ensure_future(consume()), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            handle.cancel()
    if not work.done() or work.cancelled():
        return None
    work.result()
    return out


def _completion_logprobs(service: Service, events: list[TokenEvent], offset: int) -> dict:
    tokens, lps, tops, offsets = [], [], [], []
    for e in events:
        if e.token is None:
            continue
        text = service.token_text(e.token)
        tokens.append(text)
        lps.append(e.logprob)
        tops.append(None if e.top_logprobs is None else
                    {service.token_text(t): lp for t, lp in e.top_logprobs})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops,
            "text_offset": offsets}


@dataclass(frozen=True)
class Echo:
    """A prompt as ``echo`` returns it: its text, its tokens' log-probs in the legacy shape
    (None unless logprobs was asked for) and the text offset where the completion begins."""

    text: str
    logprobs: dict | None
    end: int


def _prompt_logprobs(service: Service, scored: Scored) -> tuple[dict, int]:
    """A scored prompt in OpenAI's legacy shape (the first token has no log-prob and no
    alternatives) -> (that, the offset after its last token)."""
    tokens, offsets, tops, offset = [], [], [], 0
    for i, tok in enumerate(scored.ids):
        text = service.token_text(tok)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        alts = scored.top[i] if scored.top is not None and i > 0 else None
        tops.append(None if alts is None else {service.token_text(t): lp for t, lp in alts})
    return {"tokens": tokens, "token_logprobs": list(scored.logprobs), "top_logprobs": tops,
            "text_offset": offsets}, offset


async def _echoes(service: Service, prompts: list[tuple[int, ...]], texts: list[str | None],
                  logprobs: int | None) -> list[Echo]:
    """What ``echo`` returns of each prompt, scored when ``logprobs`` is set."""
    scored = await service.score(prompts, logprobs) if logprobs is not None else None
    out = []
    for i, ids in enumerate(prompts):
        text = texts[i] if texts[i] is not None else service.tokenizer.decode(ids)
        if scored is None:
            out.append(Echo(text, None, len(text)))
        else:
            lp, end = _prompt_logprobs(service, scored[i])
            out.append(Echo(text, lp, end))
    return out


def _echo_only(head: dict, body: CompletionRequest, echoes: list[Echo], prompt_tokens: int):
    """The answer to ``echo`` with ``max_tokens: 0``: each prompt back, finished ("length",
    as vLLM says), streamed or not."""
    choices = [{"index": i, "text": e.text, "logprobs": e.logprobs, "finish_reason": "length"}
               for i, e in enumerate(echoes)]
    counts = {"prompt_tokens": prompt_tokens, "completion_tokens": 0,
              "total_tokens": prompt_tokens}
    if not body.stream:
        return {**head, "choices": choices, "usage": counts}

    async def chunks() -> AsyncIterator[bytes]:
        for choice in choices:
            yield sse({**head, "choices": [choice]})
        if body.stream_options and body.stream_options.include_usage:
            yield sse({**head, "choices": [], "usage": counts})
        yield sse("[DONE]")

    return EventStream(chunks(), lambda: None)


def _chat_logprobs(service: Service, events: list[TokenEvent]) -> dict:
    def entry(tok: int, lp: float) -> dict:
        text = service.token_text(tok)
        return {"token": text, "logprob": lp, "bytes": list(service.tokenizer.piece_bytes(tok))}

    content = []
    for e in events:
        if e.token is None:
            continue
        item = entry(e.token, e.logprob)
        item["top_logprobs"] = [entry(t, lp) for t, lp in e.top_logprobs or []]
        content.append(item)
    return {"content": content, "refusal": None}


# ----------------------------------------------------------------------------- the app


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
OPEN_PATHS = ("/", "/health")  # the only routes answered without the API key


def host_name(value: str) -> str:
    """The host name of a Host header value, without its port: ``[::1]:80`` -> ``::1``."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def check_api_key(api_key: str | None) -> None:
    """A key must be printable ASCII without spaces: clients send it in an HTTP header,
    where any other key could never be presented."""
    if api_key is not None and not (api_key.isascii() and api_key.isprintable()
                                    and " " not in api_key and api_key):
        raise MoorelmError("the API key must be printable ASCII without spaces (clients send "
                           "it in an HTTP header); choose another")


def playground_headers(page: str) -> dict[str, str]:
    """Headers for the playground page: no framing by other sites, and a content security
    policy that lets only its own inline script and style run (by hash) and only this
    server be fetched."""
    def hashes(tag: str) -> str:
        bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.S)
        return " ".join("'sha256-" + base64.b64encode(hashlib.sha256(b.encode()).digest())
                        .decode() + "'" for b in bodies)

    csp = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
           "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
           "frame-ancestors 'none'")
    return {"X-Frame-Options": "DENY", "Content-Security-Policy": csp,
            "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


class Guard:
    """ASGI middleware: the Host check, the API key on every route but ``OPEN_PATHS``, then the
    body size limit and deadline (the body is read here, up to the limit, and replayed to
    the app).

    ``hosts``: when given, only requests whose Host header names one of them are served
    (421 otherwise): a keyless server on loopback answers no web page that reached it by
    DNS rebinding. ``body_timeout``: seconds to receive the whole body (408 after).
    """

    def __init__(self, app, api_key: str | None, max_body_bytes: int,
                 hosts: tuple[str, ...] | None = None, body_timeout: float | None = None):
        self.app, self.api_key, self.max_body = app, api_key, max_body_bytes
        self.hosts, self.body_timeout = hosts, body_timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.hosts is not None:
            host = host_name(headers.get(b"host", b"").decode("latin-1"))
            if host not in self.hosts:
                return await error_response(
                    421, f"host {host!r} is not served here; this server answers requests "
                    f"for {', '.join(self.hosts)} only (start it with --api-key to serve "
                    "others)", None, "host_not_allowed")(scope, receive, send)
        path = scope["path"]
        if self.api_key and path not in OPEN_PATHS:
            auth = headers.get(b"authorization", b"").decode("latin-1")
            given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(given.encode("latin-1"), self.api_key.encode()):
                what = "an invalid API key" if given else "no API key"
                return await error_response(
                    401, f"the request has {what}; send the header 'Authorization: Bearer "
                    "KEY' with the server's key", None, "invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        too_big = error_response(413, f"the request body is larger than {self.max_body} "
                                 "bytes; send a smaller one", None, "body_too_large")
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            declared = 0
        if declared > self.max_body:
            return await too_big(scope, receive, send)
        body, more = b"", True
        with anyio.move_on_after(self.body_timeout) as deadline:
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client went away before sending its body
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > self.max_body:
                    return await too_big(scope, receive, send)
        if deadline.cancelled_caught:
            return await error_response(
                408, f"the request body did not arrive within {self.body_timeout:g} s; "
                "send it at once", None, "body_timeout",
                headers={"Connection": "close"})(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def create_app(engine: Engine, model_name: str, api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES,
               prompt_template: str | None = None, hosts: tuple[str, ...] | None = None,
               body_timeout: float | None = BODY_TIMEOUT_S,
               policy: ServePolicy | None = None,
               chat_template: ChatTemplate | None = None) -> FastAPI:
    """The FastAPI app serving ``engine`` (started here if it is not running yet).

    ``hosts``: the only Host names answered (None: any; ``serve`` passes LOOPBACK_HOSTS for
    a keyless server on loopback). ``body_timeout``: seconds a client has to send its body.
    ``policy``: the deployment's stop strings, banned phrases and length bound.
    ``chat_template``: how /v1/chat/completions renders messages (the model's own, from
    ``LanguageModel.template()``; None: the documented default).
    """
    check_api_key(api_key)
    service = Service(engine, model_name, prompt_template, policy, chat_template)
    engine.start()
    app = FastAPI(title="moorelm", version="1", summary="OpenAI-compatible API of one moorelm model",
                  docs_url=None, redoc_url=None)
    app.state.service = service
    _add_error_handlers(app)
    _add_info_routes(app, service)
    _add_completion_route(app, service)
    _add_chat_route(app, service)
    _add_token_routes(app, service)

    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes, hosts=hosts,
                       body_timeout=body_timeout)
    app.add_middleware(CountRequests, metrics=service.metrics)  # outermost: counts all
    return app




def _add_error_handlers(app: FastAPI) -> None:
    """Every error leaves as OpenAI's JSON error body, with a line saying what to change."""
    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        return validation_error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}; see GET /v1/models"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        elif exc.status_code == 400:
            message = ("the request body could not be read; send UTF-8 encoded JSON with "
                       "Content-Type: application/json")
        else:
            message = str(exc.detail)
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, "internal server error; the server logged the details",
                              None, "internal_error", "server_error")


def _add_info_routes(app: FastAPI, service: Service) -> None:
    """The playground page, /health, /v1/models, /metrics and /v1/inspect."""
    engine, model_name = service.engine, service.model_name
    page = resources.files("moorelm.serve").joinpath("static/index.html").read_text("utf-8")
    page_headers = playground_headers(page)

    @app.get("/", include_in_schema=False)
    async def playground() -> HTMLResponse:
        return HTMLResponse(page, headers=page_headers)

    @app.get("/health")
    async def health():
        stats = engine.stats()
        if not engine.alive:
            return error_response(503, f"the engine is down ({engine.failure or 'stopped'})",
                                  None, "engine_down", "server_error")
        return {"status": "ok", "model": model_name, "context_window": engine.seq_len, **stats}

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": service.created,
                "owned_by": "moorelm", "context_window": engine.seq_len}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str):
        service.check_model(model_id)
        return model_card()

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    @app.post("/v1/inspect")
    async def inspect_route(body: InspectRequest):
        service.check_model(body.model)
        return await service.inspect(body)


async def _completion_prompts(service: Service, body: CompletionRequest
                             ) -> tuple[list[str | None], list[tuple[int, ...]]]:
    """Check what /v1/completions does not support, then the prompts as token ids, each with
    its text when the client sent text (a string, strings, token ids or lists of them)."""
    if body.suffix:
        raise ApiError(400, "suffix is not supported; leave it null", "suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise ApiError(400, "best_of other than n is not supported", "best_of")
    if body.echo and body.n > 1:
        raise ApiError(400, "echo with n > 1 is not supported; send n = 1 (the prompt "
                       "and its log-probs are the same for every sample)", "n")
    if body.max_tokens == 0 and not body.echo:
        raise ApiError(400, "max_tokens 0 asks for nothing without echo; send max_tokens "
                       ">= 1, or echo: true to get the prompt (and its log-probs) back",
                       "max_tokens")
    raw = body.prompt
    texts: list[str | None]  # each prompt as the client sent it, when it sent text
    if isinstance(raw, str):
        texts = [checked_text(raw, "prompt")]
        prompts = [await service.encode(raw)]
    elif raw and all(isinstance(x, int) for x in raw):
        texts, prompts = [None], [tuple(raw)]
    elif raw and all(isinstance(x, str) for x in raw):
        texts = [checked_text(x, "prompt") for x in raw]
        prompts = [await service.encode(x) for x in raw]
    else:
        prompts = [tuple(x) for x in raw]
        texts = [None] * len(prompts)
    if not prompts:
        raise ApiError(400, "prompt is an empty list; send some text", "prompt")
    return texts, prompts


def _add_completion_route(app: FastAPI, service: Service) -> None:
    """POST /v1/completions: text completion, streamed or whole, with echo and log-probs."""
    model_name = service.model_name
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: HTTPRequest):
        start = time.perf_counter()
        service.check_model(body.model)
        texts, prompts = await _completion_prompts(service, body)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                "created": int(time.time()), "model": model_name}
        want_logprobs = body.logprobs is not None
        if body.max_tokens == 0:  # echo alone: the prompt and its scores, no generation
            service.check_prompts(prompts)
            echoes = await _echoes(service, prompts, texts, body.logprobs)
            service.metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
            return _echo_only(head, body, echoes, sum(len(p) for p in prompts))
        await service.warm_bans(body)
        grammar = await service.grammar(body)
        req, handle = service.submit(body, prompts, body.max_tokens, "max_tokens", "prompt",
                                     body.logprobs, grammar=grammar)
        echoes: list[Echo] = []
        if body.echo:
            try:
                echoes = await _echoes(service, prompts, texts, body.logprobs)
            except BaseException:
                handle.cancel()
                raise
        offsets = [e.end for e in echoes] or [0] * req.num_choices

        def whole(i: int, events: list[TokenEvent]) -> dict:
            text = "".join(e.text for e in events)
            lp = _completion_logprobs(service, events, offsets[i]) if want_logprobs else None
            if echoes:
                text = echoes[i].text + text
                if lp is not None:
                    lp = {k: echoes[i].logprobs[k] + lp[k] for k in lp}
            return {"index": i, "text": text, "logprobs": lp,
                    "finish_reason": events[-1].finish_reason}

        def piece(e: TokenEvent) -> list[dict]:
            if not (e.text or e.finish_reason or want_logprobs):
                return []
            lp = None
            if want_logprobs:
                lp = _completion_logprobs(service, [e], offsets[e.index])
                offsets[e.index] += len(e.text)
            return [{"index": e.index, "text": e.text, "logprobs": lp,
                     "finish_reason": e.finish_reason}]

        opening = [{"index": i, "text": e.text, "logprobs": e.logprobs, "finish_reason": None}
                   for i, e in enumerate(echoes)]
        return await respond(handle, request, head, body, whole, piece, opening,
                             service.metrics.events(handle, start))


def _add_chat_route(app: FastAPI, service: Service) -> None:
    """POST /v1/chat/completions: the model's chat template, then generation as completions."""
    model_name = service.model_name
    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: HTTPRequest):
        start = time.perf_counter()
        service.check_model(body.model)
        if body.max_tokens is not None and body.max_completion_tokens is not None \
                and body.max_tokens != body.max_completion_tokens:
            raise ApiError(400, "max_tokens and max_completion_tokens differ; send one",
                           "max_completion_tokens")
        text = render_chat(body.messages, service.prompt_template, service.chat)
        prompt = await service.encode(text)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        extra = service.chat.stop if service.prompt_template is None else ()
        max_tokens = body.max_completion_tokens or body.max_tokens
        max_param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        await service.warm_bans(body)
        grammar = await service.grammar(body)
        req, handle = service.submit(body, [prompt], max_tokens, max_param, "messages",
                                     logprobs, extra, grammar)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                "created": int(time.time()), "model": model_name}

        def whole(i: int, events: list[TokenEvent]) -> dict:
            return {"index": i, "message": {"role": "assistant",
                                            "content": "".join(e.text for e in events)},
                    "logprobs": _chat_logprobs(service, events) if body.logprobs else None,
                    "finish_reason": events[-1].finish_reason}

        def piece(e: TokenEvent) -> list[dict]:
            out = []
            if e.text or (body.logprobs and e.token is not None):
                out.append({"index": e.index, "delta": {"content": e.text}, "finish_reason": None,
                            "logprobs": _chat_logprobs(service, [e]) if body.logprobs else None})
            if e.finish_reason:
                out.append({"index": e.index, "delta": {}, "logprobs": None,
                            "finish_reason": e.finish_reason})
            return out

        opening = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None} for i in range(req.num_choices)]
        if body.stream:
            head["object"] = "chat.completion.chunk"
        return await respond(handle, request, head, body, whole, piece, opening,
                             service.metrics.events(handle, start))


def _add_token_routes(app: FastAPI, service: Service) -> None:
    """/tokenize, /detokenize and /tokenizer_info."""
    engine = service.engine
    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        if body.model is not None:
            service.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "send a prompt or messages (one of them)", "prompt")
        if body.prompt is not None:
            ids = await service.encode(checked_text(body.prompt, "prompt"))
        else:
            if not body.add_generation_prompt and service.prompt_template is not None:
                raise ApiError(400, "this model's prompt template always asks for a reply; "
                               "leave add_generation_prompt true", "add_generation_prompt")
            text = render_chat(body.messages, service.prompt_template, service.chat,
                               body.add_generation_prompt)
            ids = await service.encode(text)
        # a text longer than the context window is tokenized too, as vLLM does: clients
        # (lm-eval's rolling windows, truncation on the left) cut it themselves, comparing
        # count with max_model_len; the body limit bounds its size
        strs = None
        if body.return_token_strs:
            strs = [service.tokenizer.hf.id_to_token(t) or "" for t in ids]
        return {"count": len(ids), "max_model_len": engine.seq_len, "tokens": list(ids),
                "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        if body.model is not None:
            service.check_model(body.model)
        vocab = engine.token_vocab
        bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(400, f"token id {bad} is not in the vocabulary (ids 0..{vocab - 1})",
                           "tokens")
        if len(body.tokens) < 4096:
            return {"prompt": service.tokenizer.decode(body.tokens)}
        return {"prompt": await asyncio.to_thread(service.tokenizer.decode, body.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return service.tokenizer_info()


async def respond(handle: RequestHandle, request: HTTPRequest, head: dict, body: SamplingBody,
                  whole: Callable[[int, list[TokenEvent]], dict],
                  piece: Callable[[TokenEvent], list[dict]], opening: list[dict] = (),
                  events: AsyncIterator[list[TokenEvent]] | None = None):
    """The response to a submitted request: events as server-sent chunks (``piece`` spells
    the choices of one event; ``opening`` chunks go first) or, once every choice has
    finished, one body (``whole`` spells one choice from all its events). ``events``: the
    handle's events as read (``ServerMetrics.events`` times them); default the handle."""
    events = handle if events is None else events
    if body.stream:
        want_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventStream(_chunks(handle, head, want_usage, piece, opening, events),
                           handle.cancel)
    per_choice = await collect(handle, request.receive, events)
    if per_choice is None:  # the client went away; nobody reads this
        return JSONResponse({}, status_code=499)
    for events in per_choice:
        _raise_if_error(events[-1])
    total = sum(e.token is not None for events in per_choice for e in events)
    return {**head, "choices": [whole(i, events) for i, events in enumerate(per_choice)],
            "usage": usage(handle, total)}


async def _chunks(handle: RequestHandle, head: dict, want_usage: bool,
                  piece: Callable[[TokenEvent], list[dict]], opening: list[dict],
                  stream: AsyncIterator[list[TokenEvent]]) -> AsyncIterator[bytes]:
    total = 0
    for choice in opening:
        yield sse({**head, "choices": [choice]})
    async for events in stream:
        for e in events:
            if e.finish_reason == "error":  # the stream ends here, as every stream does
                err = _generation_error(e)
                yield sse(error_body(err.message, err.param, err.code, err.type))
                yield sse("[DONE]")
                return
            total += e.token is not None
            for choice in piece(e):
                yield sse({**head, "choices": [choice]})
    if want_usage:
        yield sse({**head, "choices": [], "usage": usage(handle, total)})
    yield sse("[DONE]")
