"""Serving: continuous batching (``engine``) behind an OpenAI-compatible API (``api``).

    from moorelm.serve import serve
    serve("runs/demo", port=8000)          # what `moorelm serve runs/demo` runs

or, in a notebook or a test, a server in a background thread::

    from moorelm.serve import BackgroundServer, build_app
    with BackgroundServer(build_app("runs/demo")) as server:
        print(server.url)
"""

from __future__ import annotations

import sys
from pathlib import Path

from moorelm.errors import MoorelmError
from moorelm.serve.engine import Engine, QueueFull, Request, RequestHandle, TokenEvent

__all__ = ["BackgroundServer", "Engine", "QueueFull", "Request", "RequestHandle", "TokenEvent",
           "build_app", "create_app", "render_chat", "serve"]

_API = ("BackgroundServer", "create_app", "render_chat")
MAX_BODY_BYTES = 1 << 20


def __getattr__(name: str):
    # the HTTP side needs fastapi and uvicorn (the "serve" extra); the engine does not
    if name in _API:
        from moorelm.serve import api

        return getattr(api, name)
    raise AttributeError(f"module 'moorelm.serve' has no attribute {name!r}")


def build_app(run: str | Path, max_batch: int = 16, max_queue: int = 64,
              api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
              device: str = "auto", model_name: str | None = None):
    """Load a run folder's newest checkpoint and return the FastAPI app that serves it."""
    import moorelm
    from moorelm.serve.api import create_app

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

    from moorelm.serve.api import bind

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
