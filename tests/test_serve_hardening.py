"""The server under hostile clients: Host checks against DNS rebinding, the key on the
schema, API keys that can be presented, playground headers, deadlines for silent and
dripping connections, and a shutdown drain that ends running requests in OpenAI's shape."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading

import httpx
import pytest

import moorelm
from moorelm.errors import MoorelmError
from moorelm.inference.engine import Engine
from moorelm.serve import BackgroundServer, ServerLimits, allowed_hosts
from moorelm.serve.api import LOOPBACK_HOSTS, create_app
from tests.test_inference_engine import wait_until

KEY = "k-123"
BODY = {"model": "tiny", "prompt": "It", "max_tokens": 2}


@pytest.fixture(scope="module")
def lm(tiny_run):
    return moorelm.load(tiny_run, device="cpu")


@pytest.fixture(scope="module")
def engine(lm):
    eng = Engine(lm.model, lm.tokenizer, max_batch=4).start()
    yield eng
    eng.stop()


def test_keyless_loopback_answers_loopback_hosts_only(engine):
    """Bound to loopback without a key, the server answers only requests for loopback host
    names (421 for others: a page reaching it by DNS rebinding); with a key, or bound
    elsewhere, any Host."""
    assert allowed_hosts("127.0.0.1", None) == LOOPBACK_HOSTS
    assert allowed_hosts("127.0.0.1", KEY) is None and allowed_hosts("0.0.0.0", None) is None
    with BackgroundServer(create_app(engine, "tiny", hosts=LOOPBACK_HOSTS)) as srv:
        for host in ("evil.example", "evil.example:80", "127.0.0.1.nip.io", ""):
            r = httpx.get(srv.url + "/health", headers={"Host": host})
            assert r.status_code == 421 and r.json()["error"]["code"] == "host_not_allowed", host
        r = httpx.post(srv.url + "/v1/completions", json=BODY, headers={"Host": "attacker.test"})
        assert r.status_code == 421
        for host in ("localhost", f"127.0.0.1:{srv.port}", "[::1]:8000", "LOCALHOST:1"):
            assert httpx.get(srv.url + "/health", headers={"Host": host}).status_code == 200


def test_schema_needs_the_key_and_keys_must_be_ascii(engine):
    """With a key, /openapi.json needs it too; a key that could never be sent in a header
    (non-ASCII, spaces) is refused when the app is made."""
    with BackgroundServer(create_app(engine, "tiny", api_key=KEY)) as srv:
        assert httpx.get(srv.url + "/openapi.json").status_code == 401
        ok = httpx.get(srv.url + "/openapi.json", headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200 and "paths" in ok.json()
        assert httpx.get(srv.url + "/health").status_code == 200
    for bad in ("clé", "two words", "tab\there", ""):
        with pytest.raises(MoorelmError, match="printable ASCII"):
            create_app(engine, "tiny", api_key=bad)


def test_playground_headers(engine):
    """The playground may not be framed, and its CSP lets exactly its own inline script
    and style run and only this server be fetched."""
    with BackgroundServer(create_app(engine, "tiny")) as srv:
        r = httpx.get(srv.url + "/")
    assert r.headers["X-Frame-Options"] == "DENY"
    csp = r.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in csp and "connect-src 'self'" in csp
    script = re.search(r"<script>(.*?)</script>", r.text, flags=re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in csp
    assert "unsafe-inline" not in csp


def closed_by_server(sock: socket.socket) -> bytes:
    """Read until the server closes the connection; what it sent (b"" for nothing)."""
    sock.settimeout(20)
    got = b""
    while chunk := sock.recv(4096):
        got += chunk
    return got


def test_silent_and_dripping_connections_are_cut(engine):
    """A connection that sends nothing, one that stops halfway through its headers and one
    whose body drips in are closed by the server (the last with 408), and /health answers
    all along (they used to stay open for ever)."""
    limits = ServerLimits(header_timeout_s=0.3, body_timeout_s=0.3)
    with BackgroundServer(create_app(engine, "tiny", body_timeout=0.3), limits=limits) as srv:
        silent = [socket.create_connection((srv.host, srv.port)) for _ in range(10)]
        half = socket.create_connection((srv.host, srv.port))
        half.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        drip = socket.create_connection((srv.host, srv.port))
        drip.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 50\r\n\r\n{")
        assert httpx.get(srv.url + "/health").status_code == 200
        for s in silent + [half]:
            assert closed_by_server(s) == b""
        answer = closed_by_server(drip)
        assert answer.startswith(b"HTTP/1.1 408") and b"body_timeout" in answer
        assert httpx.get(srv.url + "/health").status_code == 200
        # a kept-alive client still gets its second answer (the deadline re-arms)
        with httpx.Client() as c:
            assert c.get(srv.url + "/health").status_code == 200
            assert c.get(srv.url + "/health").status_code == 200
    for s in silent + [half, drip]:
        s.close()
    with pytest.raises(MoorelmError, match="drain_s"):
        ServerLimits(drain_s=-1)
    with pytest.raises(MoorelmError, match="max_connections"):
        ServerLimits(max_connections=0)


def test_shutdown_drain_ends_running_requests_in_openai_shape(lm):
    """Requests still running when the drain runs out end with OpenAI's error shape: a
    plain request gets 503 (code shutting_down), a stream a last error event and [DONE]."""
    eng = Engine(lm.model, lm.tokenizer, max_batch=2).start()
    eng.pause()  # nothing is admitted: both requests are still running at shutdown
    srv = BackgroundServer(create_app(eng, "tiny"), limits=ServerLimits(drain_s=0.3))
    srv.__enter__()
    got: dict = {}

    def plain():
        got["plain"] = httpx.post(srv.url + "/v1/completions", json=BODY, timeout=30)

    def stream():
        with httpx.stream("POST", srv.url + "/v1/completions", json={**BODY, "stream": True},
                          timeout=30) as r:
            got["stream"] = (r.status_code, [x for x in r.iter_lines() if x])

    threads = [threading.Thread(target=plain), threading.Thread(target=stream)]
    for t in threads:
        t.start()
    try:
        assert wait_until(lambda: eng.stats()["waiting"] == 2)
    finally:
        srv.__exit__(None, None, None)
    for t in threads:
        t.join(30)
    r = got["plain"]
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
    status, lines = got["stream"]
    assert status == 200 and lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][len("data: "):])["error"]["code"] == "shutting_down"
    eng.stop()
