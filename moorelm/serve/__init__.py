"""Serving over HTTP: an OpenAI-compatible API (``api``, wire format in ``schema``) over the
continuous-batching engine of ``moorelm.inference``, and the server runner (this module).

    from moorelm.serve import serve
    serve("runs/demo", port=8000)          # what `moorelm serve runs/demo` runs

or, in a notebook or a test, a server in a background thread::

    from moorelm.serve import BackgroundServer, build_app
    with BackgroundServer(build_app("runs/demo")) as server:
        print(server.url)
"""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from moorelm.errors import MoorelmError
from moorelm.inference.engine import Engine
from moorelm.inference.limits import kv_dtype_of
from moorelm.serve.api import (
    BODY_TIMEOUT_S,
    LOOPBACK_HOSTS,
    MAX_BODY_BYTES,
    check_api_key,
    create_app,
)
from moorelm.serve.policy import ServePolicy, load_policy

__all__ = ["BackgroundServer", "DrainingServer", "ServePolicy", "ServerLimits", "allowed_hosts",
           "bind", "build_app", "load_policy", "serve"]


@dataclass(frozen=True)
class ServerLimits:
    """What a client may hold of the server, so that hostile or broken clients cannot take
    ``/health`` (or anyone else) down.

    ``keep_alive_s``: an idle kept-alive connection is closed after this long;
    ``header_timeout_s``: a connection must send a request's headers within this long of
    connecting or of its last response; ``body_timeout_s``: and its body within this long
    (408); ``max_connections``: open connections (and requests in flight) beyond which new
    requests get 503 (None: half the process's file descriptor limit, at most 1024);
    ``drain_s``: on SIGTERM or Ctrl-C, how long running requests may go on before they end
    with an OpenAI-shaped error (streams: a last error event and ``[DONE]``).
    """

    keep_alive_s: float = 5.0
    header_timeout_s: float = 10.0
    body_timeout_s: float = BODY_TIMEOUT_S
    max_connections: int | None = None
    drain_s: float = 5.0

    def __post_init__(self) -> None:
        for name in ("keep_alive_s", "header_timeout_s", "body_timeout_s", "drain_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value >= 0:
                raise MoorelmError(f"{name} must be a number >= 0, got {value!r}")
        if self.max_connections is not None and (not isinstance(self.max_connections, int)
                                                 or self.max_connections < 1):
            raise MoorelmError(f"max_connections must be an integer >= 1, got "
                               f"{self.max_connections!r}")

    def connections(self) -> int:
        if self.max_connections is not None:
            return self.max_connections
        try:
            import resource

            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        except (ImportError, OSError, ValueError):
            soft = 2048
        return max(8, min(1024, soft // 2 if soft > 0 else 1024))


def build_app(run: str | Path, max_batch: int | None = None, max_queue: int = 64,
              api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
              device: str = "auto", model_name: str | None = None,
              hosts: tuple[str, ...] | None = None, body_timeout: float | None = BODY_TIMEOUT_S,
              policy: ServePolicy | None = None, max_seq_len: int | None = None,
              kv_memory: int | None = None, weights: str = "fp32",
              max_memory: int | None = None, threads: int | None = None,
              kv_dtype: str = "auto"):
    """Load a run folder's newest checkpoint and return the FastAPI app that serves it
    (bounded by ``policy``: see ``moorelm.serve.policy``; each request's context by
    ``max_seq_len`` and the KV-cache budget ``kv_memory``: see ``moorelm.inference.engine``;
    ``max_memory`` instead: weights and KV cache together, the cache getting the rest;
    ``threads``: the engine's torch threads, default torch's count here; ``kv_dtype``: the
    KV cache's keys and values, "auto" (the weights'), "fp32" or "bf16")."""
    import moorelm

    check_api_key(api_key)  # before loading the model
    kv_dtype_of(kv_dtype)
    lm = moorelm.load(run, device=device, weights=weights)
    if max_memory is not None:
        kv_memory = kv_budget_after_weights(lm.model, max_memory, weights)
    engine = Engine(lm.model, lm.tokenizer, max_batch=max_batch, max_queue=max_queue,
                    max_seq_len=max_seq_len, kv_memory=kv_memory, stop_ids=lm.stop_ids,
                    threads=threads, kv_dtype=kv_dtype)
    name = model_name or lm.name
    return create_app(engine, name, api_key=api_key, max_body_bytes=max_body_bytes,
                      prompt_template=lm.prompt_template, hosts=hosts, body_timeout=body_timeout,
                      policy=policy, chat_template=lm.template())


def kv_budget_after_weights(model, max_memory: int, weights: str = "fp32") -> int:
    """What ``max_memory`` bytes leave for the KV cache after the model's weights (each
    tensor counted once, tied ones too); a MoorelmError when they leave nothing."""
    from moorelm.quantize import weight_bytes

    used = weight_bytes(model)
    left = max_memory - used
    if left < 2**20:
        raise MoorelmError(
            f"--max-memory {max_memory / 2**20:.0f} MiB: the weights ({weights}) take "
            f"{used / 2**20:.0f} MiB, which leaves no room for a KV cache; raise it"
            + (" or use --weights int8" if weights in ("fp32", "bf16") else ""))
    return left


def serve(run: str | Path, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, max_batch: int | None = None, max_queue: int = 64,
          max_body_bytes: int = MAX_BODY_BYTES, device: str = "auto",
          model_name: str | None = None, log_level: str = "info",
          limits: ServerLimits | None = None, policy: ServePolicy | None = None,
          max_seq_len: int | None = None, kv_memory: int | None = None,
          weights: str = "fp32", max_memory: int | None = None,
          threads: int | None = None, kv_dtype: str = "auto") -> None:
    """Serve a run folder until interrupted (Ctrl-C, SIGTERM: running requests get
    ``limits.drain_s`` to finish).

    Without an API key on a loopback address only loopback host names are answered (a
    web page that reaches the port by DNS rebinding gets 421)."""
    limits = limits or ServerLimits()
    check_api_key(api_key)
    loopback = host in LOOPBACK_HOSTS
    if not api_key and not loopback:
        print(f"moorelm: warning: listening on {host} without --api-key: anyone who can reach "
              "this port can use the model", file=sys.stderr)
    sock = bind(host, port)  # before loading the model: a taken port fails fast
    hosts = allowed_hosts(host, api_key)
    app = build_app(run, max_batch, max_queue, api_key, max_body_bytes, device, model_name,
                    hosts, limits.body_timeout_s, policy, max_seq_len, kv_memory, weights,
                    max_memory, threads, kv_dtype=kv_dtype)
    actual = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    engine = app.state.service.engine
    print(f"moorelm: serving {app.state.service.model_name} at http://{shown}:{actual} "
          f"(playground: http://{shown}:{actual}/, OpenAI base_url: http://{shown}:{actual}/v1); "
          f"{engine.max_batch} slots of up to {engine.seq_len} tokens, KV cache "
          f"{engine.kv_cache_bytes / 2**20:.0f} MiB {str(engine.kv_dtype).removeprefix('torch.')}"
          + (" (taken as tokens are held)" if engine.kv.lazy else ""), flush=True)
    server = DrainingServer(app, limits, log_level)
    try:
        server.run(sockets=[sock])
    finally:
        app.state.service.engine.stop()
        sock.close()
    if not server.started:
        raise MoorelmError(f"the server on {host}:{actual} failed to start; see the log above")


def allowed_hosts(host: str, api_key: str | None) -> tuple[str, ...] | None:
    """The Host names a server bound to ``host`` answers: loopback names only when it
    listens on loopback without a key (None: any)."""
    return LOOPBACK_HOSTS if host in LOOPBACK_HOSTS and not api_key else None


def _protocol(header_timeout_s: float):
    """uvicorn's HTTP protocol (httptools) with a deadline for each request's headers,
    from connecting or from the previous response: silent and half-sent requests are
    closed instead of holding a file descriptor for ever. h11 (without httptools) gets
    no header deadline."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    if not hasattr(AutoHTTPProtocol, "on_headers_complete"):
        return "auto"

    class HeaderDeadline(AutoHTTPProtocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._deadline = self.loop.call_later(header_timeout_s, self._too_slow)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not getattr(self, "pipeline", None):  # a pipelined request has its headers
                self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(header_timeout_s, self._too_slow)

        def _disarm(self) -> None:
            deadline = getattr(self, "_deadline", None)
            if deadline is not None:
                deadline.cancel()
                self._deadline = None

        def _too_slow(self) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadline


class DrainingServer:
    """A uvicorn server for ``app`` with ``limits``; on shutdown the engine keeps decoding
    for ``limits.drain_s`` and then ends what is still running with an error event, which
    the routes answer in OpenAI's shape (streams: an error event and ``[DONE]``)."""

    def __init__(self, app, limits: ServerLimits, log_level: str = "info"):
        import uvicorn

        self.limits = limits
        engine = app.state.service.engine
        config = uvicorn.Config(
            app, log_level=log_level, http=_protocol(limits.header_timeout_s),
            timeout_keep_alive=limits.keep_alive_s, limit_concurrency=limits.connections(),
            timeout_graceful_shutdown=limits.drain_s + 2)

        class Server(uvicorn.Server):
            async def shutdown(self, sockets=None) -> None:
                loop = asyncio.get_running_loop()

                def end() -> None:
                    loop.run_in_executor(None, engine.stop)

                timer = loop.call_later(limits.drain_s, end)
                try:
                    await super().shutdown(sockets)
                finally:
                    timer.cancel()

        self.server = Server(config)

    @property
    def started(self) -> bool:
        return self.server.started

    def run(self, sockets: list[socket.socket]) -> None:
        self.server.run(sockets=sockets)

    def exit(self) -> None:
        self.server.should_exit = True


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or a one-line error when the address is taken or invalid."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise MoorelmError(f"cannot listen on {host}:{port} ({e.strerror or e}); "
                           "choose another --host or --port") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class BackgroundServer:
    """A uvicorn server for ``app`` in a background thread (tests, benchmarks, notebooks).

        with BackgroundServer(app) as server:
            print(server.url)   # http://127.0.0.1:PORT
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 limits: ServerLimits | None = None):
        self.sock = bind(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.draining = DrainingServer(app, limits or ServerLimits(drain_s=2.0), log_level)
        self.server = self.draining.server
        self.thread = threading.Thread(target=self.draining.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise MoorelmError("the server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10 + self.draining.limits.drain_s)
        self.sock.close()
