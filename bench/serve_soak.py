"""Soak test of `moorelm serve`: many streaming clients, some broken or hostile, for minutes.

Starts `moorelm serve RUN` on 127.0.0.1 (any free port) in its own process and sends it, from
--clients concurrent clients for --minutes, a seeded mix of

    healthy     seeded streaming (and some non-streaming) completions and chats, whose text
                must equal what the same request got when sent alone before the soak
    disconnect  clients that hang up mid-stream, right after sending, or while a
                non-streaming request is still running
    slow        healthy streaming requests read a few hundred bytes at a time through a
                small receive buffer (their text is checked too)
    invalid     bad JSON, invalid UTF-8, wrong types and out-of-range, huge or NaN values,
                oversize bodies (declared and chunked), wrong content types, unknown routes
                and methods, each of which must get its own 4xx
    stalled     sockets that stay silent, send half their headers, or drip their body,
                which the server must close (or answer 408) by itself

while a monitor polls /health. Afterwards it checks: no 5xx anywhere; the server's active
and waiting counts (GET /health) return to 0 (no leaked slots or queue places); every
healthy request's text unchanged, and again when each is re-sent alone after the soak;
every invalid request answered as expected; the server still running. It prints requests by
kind and outcome and exits 1 when a check fails. Every loop is bounded: the clients stop
at the deadline (or after --max-requests each), each request has a timeout.

    python bench/serve_soak.py /tmp/soak-tiny --init tiny              # 64 clients, 3 min
    python bench/serve_soak.py runs/demo --minutes 10 --clients 128 --json soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from moorelm.atomic import atomic_write_json

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import make_random_run, server_cpu_seconds  # noqa: E402

KINDS = ("healthy", "disconnect", "slow", "invalid", "stalled")
WEIGHTS = (50, 15, 10, 20, 5)
PROMPTS = ("ROMEO:\n", "JULIET:\nO", "It is the", "Deny thy", "KING:\nWhat", "O")
SETTINGS = (dict(temperature=0.0), dict(temperature=0.8), dict(temperature=1.0, top_k=8),
            dict(temperature=1.1, top_p=0.9), dict(temperature=0.7, frequency_penalty=1.0,
                                                   presence_penalty=0.5),
            dict(temperature=1.0, logit_bias={"0": -100}), dict(temperature=0.9, stop=["\n\n"]))
TIMEOUT = httpx.Timeout(120.0, connect=30.0)


@dataclass
class Settings:
    """How the soak runs: ``duration_s`` or ``max_requests`` per client, whichever ends
    first; the server's ``header_timeout_s`` / ``body_timeout_s`` bound the stalled clients."""

    clients: int = 64
    duration_s: float = 180.0
    max_requests: int = 1_000_000
    seed: int = 0
    header_timeout_s: float = 2.0
    body_timeout_s: float = 3.0
    max_body: int = 1 << 20
    specs: int = 24
    weights: tuple[int, ...] = WEIGHTS  # of KINDS


@dataclass
class Report:
    outcomes: Counter = field(default_factory=Counter)  # (kind, outcome) -> count
    health: Counter = field(default_factory=Counter)  # /health status during the soak
    five_xx: int = 0
    unexpected: list[str] = field(default_factory=list)
    leaked: dict = field(default_factory=dict)
    healthy_checked: int = 0
    mismatches: int = 0
    after_checked: int = 0
    after_mismatches: int = 0
    engine: dict = field(default_factory=dict)
    wall_s: float = 0.0
    server_alive: bool = True
    server_cores: float | None = None  # the server's CPU use during the soak, in cores

    def kinds(self) -> Counter:
        total: Counter = Counter()
        for (kind, _), n in self.outcomes.items():
            total[kind] += n
        return total

    def failures(self) -> list[str]:
        bad = []
        if self.five_xx:
            bad.append(f"{self.five_xx} responses were 5xx")
        if self.leaked.get("active", 1) or self.leaked.get("waiting", 1):
            bad.append(f"leaked after the soak: {self.leaked}")
        if self.mismatches or self.after_mismatches:
            bad.append(f"healthy outputs changed: {self.mismatches} in the soak, "
                       f"{self.after_mismatches} re-sent alone after it")
        if not self.healthy_checked:
            bad.append("no healthy request completed")
        if self.unexpected:
            bad.append(f"{len(self.unexpected)} unexpected outcomes, e.g. {self.unexpected[:3]}")
        if not self.server_alive:
            bad.append("the server process died")
        return bad

    def to_dict(self) -> dict:
        return {"wall_s": round(self.wall_s, 1), "requests": sum(self.outcomes.values()),
                "by_kind": dict(self.kinds()),
                "outcomes": {f"{k}/{o}": n for (k, o), n in sorted(self.outcomes.items())},
                "health_polls": dict(self.health), "five_xx": self.five_xx,
                "leaked": self.leaked, "healthy_checked": self.healthy_checked,
                "mismatches": self.mismatches, "after_checked": self.after_checked,
                "after_mismatches": self.after_mismatches, "unexpected": self.unexpected[:20],
                "engine": self.engine, "server_cores": self.server_cores,
                "failures": self.failures()}


# -- the healthy requests and their texts alone


def make_specs(model: str, context: int, count: int) -> list[dict]:
    """``count`` seeded requests (route, body) that fit a ``context``-token window."""
    specs = []
    max_tokens = max(4, min(24, context - 16))
    for i in range(count):
        body = {"model": model, "max_tokens": max_tokens - i % 3, "seed": 1000 + i,
                **SETTINGS[i % len(SETTINGS)]}
        body["stream"] = i % 4 != 3
        if body["stream"] and i % 2 == 0:
            body["stream_options"] = {"include_usage": True}
        if context >= 64 and i % 5 == 4:
            route = "/v1/chat/completions"
            body["messages"] = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
            body["max_tokens"] = min(body["max_tokens"], 12)
        else:
            route = "/v1/completions"
            body["prompt"] = PROMPTS[i % len(PROMPTS)]
        specs.append({"route": route, "body": body})
    return specs


def sse_text(lines, chat: bool) -> tuple[str, str | None]:
    """The text of a streamed response's data lines, and what was wrong with it (None)."""
    text, done = [], False
    for line in lines:
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            done = True
            continue
        chunk = json.loads(line[6:])
        if "error" in chunk:
            return "".join(text), f"stream error {chunk['error'].get('code')}"
        for choice in chunk.get("choices") or []:
            piece = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
            text.append(piece or "")
    return "".join(text), None if done else "stream without [DONE]"


def whole_text(obj: dict, chat: bool) -> str:
    choice = obj["choices"][0]
    return choice["message"]["content"] if chat else choice["text"]


async def healthy_request(client: httpx.AsyncClient, spec: dict) -> tuple[int, str, str | None]:
    """Send a spec; (status, text, problem or None)."""
    chat = spec["route"].endswith("chat/completions")
    if not spec["body"]["stream"]:
        r = await client.post(spec["route"], json=spec["body"])
        if r.status_code != 200:
            return r.status_code, "", None
        return 200, whole_text(r.json(), chat), None
    async with client.stream("POST", spec["route"], json=spec["body"]) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, "", None
        lines = [line async for line in r.aiter_lines()]
    text, problem = sse_text(lines, chat)
    return 200, text, problem


async def references(client: httpx.AsyncClient, specs: list[dict]) -> list[str]:
    """Each spec's text sent alone (one after another on an idle server)."""
    out = []
    for spec in specs:
        status, text, problem = await healthy_request(client, spec)
        if status != 200 or problem:
            raise SystemExit(f"a healthy request failed alone: {status} {problem} {spec}")
        out.append(text)
    return out


# -- raw sockets (slow readers, stalled clients, hang-ups right after sending)


async def raw_connect(host: str, port: int, rcvbuf: int | None = None):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, port))
    return await asyncio.open_connection(sock=sock, limit=1 << 16)


def http_request(method: str, path: str, port: int, body: bytes = b"",
                 content_type: str = "application/json", extra: str = "") -> bytes:
    head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n{extra}\r\n")
    return head.encode("latin-1") + body


def parse_response(raw: bytes) -> tuple[int, bytes]:
    """Status and (de-chunked) body of one HTTP/1.1 response read to EOF."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    if "transfer-encoding: chunked" not in head.decode("latin-1").lower():
        return status, rest
    body = bytearray()
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        body += rest[:size]
        rest = rest[size + 2:]
    return status, bytes(body)


async def slow_request(host: str, port: int, spec: dict, rng: random.Random
                       ) -> tuple[int, str, str | None]:
    """A streaming spec read ``step`` bytes at a time with pauses, through a small buffer."""
    body = dict(spec["body"], stream=True)
    reader, writer = await raw_connect(host, port, rcvbuf=2048)
    try:
        writer.write(http_request("POST", spec["route"], port, json.dumps(body).encode()))
        await writer.drain()
        raw, step, pause = bytearray(), rng.choice((64, 256, 512)), rng.uniform(0.02, 0.1)
        while len(raw) < 4 << 20:
            piece = await asyncio.wait_for(reader.read(step), 120)
            if not piece:
                break
            raw += piece
            await asyncio.sleep(pause)
    finally:
        writer.close()
    status, content = parse_response(bytes(raw))
    if status != 200:
        return status, "", None
    lines = content.decode("utf-8").splitlines()
    text, problem = sse_text(lines, spec["route"].endswith("chat/completions"))
    return status, text, problem


async def stalled(host: str, port: int, rng: random.Random, settings: Settings) -> str:
    """A client that never finishes its request; the server must end it."""
    how = rng.choice(("silent", "half-headers", "drip-body"))
    reader, writer = await raw_connect(host, port)
    wait = 30 + settings.header_timeout_s + settings.body_timeout_s
    try:
        if how == "half-headers":
            writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode())
        elif how == "drip-body":
            writer.write(http_request("POST", "/v1/completions", port, b"x" * 64)[:-60])
        await writer.drain()

        async def drip() -> None:
            for _ in range(int(wait)):
                await asyncio.sleep(1)
                writer.write(b" ")

        dripping = asyncio.ensure_future(drip()) if how == "drip-body" else None
        try:
            raw = await asyncio.wait_for(reader.read(1 << 16), wait)
        except asyncio.TimeoutError:
            return f"{how}: left open"
        except ConnectionError:
            return f"{how}: closed"
        finally:
            if dripping:
                dripping.cancel()
        if not raw:
            return f"{how}: closed"
        return f"{how}: {raw.split(b' ', 2)[1].decode()}"
    finally:
        writer.close()


# -- invalid requests


def invalid_cases(model: str, context: int, max_body: int) -> list[tuple]:
    """(name, method, path, content, content type, expected statuses)."""
    ok = {"model": model, "prompt": "It", "max_tokens": 2}
    js = "application/json"
    deep = min(50_000, max_body // 4)

    def j(obj) -> bytes:
        return json.dumps(obj, allow_nan=True).encode()

    async def chunked_oversize():  # no Content-Length: the server counts as it reads
        yield b'{"prompt": "'
        for _ in range(max_body // 32768 + 2):
            yield b"a" * 32768
        yield b'"}'

    return [
        ("bad json", "POST", "/v1/completions", b'{"model": ', js, {400}),
        ("invalid utf-8", "POST", "/v1/completions", b'{"prompt": "\xff\xfe"}', js, {400}),
        ("not an object", "POST", "/v1/completions", b"[1, 2, 3]", js, {400}),
        ("deep nesting", "POST", "/v1/completions", b"[" * deep + b"]" * deep, js, {400}),
        ("text/plain", "POST", "/v1/completions", j(ok), "text/plain", {400}),
        ("form", "POST", "/v1/completions", b"model=x&prompt=y",
         "application/x-www-form-urlencoded", {400}),
        ("no content type", "POST", "/v1/completions", j(ok), "", {400}),
        ("wrong type", "POST", "/v1/completions", j({**ok, "max_tokens": "many"}), js, {400}),
        ("negative", "POST", "/v1/completions", j({**ok, "max_tokens": -1}), js, {400}),
        ("NaN temperature", "POST", "/v1/completions", j({**ok, "temperature": math.nan}), js,
         {400}),
        ("inf top_p", "POST", "/v1/completions", j({**ok, "top_p": math.inf}), js, {400}),
        ("huge max_tokens", "POST", "/v1/completions", j({**ok, "max_tokens": 10**30}), js,
         {400}),
        ("huge temperature", "POST", "/v1/completions", j({**ok, "temperature": 1e308}), js,
         {400}),
        ("huge logit_bias", "POST", "/v1/completions",
         b'{"model": "%s", "prompt": "It", "logit_bias": {"0": 1.8e308}}' % model.encode(), js,
         {400}),
        ("huge seed", "POST", "/v1/completions", j({**ok, "seed": 2**70}), js, {400}),
        ("unknown token id", "POST", "/v1/completions", j({**ok, "prompt": [10**12]}), js, {400}),
        ("n too large", "POST", "/v1/completions", j({**ok, "n": 100}), js, {400}),
        ("17 stops", "POST", "/v1/completions", j({**ok, "stop": list("abcdefghijklmnopq")}), js,
         {400}),
        ("empty prompt", "POST", "/v1/completions", j({**ok, "prompt": ""}), js, {400}),
        ("past the context", "POST", "/v1/completions",
         j({**ok, "prompt": "a " * context, "max_tokens": context}), js, {400}),
        ("unknown model", "POST", "/v1/completions", j({**ok, "model": "nope"}), js, {404}),
        ("bad role", "POST", "/v1/chat/completions",
         j({"model": model, "messages": [{"role": "wizard", "content": "x"}]}), js, {400}),
        ("no messages", "POST", "/v1/chat/completions", j({"model": model, "messages": []}), js,
         {400}),
        ("oversize", "POST", "/v1/completions", b'{"prompt": "' + b"a" * max_body + b'"}', js,
         {413}),
        ("oversize chunked", "POST", "/v1/completions", chunked_oversize, js, {413}),
        ("unknown route", "GET", "/v1/nothing", b"", js, {404}),
        ("unknown post", "POST", "/v1/engines/x/completions", j(ok), js, {404}),
        ("wrong method", "GET", "/v1/completions", b"", js, {405}),
        ("dot-dot", "GET", "/../../etc/passwd", b"", js, {404}),
        # odd but valid: these must be served
        ("tiny temperature", "POST", "/v1/completions",
         j({**ok, "temperature": 1e-300, "seed": 3}), js, {200}),
        ("tiny top_p", "POST", "/v1/completions", j({**ok, "top_p": 1e-300, "seed": 4}), js,
         {200}),
        ("bias at the bounds", "POST", "/v1/completions",
         j({**ok, "logit_bias": {"1": 100, "2": -100}, "seed": 5}), js, {200}),
    ]


async def invalid_request(client: httpx.AsyncClient, case: tuple) -> tuple[str, bool]:
    """Send one case: (outcome, as expected)."""
    name, method, path, content, ctype, expected = case
    headers = {"Content-Type": ctype} if ctype else {"Content-Type": ""}
    body = content() if callable(content) else (content or None)
    try:
        r = await client.request(method, path, content=body, headers=headers)
    except httpx.TransportError as e:
        # a server may close instead of reading the rest of an oversize upload
        return f"{name}: closed ({type(e).__name__})", 413 in expected
    return f"{name}: {r.status_code}", r.status_code in expected


# -- the soak


async def soak(url: str, model: str, settings: Settings, report: Report) -> None:
    host, port = re.match(r"http://([^:/]+):(\d+)", url).groups()
    port = int(port)
    # idle pooled connections are dropped before the server's keep-alive (5 s) would close
    # them, so a request never races the server's close
    limits = httpx.Limits(max_connections=settings.clients + 8,
                          max_keepalive_connections=settings.clients + 8, keepalive_expiry=2.0)
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT, limits=limits) as client:
        health = (await client.get("/health")).json()
        context = health["context_window"]
        specs = make_specs(model, context, settings.specs)
        wanted = await references(client, specs)
        cases = invalid_cases(model, context, settings.max_body)
        deadline = time.monotonic() + settings.duration_s
        done = asyncio.Event()

        def record(kind: str, outcome: str, status: int | None = None, fine: bool = True) -> None:
            report.outcomes[(kind, outcome)] += 1
            if status is not None and status >= 500:
                report.five_xx += 1
            if not fine:
                report.unexpected.append(f"{kind} {outcome}")

        def check(kind: str, i: int, status: int, text: str, problem: str | None) -> None:
            if status == 429:
                record(kind, "429 queue full")
            elif status != 200 or problem:
                record(kind, f"{status} {problem or ''}".strip(), status, fine=False)
            elif text != wanted[i]:
                report.mismatches += 1
                record(kind, "text changed", fine=False)
            else:
                report.healthy_checked += 1
                record(kind, "ok, text unchanged")

        async def disconnect(rng: random.Random) -> None:
            spec = dict(specs[rng.randrange(len(specs))])
            longest = spec["body"]["max_tokens"] if "messages" in spec["body"] else context - 16
            body = dict(spec["body"], max_tokens=max(4, longest), seed=rng.randrange(1 << 30))
            body.pop("stop", None)
            how = rng.choice(("mid-stream", "after sending", "non-streaming"))
            if how == "mid-stream":
                body["stream"] = True
                async with client.stream("POST", spec["route"], json=body) as r:
                    if r.status_code != 200:
                        await r.aread()
                        return record("disconnect", f"{how}: {r.status_code}", r.status_code,
                                      r.status_code == 429)
                    lines = 0
                    stop_after = rng.randrange(0, 6)
                    async for line in r.aiter_lines():
                        lines += line.startswith("data: ")
                        if lines > stop_after:
                            break
                record("disconnect", f"{how}: hung up")
            elif how == "after sending":
                reader, writer = await raw_connect(host, port)
                body["stream"] = rng.random() < 0.5
                writer.write(http_request("POST", spec["route"], port, json.dumps(body).encode()))
                await writer.drain()
                writer.close()
                record("disconnect", f"{how}: hung up")
            else:
                body["stream"] = False
                try:
                    r = await asyncio.wait_for(client.post(spec["route"], json=body),
                                               rng.uniform(0.0, 0.3))
                except asyncio.TimeoutError:
                    return record("disconnect", f"{how}: hung up")
                record("disconnect", f"{how}: finished first {r.status_code}", r.status_code,
                       r.status_code in (200, 429))

        async def one(kind: str, rng: random.Random) -> None:
            if kind == "healthy":
                i = rng.randrange(len(specs))
                check(kind, i, *await healthy_request(client, specs[i]))
            elif kind == "slow":
                i = rng.randrange(len(specs))
                check(kind, i, *await slow_request(host, port, specs[i], rng))
            elif kind == "disconnect":
                await disconnect(rng)
            elif kind == "invalid":
                outcome, fine = await invalid_request(client, cases[rng.randrange(len(cases))])
                status = int(outcome.rsplit(" ", 1)[1]) if outcome[-1].isdigit() else None
                record(kind, outcome, status, fine)
            else:
                outcome = await stalled(host, port, rng, settings)
                record(kind, outcome, None, not outcome.endswith("left open"))

        async def worker(w: int) -> None:
            rng = random.Random(settings.seed * 100_003 + w)
            for _ in range(settings.max_requests):
                if time.monotonic() >= deadline:
                    return
                kind = rng.choices(KINDS, settings.weights)[0]
                try:
                    await one(kind, rng)
                except Exception as e:  # noqa: BLE001 - any client failure is an outcome
                    record(kind, f"client error {type(e).__name__}", fine=False)
                    report.unexpected.append(f"{kind}: {type(e).__name__}: {str(e)[:120]}")

        async def monitor() -> None:
            while not done.is_set():
                try:
                    r = await client.get("/health", timeout=30)
                    report.health[r.status_code] += 1
                    report.five_xx += r.status_code >= 500
                except httpx.TransportError as e:
                    report.health[type(e).__name__] += 1
                    report.unexpected.append(f"/health {type(e).__name__}")
                try:
                    await asyncio.wait_for(done.wait(), 0.5)
                except asyncio.TimeoutError:
                    pass

        start = time.monotonic()
        watcher = asyncio.ensure_future(monitor())
        await asyncio.gather(*(worker(w) for w in range(settings.clients)))
        report.wall_s = time.monotonic() - start
        done.set()
        await watcher

        # every slot and queue place must come back (a hung-up client frees its own at the
        # engine's next step; give it generous time, then read what is left)
        stats = {}
        for _ in range(240):
            stats = (await client.get("/health")).json()
            if stats["active"] == 0 and stats["waiting"] == 0:
                break
            await asyncio.sleep(0.25)
        report.leaked = {"active": stats.get("active"), "waiting": stats.get("waiting")}
        report.engine = {k: stats.get(k) for k in ("requests", "finished", "cancelled",
                                                    "rejected", "errors", "tokens")}
        again = await references(client, specs)
        report.after_checked = len(specs)
        report.after_mismatches = sum(a != b for a, b in zip(again, wanted))


# -- the server


def start_server(run: str, settings: Settings, log_path: str, extra: tuple[str, ...] = ()
                 ) -> tuple[subprocess.Popen, str]:
    """`moorelm serve RUN` on 127.0.0.1, any free port, its log in ``log_path``."""
    cmd = [sys.executable, "-m", "moorelm", "serve", run, "--host", "127.0.0.1", "--port", "0",
           "--model-name", "soak", "--log-level", "warning",
           "--header-timeout", str(settings.header_timeout_s),
           "--body-timeout", str(settings.body_timeout_s),
           "--max-body", str(settings.max_body), *extra]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    log.close()
    line = proc.stdout.readline()
    m = re.search(r"at (http://\S+?) ", line)
    if not m:
        proc.kill()
        proc.wait()
        raise SystemExit(f"the server did not start: {line!r}; see {log_path}")
    url = m.group(1)
    for _ in range(300):
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    raise SystemExit("the server did not answer /health")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_soak(run: str, settings: Settings, extra: tuple[str, ...] = (),
             log_path: str | None = None) -> tuple[Report, str]:
    """Start a server, soak it, stop it: the report and the server's log text."""
    log_path = log_path or os.path.join(tempfile.mkdtemp(prefix="moorelm-soak-"), "server.log")
    proc, url = start_server(run, settings, log_path, extra)
    report = Report()
    try:
        cpu0 = server_cpu_seconds(proc.pid)
        asyncio.run(soak(url, "soak", settings, report))
        cpu1 = server_cpu_seconds(proc.pid)
        report.server_alive = proc.poll() is None
        if None not in (cpu0, cpu1) and report.wall_s:
            report.server_cores = (cpu1 - cpu0) / report.wall_s  # soak and checks after it
    finally:
        stop_server(proc)
    return report, Path(log_path).read_text(encoding="utf-8", errors="replace")


def print_report(report: Report, settings: Settings, log: str) -> None:
    kinds = report.kinds()
    print(f"\n{sum(kinds.values())} requests from {settings.clients} clients in "
          f"{report.wall_s:.0f} s")
    for kind in KINDS:
        rows = sorted(((o, n) for (k, o), n in report.outcomes.items() if k == kind),
                      key=lambda x: -x[1])
        print(f"  {kind:<10} {kinds[kind]:>6}   " + "; ".join(f"{o} {n}" for o, n in rows))
    print(f"/health polls during the soak: {dict(report.health)}")
    print(f"5xx: {report.five_xx}")
    print(f"leaked after the soak: active {report.leaked.get('active')}, "
          f"waiting {report.leaked.get('waiting')}")
    print(f"healthy outputs unchanged: {report.healthy_checked} of "
          f"{report.healthy_checked + report.mismatches} in the soak; "
          f"{report.after_checked - report.after_mismatches} of {report.after_checked} "
          "re-sent alone after it")
    print(f"engine counters: {report.engine}")
    print(f"tracebacks in the server log: {log.count('Traceback')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", help="run folder to serve")
    ap.add_argument("--init", metavar="PRESET", default=None,
                    help="if RUN does not exist, create it with random weights of this size "
                    "(e.g. tiny, shakespeare-char)")
    ap.add_argument("--minutes", type=float, default=3.0, help="how long (default 3)")
    ap.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    ap.add_argument("--max-requests", type=int, default=1_000_000,
                    help="requests per client at most (default: until the time is up)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the mix (default 0)")
    ap.add_argument("--max-batch", type=int, default=16, help="server --max-batch (default 16)")
    ap.add_argument("--threads", type=int, default=None, help="server --threads")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    if args.minutes <= 0 or args.clients < 1 or args.max_requests < 1:
        raise SystemExit("--minutes, --clients and --max-requests must be positive")
    if args.init and not Path(args.run).exists():
        make_random_run(args.run, args.init)
    settings = Settings(clients=args.clients, duration_s=args.minutes * 60,
                        max_requests=args.max_requests, seed=args.seed)
    extra = ("--max-batch", str(args.max_batch))
    if args.threads:
        extra += ("--threads", str(args.threads))
    load0 = os.getloadavg()[0]
    print(f"soak of {args.run}: {settings.clients} clients for {args.minutes:g} min, "
          f"max-batch {args.max_batch}, header timeout {settings.header_timeout_s:g} s, "
          f"body timeout {settings.body_timeout_s:g} s; load average {load0:.2f} "
          f"({os.cpu_count()} CPU cores)", flush=True)
    cpu0 = time.process_time()
    report, log = run_soak(args.run, settings, extra)
    print_report(report, settings, log)
    cores = f"{report.server_cores:.2f}" if report.server_cores is not None else "-"
    print(f"load average after: {os.getloadavg()[0]:.2f}; CPU in cores: server {cores}, "
          f"clients {(time.process_time() - cpu0) / max(report.wall_s, 1e-9):.2f}")
    if args.json:
        atomic_write_json(Path(args.json), report.to_dict())
    failures = report.failures()
    for line in failures:
        print(f"FAIL: {line}")
    print("FAIL" if failures else "PASS: 0 5xx, 0 leaked, healthy outputs unchanged")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
