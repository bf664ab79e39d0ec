"""moorelm against llama.cpp on the same GGUF: batch-1 decode and 32 concurrent requests.

The anchor of issue 17. llama.cpp runs through ``llama-cpp-python`` built from its PyPI
source in a virtual environment of its own (never a moorelm dependency; ``bench/export.py``'s
``ensure_llama`` builds it when missing). Both sides decode greedily from the same prompts:

    batch 1        each prompt alone, new tokens per second after the prefill
    32 concurrent  32 requests at once: moorelm's serving engine batches them (continuous
                   batching, the path of ``moorelm serve`` without HTTP); llama-cpp-python's
                   ``Llama`` holds one sequence, so it serves them one after another

moorelm loads the GGUF itself (its blocks dequantised to fp32) and runs it in each
``--weights`` format asked for: at batch 1 as ``generate`` loads it (``batched=False``), for
the concurrent requests as ``serve`` does. ``--q8`` also converts the model to a Q8_0 GGUF with
``moorelm export`` and times llama.cpp on that.

    python bench/llamacpp_anchor.py [--gguf FILE] [--weights fp32,int8,int4] [--new-tokens 64]

llama.cpp is built for the machine (``-DGGML_NATIVE=ON``); set ``CMAKE_ARGS`` to build it
otherwise, e.g. where the native build crashes (seen on a VM whose CPU flags promise AMX:
``CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON"``
with a fresh ``--llama-venv`` and ``--wheel-dir``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export import check_child, ensure_llama, moorelm_decode  # noqa: E402

PROMPTS = ["ROMEO:\nBut, soft! what light", "The capital of France is",
           "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
           "Once upon a time, in a small village by the sea,"]

LLAMA_CHILD = r"""
import json, sys, time
from llama_cpp import Llama
path, threads, n_new, prompts, many = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4]), int(sys.argv[5])
llm = Llama(model_path=path, n_ctx=1024, n_threads=threads, n_threads_batch=threads, n_batch=512,
            verbose=False, seed=0)
def greedy(ids):
    llm.reset()
    llm.eval(ids)
    new, start = [], time.perf_counter()
    for _ in range(n_new):
        tok = int(llm.scores[llm.n_tokens - 1].argmax())
        new.append(tok)
        llm.eval([tok])
    return new, time.perf_counter() - start
greedy(prompts[0])  # warm-up
single = [greedy(ids) for ids in prompts]
start = time.perf_counter()
for i in range(many):
    greedy(prompts[i % len(prompts)])
wall = time.perf_counter() - start
print(json.dumps({"single": [{"new": n, "seconds": s} for n, s in single],
                  "many_seconds": wall}))
"""


def run_llama(py: Path, path: Path, threads: int, n_new: int, prompts: list[list[int]],
              many: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([str(py), "-c", LLAMA_CHILD, str(path), str(threads), str(n_new),
                        json.dumps(prompts), str(many)], capture_output=True, text=True, env=env)
    check_child(r)
    return json.loads(r.stdout.strip().splitlines()[-1])


def moorelm_single(model, prompts: list[list[int]], n_new: int) -> tuple[list[list[int]], float]:
    """Greedy tokens per prompt, and decode tokens/s over them (prefill excluded)."""
    for _ in range(2):  # the first pass warms up
        runs = [moorelm_decode(model, ids, n_new) for ids in prompts]
    return [out for out, _ in runs], len(prompts) * (n_new - 1) / sum(s for _, s in runs)


def moorelm_many(lm, prompts: list[list[int]], n_new: int, many: int, threads: int) -> float:
    """Aggregate tokens/s of ``many`` greedy requests submitted at once to the engine."""
    from moorelm.generate import SamplingParams
    from moorelm.inference.engine import Engine
    from moorelm.inference.sequence import Request

    engine = Engine(lm.model, lm.tokenizer, threads=threads, stop_ids=frozenset()).start()
    try:
        params = SamplingParams(max_new_tokens=n_new, temperature=0.0)
        warm = [engine.submit(Request((tuple(p),), params)) for p in prompts]
        for h in warm:
            list(h)
        start = time.perf_counter()
        handles = [engine.submit(Request((tuple(prompts[i % len(prompts)]),), params))
                   for i in range(many)]
        tokens = sum(len(batch) for h in handles for batch in h)
        return tokens / (time.perf_counter() - start)
    finally:
        engine.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", default=None, help="GGUF file (default: the bundled SmolLM2 Q4_1)")
    ap.add_argument("--weights", default="fp32,int8,int4", help="moorelm formats to time")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--concurrent", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--q8", action="store_true", help="also time llama.cpp on a Q8_0 export")
    ap.add_argument("--llama-venv", default="/work/cache/llama-venv")
    ap.add_argument("--wheel-dir", default="/work/cache/wheels")
    args = ap.parse_args()

    import moorelm
    from moorelm.interop.gguf import bundled_model_path

    gguf = Path(args.gguf) if args.gguf else bundled_model_path("smollm2")
    torch.set_num_threads(args.threads)
    py, why = ensure_llama(Path(args.llama_venv), Path(args.wheel_dir))
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), "?") if os.path.exists("/proc/cpuinfo") else "?"
    print(f"CPU: {cpu}, {args.threads} threads, torch {torch.__version__}, llama.cpp: {why}, "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"model: {gguf.name}; {args.new_tokens} new tokens, greedy; {len(PROMPTS)} prompts "
          f"alone, then {args.concurrent} requests at once")
    base = moorelm.load(gguf)
    prompts = [base.tokenizer.encode(p) for p in PROMPTS]
    files = [("Q4_1 (the file)", gguf)]
    tmp = tempfile.TemporaryDirectory()
    if args.q8:  # through the CLI, as a user would: import the GGUF, export it as Q8_0
        run, q8 = Path(tmp.name) / "run", Path(tmp.name) / "model-q8_0.gguf"
        for cmd in (["import", str(gguf), str(run)],
                    ["export", str(run), str(q8), "--format", "gguf", "--dtype", "q8_0"]):
            subprocess.run([sys.executable, "-m", "moorelm", *cmd], check=True,
                           stdout=subprocess.DEVNULL)
        files.append(("Q8_0 (moorelm export)", q8))
    rows = []
    llama_single = {}
    if py is not None:
        for name, path in files:
            out = run_llama(py, path, args.threads, args.new_tokens, prompts, args.concurrent)
            tok_s = len(prompts) * args.new_tokens / sum(r["seconds"] for r in out["single"])
            many = args.concurrent * args.new_tokens / out["many_seconds"]
            llama_single[name] = [r["new"] for r in out["single"]]
            rows.append((f"llama.cpp {name}", tok_s, many))
            print(f"  {rows[-1][0]:<32} batch 1 {tok_s:7.1f} tok/s   {args.concurrent} "
                  f"concurrent {many:7.1f} tok/s (one at a time)", flush=True)
    reference = None
    for fmt in args.weights.split(","):
        # batch 1 as the generate and chat commands load a model (one sequence at a time),
        # the concurrent requests as serve does (packed for batches)
        single = moorelm.load(gguf, weights=fmt, batched=False)
        outs, tok_s = moorelm_single(single.model, prompts, args.new_tokens)
        del single
        lm = moorelm.load(gguf, weights=fmt)
        if fmt == "fp32":
            reference = outs
        many = moorelm_many(lm, prompts, args.new_tokens, args.concurrent, args.threads)
        same = ""
        if reference is not None:
            same = f"   greedy = moorelm fp32 on {sum(a == b for a, b in zip(outs, reference))}/{len(outs)}"
        first = llama_single.get(files[0][0])
        if first is not None:
            same += f", = llama.cpp Q4_1 on {sum(a[:len(b)] == b[:len(a)] for a, b in zip(outs, first))}/{len(outs)}"
        rows.append((f"moorelm {fmt}", tok_s, many))
        print(f"  {rows[-1][0]:<32} batch 1 {tok_s:7.1f} tok/s   {args.concurrent} "
              f"concurrent {many:7.1f} tok/s (batched){same}", flush=True)
        del lm
    if py is not None:
        ref_1, ref_n = rows[0][1], rows[0][2]
        print(f"\nmoorelm / llama.cpp ({files[0][0]}):")
        for name, one, many in rows[len(files):]:
            print(f"  {name:<16} batch 1 {one / ref_1:5.2f}x   {args.concurrent} concurrent "
                  f"{many / ref_n:5.2f}x")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
