"""Load test of `moorelm serve`: concurrent streaming clients against a real server.

Starts `moorelm serve RUN` on 127.0.0.1 (any free port) in its own process, then for each
concurrency level runs that many clients, each sending the same fixed number of streaming
completion requests one after another, and prints per level:

    requests/s, output tokens/s (all clients together), time to first token p50/p99,
    inter-token latency p50/p99 (gaps between streamed chunks of one response; one chunk
    carries one token), output tokens/s relative to one client (the baseline), and the
    server's CPU use in cores (Linux).

The sweep over the levels runs --rounds times (default 3) and a summary gives each level's
median and the ratio to one client taken within each round (a paired ratio: both figures
from the same minutes, so a slow spell of the machine hits both), as median and range.

Every response is exactly --max-tokens long (end of text is banned with logit_bias), so the
levels do the same work per request. Usage:

    moorelm train --preset shakespeare-char --max-steps 50 --out /tmp/shakes
    python bench/serve_load.py /tmp/shakes                # 1, 8, 32, 64 clients
    python bench/serve_load.py /tmp/shakes --clients 1,32 --requests 2 --threads 2
    python bench/serve_load.py /tmp/shakes-rand --init shakespeare-char   # random weights

The target on the shakespeare-char model and 2 CPU cores: output tokens/s at 32 clients at
least 8x that at 1 client. Other processes on the machine skew the figures: the load average
is printed next to them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx


@dataclass
class Result:
    ttft: float = 0.0
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    ok: bool = False


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


async def one_request(client: httpx.AsyncClient, body: dict) -> Result:
    res = Result()
    start = time.perf_counter()
    last = None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            print(f"request failed: {r.status_code} {r.text[:200]}", file=sys.stderr)
            return res
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                res.tokens = chunk["usage"]["completion_tokens"]
            if "error" in chunk:  # the server ended the stream with an error event
                print(f"request failed: {chunk['error']}", file=sys.stderr)
                return res
            if chunk["choices"] and chunk["choices"][0]["text"]:
                now = time.perf_counter()
                if last is None:
                    res.ttft = now - start
                else:
                    res.gaps.append(now - last)
                last = now
    res.ok = True
    return res


async def run_level(url: str, model: str, clients: int, requests: int, max_tokens: int,
                    prompt: str) -> dict:
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def worker(w: int) -> list[Result]:
            out = []
            for i in range(requests):
                body = {"model": model, "prompt": prompt, "max_tokens": max_tokens,
                        "temperature": 1.0, "seed": w * 1000 + i, "stream": True,
                        "stream_options": {"include_usage": True}, "logit_bias": {"0": -100}}
                out.append(await one_request(client, body))
            return out

        start = time.perf_counter()
        per_worker = await asyncio.gather(*(worker(w) for w in range(clients)))
        wall = time.perf_counter() - start
    results = [r for rs in per_worker for r in rs]
    ok = [r for r in results if r.ok]
    tokens = sum(r.tokens for r in ok)
    gaps = [g for r in ok for g in r.gaps]
    ttfts = [r.ttft for r in ok]
    return {"clients": clients, "requests": len(results), "failed": len(results) - len(ok),
            "wall": wall, "req_s": len(ok) / wall, "tok_s": tokens / wall,
            "ttft_p50": percentile(ttfts, 50), "ttft_p99": percentile(ttfts, 99),
            "itl_p50": percentile(gaps, 50), "itl_p99": percentile(gaps, 99)}


def make_random_run(run: str, preset: str) -> None:
    """A run folder with random weights of ``preset`` size and a character tokenizer of the
    bundled Shakespeare: serving speed does not depend on what the weights learned."""
    import torch

    from moorelm.codecs import LMCodec
    from moorelm.config import build_configs, with_vocab
    from moorelm.corpus import load_corpus
    from moorelm.model import GPT
    from moorelm.run import RunFolder
    from moorelm.tokenizer import Tokenizer

    tok = Tokenizer.train(("".join(d.chunks()) for d in load_corpus(None).documents), "char")
    model_cfg, train_cfg = build_configs(preset=preset)
    model_cfg = with_vocab(model_cfg, tok.vocab_size)
    torch.manual_seed(0)
    model = GPT(model_cfg)
    folder = RunFolder(run)
    folder.write_files({"model": model_cfg.to_dict(), "train": train_cfg.to_dict()}, tok)
    folder.save(0, LMCodec().checkpoint_files(model), {"tokens": 0})


def start_server(run: str, max_batch: int | None, threads: int | None,
                 extra: list[str]) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "moorelm", "serve", run, "--port", "0", "--max-queue", "1024",
           "--log-level", "warning", "--model-name", "bench", *extra]
    if max_batch:
        cmd += ["--max-batch", str(max_batch)]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, text=True)
    line = proc.stdout.readline()
    print(line.strip().replace("moorelm: ", "server: "), flush=True)
    m = re.search(r"at (http://\S+?) ", line)
    if not m:
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    url = m.group(1)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not answer /health")


def server_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (Linux /proc; None elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def resident_bytes(pid: int) -> int | None:
    """A process's resident set now (Linux /proc; None elsewhere)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class RssSampler:
    """The server's resident set, sampled every 50 ms while a level runs: its peak."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, resident_bytes(self.pid) or 0)
            self._stop.wait(0.05)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", help="run folder to serve")
    ap.add_argument("--init", metavar="PRESET", default=None,
                    help="if RUN does not exist, create it with random weights of this size "
                    "(e.g. shakespeare-char) instead of training one")
    ap.add_argument("--clients", default="1,8,32,64",
                    help="concurrency levels; the smallest is the baseline (default 1,8,32,64)")
    ap.add_argument("--requests", type=int, default=3, help="requests per client (default 3)")
    ap.add_argument("--max-tokens", type=int, default=100, help="tokens per response (default 100)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="sweeps over the levels; the summary takes medians (default 3)")
    ap.add_argument("--prompt", default="ROMEO:\n")
    ap.add_argument("--max-batch", type=int, default=None,
                    help="server --max-batch (default: the server's own)")
    ap.add_argument("--server-args", default="",
                    help="more server flags, e.g. '--weights int8 --kv-memory 1GiB'")
    ap.add_argument("--threads", type=int, default=None,
                    help="server --threads (default: the server's own, torch's one per core; "
                    "--threads 1 leaves the second core to the HTTP side and the clients)")
    args = ap.parse_args()
    try:
        levels = [int(x) for x in args.clients.split(",")]
    except ValueError:
        raise SystemExit(f"--clients must be comma-separated integers, got {args.clients!r}") from None
    levels = sorted(set(levels))  # the smallest is the baseline of each round
    if not levels or min(levels) < 1 or args.requests < 1 or args.max_tokens < 1 or args.rounds < 1:
        raise SystemExit("--clients, --requests, --max-tokens and --rounds must be >= 1")
    if args.init and not Path(args.run).exists():
        make_random_run(args.run, args.init)

    proc, url = start_server(args.run, args.max_batch, args.threads, args.server_args.split())
    base_level = levels[0]
    tok_s: dict[int, list[float]] = {n: [] for n in levels}
    ratios: dict[int, list[float]] = {n: [] for n in levels}
    peak_rss: dict[int, int] = {}
    try:
        # warm up at every level (one short request per client): first-time costs (thread
        # pools, allocations, packed weights for a batch size) stay out of the figures
        for n in levels:
            asyncio.run(run_level(url, "bench", n, 1, min(args.max_tokens, 32), args.prompt))
        print(f"server {url}  run {args.run}  {args.requests} requests/client x "
              f"{args.max_tokens} tokens  max-batch {args.max_batch or 'default'}  "
              f"threads {args.threads or 'default'}  {args.rounds} rounds")
        print(f"load average before: {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPU cores)")
        idle = resident_bytes(proc.pid)
        if idle:
            print(f"server resident after warm-up: {idle / 2**20:.0f} MiB")
        header = (f"{'round':>5} {'clients':>7} {'req/s':>7} {'tok/s':>8} {f'vs {base_level}':>6} "
                  f"{'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} {'failed':>6} "
                  f"{'cpu':>5} {'load':>5} {'RSS MiB':>8}")
        print(header)
        for rnd in range(1, args.rounds + 1):
            base = None
            for n in levels:
                cpu0 = server_cpu_seconds(proc.pid)
                with RssSampler(proc.pid) as rss:
                    r = asyncio.run(run_level(url, "bench", n, args.requests, args.max_tokens,
                                              args.prompt))
                cpu1 = server_cpu_seconds(proc.pid)
                peak_rss[n] = max(peak_rss.get(n, 0), rss.peak)
                cores = f"{(cpu1 - cpu0) / r['wall']:>5.2f}" if None not in (cpu0, cpu1) else "    -"
                if n == base_level:
                    base = r["tok_s"]
                tok_s[n].append(r["tok_s"])
                ratio = r["tok_s"] / base if base else float("nan")
                ratios[n].append(ratio)
                print(f"{rnd:>5} {n:>7} {r['req_s']:>7.2f} {r['tok_s']:>8.1f} {ratio:>5.1f}x "
                      f"{r['ttft_p50'] * 1e3:>7.0f}ms {r['ttft_p99'] * 1e3:>7.0f}ms "
                      f"{r['itl_p50'] * 1e3:>6.1f}ms {r['itl_p99'] * 1e3:>6.1f}ms "
                      f"{r['failed']:>6} {cores} {os.getloadavg()[0]:>5.1f} "
                      f"{rss.peak / 2**20:>8.0f}", flush=True)
        print(f"\nsummary over {args.rounds} rounds: median output tokens/s, and the ratio to "
              f"{base_level} client(s) within each round (median, min-max)")
        for n in levels:
            rs = ratios[n]
            print(f"{n:>7} clients {statistics.median(tok_s[n]):>8.1f} tok/s   "
                  f"{statistics.median(rs):>5.1f}x  ({min(rs):.1f}-{max(rs):.1f}x)   "
                  f"server peak RSS {peak_rss.get(n, 0) / 2**20:.0f} MiB")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    main()
