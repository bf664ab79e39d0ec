"""Weight formats side by side: fp32, bf16 and int8 weights on the same model, same run.

    python bench/quantize.py                       # the bundled SmolLM2-135M-Instruct
    python bench/quantize.py --run runs/demo --threads 2
    python bench/quantize.py --held-out /work/shared/data/tinyshakespeare.txt

For each format (``moorelm.quantize``): weight bytes, decode tokens/s at each batch size
(greedy, --new-tokens after a --prompt-len prompt, best of --repeats with the formats taking
turns, so load lands on all of them), and quality against fp32: greedy agreement (the share
of --prompts continuations of --agree-tokens tokens that are identical to fp32's, and the
mean length of the common prefix) and the mean |delta log-prob| per token on held-out text
(scored with ``moorelm.scoring``, --score-tokens tokens in context-sized windows).

Targets (issue 17): int8 decode >= 3x fp32's at batch 1, greedy agreement >= 90% of 64-token
continuations over 20 prompts. The CPU model is printed with the figures.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import time
from pathlib import Path

import torch

from moorelm.generate import generate_batch
from moorelm.quantize import WEIGHT_FORMATS, quantize, weight_bytes
from moorelm.scoring import score_sequences

PROMPTS = [
    "The capital of France is", "Write a short poem about the sea.", "def fibonacci(n):",
    "Explain why the sky is blue.", "Once upon a time, in a small village,",
    "The three primary colours are", "How do I boil an egg?", "Translate to German: good morning",
    "List three uses of copper.", "The theory of relativity says",
    "What is the largest planet in the solar system?", "A recipe for pancakes:",
    "In 1969, astronauts", "The best way to learn a language is",
    "Summarise the plot of Hamlet.", "import numpy as np\n", "Dear Sir or Madam,",
    "The weather today is", "Why do cats purr?", "Photosynthesis is the process",
]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load(args):
    import moorelm

    if args.run:
        return moorelm.load(args.run, device="cpu", batched=not args.one_row)
    from moorelm.interop.gguf import bundled_model_path, import_gguf

    run = Path(args.cache) / "smollm2"
    if not (run / "config.json").exists():
        t0 = time.perf_counter()
        import_gguf(bundled_model_path("smollm2"), run, force=True)
        print(f"imported the bundled SmolLM2 into {run} in {time.perf_counter() - t0:.1f} s")
    return moorelm.load(run, device="cpu", batched=not args.one_row)


@torch.no_grad()
def decode_rate(model, prompt: torch.Tensor, new: int, clock=time.perf_counter) -> float:
    """Greedy decode tokens/s after a prefill, timing the steps only. The KV cache holds
    prompt + new positions (``generate_tokens`` reserves the whole context window per row:
    12 GB at batch 32 on SmolLM2's 8k window)."""
    cache = model.new_cache(prompt.shape[0], prompt.shape[1] + new + 1)
    logits, _ = model(prompt, kv_cache=cache, last_only=True)
    tok = logits[:, -1].argmax(-1, keepdim=True)
    logits, _ = model(tok, kv_cache=cache)  # warm: binds the decode plan
    t0 = clock()
    for _ in range(new - 1):
        tok = logits[:, -1].argmax(-1, keepdim=True)
        logits, _ = model(tok, kv_cache=cache)
    return prompt.shape[0] * (new - 1) / max(clock() - t0, 1e-9)


@torch.no_grad()
def agreement(model, prompts: list[list[int]], ref: torch.Tensor) -> tuple[list[int], float]:
    """Per prompt, how many of fp32's greedy tokens ``ref`` (N, n) this model's own greedy
    continuation shares before the first difference, and over all positions the share where
    this model's next-token choice on fp32's text is fp32's (top-1 agreement, teacher
    forced). Exact and cheap: greedy decoding reproduces ``ref`` up to step k iff the model's
    argmax on ``prompt + ref[:k]`` is ``ref[k]`` at every earlier step, so one teacher-forced
    pass per prompt tells the first mismatch."""
    out, same, total = [], 0, 0
    for p, r in zip(prompts, ref):
        seq = torch.tensor([list(p) + r.tolist()[:-1]])
        logits, _ = model(seq)
        hit = logits[0, len(p) - 1:].float().argmax(-1) == r
        wrong = (~hit).nonzero()
        out.append(int(wrong[0]) if len(wrong) else len(r))
        same, total = same + int(hit.sum()), total + len(r)
    return out, same / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default=None, help="a run folder (default: the bundled SmolLM2)")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/moorelm-bench"))
    ap.add_argument("--formats", default=",".join(WEIGHT_FORMATS))
    ap.add_argument("--batch", default="1,8,32")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--agree-tokens", type=int, default=64)
    ap.add_argument("--held-out", default=None, help="text file scored for |delta log-prob| "
                    "(default: the bundled Shakespeare's last play)")
    ap.add_argument("--score-tokens", type=int, default=4096)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall time, or this process's CPU time (steadier on a shared machine "
                    "with --threads 1)")
    ap.add_argument("--skip-quality", action="store_true", help="speed only")
    ap.add_argument("--one-row", action="store_true",
                    help="the layouts of generate and chat (moorelm.load(..., batched=False): "
                    "row-major fp32, int8 in row blocks) instead of serving's")
    args = ap.parse_args()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    lm = load(args)
    formats = args.formats.split(",")
    models = {w: quantize(copy.deepcopy(lm.model), w, batched=not args.one_row) for w in formats}
    print(f"CPU: {cpu_name()}, {args.threads} threads, torch {torch.__version__}, "
          f"load {os.getloadavg()[0]:.1f}, clock {args.clock}, "
          f"layouts {'one row (generate, chat)' if args.one_row else 'batched (serve)'}")
    for w, m in models.items():
        print(f"{w:5s} weights {weight_bytes(m) / 2**20:8.1f} MiB")

    if not args.skip_quality:
        quality(args, lm, models)
    speed(args, lm, models, clock)


def quality(args, lm, models) -> None:
    """Greedy agreement and mean |delta log-prob| of each format against fp32 (no timing)."""
    tok = lm.tokenizer
    ref = models.get("fp32") or quantize(copy.deepcopy(lm.model), "fp32",
                                         batched=not args.one_row)
    if args.held_out:
        text = Path(args.held_out).read_text(encoding="utf-8")
    else:
        from moorelm.corpus import load_corpus

        text = "".join(load_corpus(None).documents[-1].chunks())
    ids = tok.encode(text)[: args.score_tokens]
    T = lm.config.seq_len if lm.config.seq_len < 1024 else 1024
    windows = [ids[i:i + T] for i in range(0, len(ids) - 1, T)]
    ref_scores = score_sequences(ref, windows)
    prompts = [lm.encode_prompt(p) for p in PROMPTS[: args.prompts]]
    # fp32's continuations in one batch (rows as alone up to the last bits of batched products)
    ref_out = torch.stack(list(generate_batch(ref, prompts, args.agree_tokens, temperature=0)), 1)
    for w, m in models.items():
        if w == "fp32":
            continue
        scores = score_sequences(m, windows)
        deltas = [abs(a - b) for s, r in zip(scores, ref_scores)
                  for a, b in zip(s.logprobs[1:], r.logprobs[1:])]
        prefix, top1 = agreement(m, prompts, ref_out)
        same = sum(k == args.agree_tokens for k in prefix)
        print(f"{w:5s} vs fp32: greedy identical {same}/{len(prompts)} "
              f"({args.agree_tokens} tokens; mean common prefix {sum(prefix) / len(prefix):.1f}; "
              f"next token = fp32's on fp32's text at {top1:.1%} of positions), "
              f"mean |delta log-prob| {sum(deltas) / len(deltas):.4f} over {len(deltas)} tokens")



def speed(args, lm, models, clock) -> None:
    """Decode tokens/s per format and batch size; formats take turns within each repeat."""
    g = torch.Generator().manual_seed(0)
    for b in (int(x) for x in args.batch.split(",")):
        prompt = torch.randint(0, lm.config.vocab_size, (b, args.prompt_len), generator=g)
        best = {w: 0.0 for w in models}
        for _ in range(args.repeats):
            for w, m in models.items():
                best[w] = max(best[w], decode_rate(m, prompt, args.new_tokens, clock))
        base = best.get("fp32")
        line = "  ".join(f"{w} {r:7.1f} tok/s" + (f" ({r / base:.2f}x)" if base else "")
                         for w, r in best.items())
        print(f"batch {b:3d} decode: {line}  (load {os.getloadavg()[0]:.1f})", flush=True)


if __name__ == "__main__":
    main()
