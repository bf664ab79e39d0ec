"""The ``serve`` verb: an OpenAI-compatible server with continuous batching and a playground.

    moorelm serve runs/demo                       # http://127.0.0.1:8000, playground at /
    moorelm serve runs/demo --port 0              # any free port (printed)
    MOORELM_API_KEY=secret moorelm serve runs/demo --host 0.0.0.0
"""

from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path

import torch

from moorelm.cli.core import add_weights_flag
from moorelm.config import check_threads
from moorelm.errors import MoorelmError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve a run over an OpenAI-compatible HTTP API",
        description="Serve a model (a run folder's newest checkpoint, a GGUF file, an HF "
        "folder or 'smollm2'): POST /v1/completions (echo with prompt log-probs too) and "
        "/v1/chat/completions (streaming or not; response_format for JSON output), "
        "/tokenize, /detokenize, /tokenizer_info, /v1/inspect, GET /v1/models, /health, "
        "/metrics (Prometheus), and a web playground at / (completion and chat modes). "
        "Requests are decoded together with continuous batching. See docs/serving.md.")
    p.add_argument("run", help="run folder (or a GGUF file, an HF folder, 'smollm2')")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    p.add_argument("--api-key", default=os.environ.get("MOORELM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes "
                   "(default: $MOORELM_API_KEY, else no key)")
    p.add_argument("--max-batch", type=int, default=None,
                   help="requests decoded together (KV cache slots; default 64 on a CPU, where "
                   "the cache takes memory only for the tokens held, 16 on a GPU)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="context window per request (default: the model's, or what the KV-cache "
                   "budget holds)")
    p.add_argument("--kv-memory", default=None, metavar="SIZE",
                   help="memory for the whole KV cache, e.g. 512MiB or 4GiB (default 2GiB): on "
                   "a CPU the tokens all requests hold together (a request waits until its "
                   "prompt + max_tokens fit), on a GPU reserved and divided among the slots")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="memory for the weights and the KV cache together, e.g. 1.5GiB: the KV "
                   "cache gets what the weights (in --weights' format) leave; instead of "
                   "--kv-memory")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a slot before 429 (default 64)")
    p.add_argument("--max-body", type=int, default=1 << 20,
                   help="largest request body in bytes (default 1 MiB)")
    p.add_argument("--model-name", default=None, help="model id clients use (default: run folder name)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    add_weights_flag(p)
    p.add_argument("--kv-dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="keys and values in the KV cache: auto (the weights' dtype: fp32, or "
                   "bf16 with --weights bf16), fp32, or bf16 (half the bytes per token, so twice "
                   "the tokens in the budget; under fp32 weights attention reads them into fp32)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: one per core)")
    p.add_argument("--policy", default=None, metavar="FILE",
                   help="the deployment's policy (YAML or JSON): stop strings, banned phrases, "
                   "max tokens, per model; see docs/serving.md (--config is the flags file "
                   "every verb takes; it may name a policy: 'policy: FILE')")
    p.add_argument("--ban", action="append", default=[], metavar="PHRASE",
                   help="a phrase the server never produces (repeatable; adds to --policy's)")
    p.add_argument("--log-level", default="info",
                   choices=("critical", "error", "warning", "info", "debug"))
    _add_limit_flags(p)
    p.set_defaults(func=cmd_serve)


# --- server limits (moorelm.serve.ServerLimits). The defaults shown are ServerLimits'
# own (tests/test_cli_serve.py keeps them in step); a flag left out keeps its field's default.
LIMIT_FLAGS = {  # flag -> (ServerLimits field, zero allowed)
    "--keep-alive": ("keep_alive_s", True),
    "--header-timeout": ("header_timeout_s", False),
    "--body-timeout": ("body_timeout_s", False),
    "--drain": ("drain_s", True),
}


def _add_limit_flags(p) -> None:
    g = p.add_argument_group("limits on what a client may hold of the server")
    g.add_argument("--keep-alive", type=float, default=None, metavar="SECONDS",
                   help="close a kept-alive connection idle this long (default 5; "
                   "0: close after each response)")
    g.add_argument("--header-timeout", type=float, default=None, metavar="SECONDS",
                   help="close a connection that has not sent a request's headers this long "
                   "after connecting or after its last response (default 10)")
    g.add_argument("--body-timeout", type=float, default=None, metavar="SECONDS",
                   help="answer 408 to a request whose body has not fully arrived this long "
                   "after its headers (default 30)")
    g.add_argument("--max-connections", type=int, default=None, metavar="N",
                   help="open connections beyond which new requests get 503 (default: half "
                   "the open-file limit, ulimit -n, at most 1024)")
    g.add_argument("--drain", type=float, default=None, metavar="SECONDS",
                   help="on Ctrl-C or SIGTERM, let running requests finish this long, then "
                   "end them with 503 shutting_down (default 5; 0: at once)")


def server_limits(args: argparse.Namespace):
    """The ``ServerLimits`` the limit flags ask for (one line, MoorelmError, if invalid)."""
    from moorelm.serve import ServerLimits

    given = {}
    for flag, (name, zero_ok) in LIMIT_FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is None:
            continue
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
            least = "0 or more" if zero_ok else "more than 0"
            raise MoorelmError(f"{flag} must be a number of seconds, {least}; got {value:g}")
        given[name] = value
    if args.max_connections is not None:
        if args.max_connections < 1:
            raise MoorelmError(f"--max-connections must be at least 1, got {args.max_connections}")
        given["max_connections"] = args.max_connections
    return ServerLimits(**given)


_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6,
          "mib": 2**20, "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12,
          "tib": 2**40}


def parse_size(text: str, flag: str) -> int:
    """'512MiB', '4GiB', '1.5G', '1000000' -> bytes (one clear line for anything else)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = m and m.group(2).lower()
    if not m or unit not in _UNITS:
        raise MoorelmError(f"{flag} must be a size such as 512MiB or 4GiB, got {text!r}")
    size = int(float(m.group(1)) * _UNITS[unit])
    if size < 1:
        raise MoorelmError(f"{flag} must be more than 0 bytes, got {text!r}")
    return size


def cmd_serve(args: argparse.Namespace) -> int:
    from moorelm.serve import serve
    from moorelm.serve.policy import ServePolicy, load_policy

    if not 0 <= args.port <= 65535:
        raise MoorelmError(f"--port must be in 0..65535, got {args.port}")
    for flag, value in (("--max-batch", args.max_batch), ("--max-body", args.max_body)):
        if value is not None and value < 1:
            raise MoorelmError(f"{flag} must be at least 1, got {value}")
    if args.max_queue < 0:
        raise MoorelmError(f"--max-queue must be at least 0, got {args.max_queue}")
    if args.max_seq_len is not None and args.max_seq_len < 2:
        raise MoorelmError(f"--max-seq-len must be at least 2, got {args.max_seq_len}")
    if args.kv_memory and args.max_memory:
        raise MoorelmError("give --max-memory (weights + KV cache) or --kv-memory (KV cache "
                           "alone), not both")
    if args.kv_memory:
        parse_size(args.kv_memory, "--kv-memory")  # before loading the model
    if args.max_memory:
        parse_size(args.max_memory, "--max-memory")
    limits = server_limits(args)
    check_threads(args.threads, "--threads")
    before = torch.get_num_threads()
    threads = args.threads or before
    # The engine's thread does the model's work. OpenMP keeps a pool of worker threads per
    # thread that runs parallel regions, and with a second pool (the main thread's) beside
    # the engine's, more threads than cores wait for work and libgomp stops them spinning:
    # every parallel op in the engine then paid ~50 us to wake its workers (SmolLM2 decode
    # 13 instead of 20 tok/s). So this thread, which only speaks HTTP, runs torch serially.
    torch.set_num_threads(1)
    try:
        name = args.model_name or Path(args.run).resolve().name
        policy = load_policy(args.policy, name) if args.policy else ServePolicy()
        policy = policy.with_bans(args.ban) if args.ban else policy
        serve(args.run, host=args.host, port=args.port, api_key=args.api_key or None,
              max_batch=args.max_batch, max_queue=args.max_queue, max_body_bytes=args.max_body,
              device=args.device, model_name=args.model_name, log_level=args.log_level,
              limits=limits, policy=policy, max_seq_len=args.max_seq_len,
              kv_memory=parse_size(args.kv_memory, "--kv-memory") if args.kv_memory else None,
              max_memory=parse_size(args.max_memory, "--max-memory") if args.max_memory else None,
              weights=args.weights, threads=threads, kv_dtype=args.kv_dtype)
    finally:
        torch.set_num_threads(before)  # as it was, for an in-process caller
    return 0
