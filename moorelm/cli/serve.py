"""The ``serve`` verb: an OpenAI-compatible server with continuous batching and a playground.

    moorelm serve runs/demo                       # http://127.0.0.1:8000, playground at /
    moorelm serve runs/demo --port 0              # any free port (printed)
    MOORELM_API_KEY=secret moorelm serve runs/demo --host 0.0.0.0
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from moorelm.errors import MoorelmError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve a run over an OpenAI-compatible HTTP API",
        description="Serve a run folder's newest checkpoint: POST /v1/completions and "
        "/v1/chat/completions (streaming or not), GET /v1/models, /health, and a web "
        "playground at /. Requests are decoded together with continuous batching. "
        "See docs/serving.md.")
    p.add_argument("run", help="run folder")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    p.add_argument("--api-key", default=os.environ.get("MOORELM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes "
                   "(default: $MOORELM_API_KEY, else no key)")
    p.add_argument("--max-batch", type=int, default=16,
                   help="requests decoded together (KV cache slots; default 16)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a slot before 429 (default 64)")
    p.add_argument("--max-body", type=int, default=1 << 20,
                   help="largest request body in bytes (default 1 MiB)")
    p.add_argument("--model-name", default=None, help="model id clients use (default: run folder name)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: one per core)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="the deployment's policy (YAML or JSON): stop strings, banned phrases, "
                   "max tokens; see docs/serving.md")
    p.add_argument("--ban", action="append", default=[], metavar="PHRASE",
                   help="a phrase the server never produces (repeatable; adds to --config's)")
    p.add_argument("--log-level", default="info",
                   choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from moorelm.serve import serve
    from moorelm.serve.policy import ServePolicy, load_policy

    if not 0 <= args.port <= 65535:
        raise MoorelmError(f"--port must be in 0..65535, got {args.port}")
    for flag, value in (("--max-batch", args.max_batch), ("--max-body", args.max_body)):
        if value < 1:
            raise MoorelmError(f"{flag} must be at least 1, got {value}")
    if args.max_queue < 0:
        raise MoorelmError(f"--max-queue must be at least 0, got {args.max_queue}")
    if args.threads is not None:
        if args.threads < 1:
            raise MoorelmError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    name = args.model_name or Path(args.run).resolve().name
    policy = load_policy(args.config, name) if args.config else ServePolicy()
    policy = policy.with_bans(args.ban) if args.ban else policy
    serve(args.run, host=args.host, port=args.port, api_key=args.api_key or None,
          max_batch=args.max_batch, max_queue=args.max_queue, max_body_bytes=args.max_body,
          device=args.device, model_name=args.model_name, log_level=args.log_level,
          policy=policy)
    return 0
