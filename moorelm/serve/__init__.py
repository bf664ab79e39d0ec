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

import socket
import sys
import threading
import time
from pathlib import Path

from moorelm.errors import MoorelmError
from moorelm.inference.engine import Engine
from moorelm.serve.api import MAX_BODY_BYTES, create_app

__all__ = ["BackgroundServer", "bind", "build_app", "serve"]


def build_app(run: str | Path, max_batch: int = 16, max_queue: int = 64,
              api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
              device: str = "auto", model_name: str | None = None):
    """Load a run folder's newest checkpoint and return the FastAPI app that serves it."""
    import moorelm

    lm = moorelm.load(run, device=device)
    engine = Engine(lm.model, lm.tokenizer, max_batch=max_batch, max_queue=max_queue)
    name = model_name or Path(run).resolve().name
    return create_app(engine, name, api_key=api_key, max_body_bytes=max_body_bytes,
                      prompt_template=lm.prompt_template)


def serve(run: str | Path, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, max_batch: int = 16, max_queue: int = 64,
          max_body_bytes: int = MAX_BODY_BYTES, device: str = "auto",
          model_name: str | None = None, log_level: str = "info") -> None:
    """Serve a run folder until interrupted (Ctrl-C)."""
    import uvicorn

    if not api_key and host not in ("127.0.0.1", "localhost", "::1"):
        print(f"moorelm: warning: listening on {host} without --api-key: anyone who can reach "
              "this port can use the model", file=sys.stderr)
    sock = bind(host, port)  # before loading the model: a taken port fails fast
    app = build_app(run, max_batch, max_queue, api_key, max_body_bytes, device, model_name)
    actual = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    print(f"moorelm: serving {app.state.service.model_name} at http://{shown}:{actual} "
          f"(playground: http://{shown}:{actual}/, OpenAI base_url: http://{shown}:{actual}/v1)",
          flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
    finally:
        app.state.service.engine.stop()
        sock.close()
    if not server.started:
        raise MoorelmError(f"the server on {host}:{actual} failed to start; see the log above")


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

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.sock = bind(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level,
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
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
        self.thread.join(10)
        self.sock.close()
