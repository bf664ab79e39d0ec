"""Decode and prefill speed: moorelm versus Hugging Face transformers on the same weights.

Builds a GPT (a run folder's newest checkpoint, or a fresh GPT-2-style model of --preset size
with random weights: speed does not depend on them), converts it with
``moorelm.interop.hf.to_transformers`` into the equivalent transformers model, checks both
give the same logits and the same greedy tokens, then times, at each batch size:

    prefill tokens/s   one forward pass over a (B, --prompt-len) prompt, filling the KV cache
    decode tokens/s    (B x new tokens) / time, where time = generating --new-tokens minus
                       generating 1 (so prefill and setup cancel out); greedy, no early stop

moorelm's model is prepared as ``moorelm.load`` prepares it (``quantize(model, "fp32")``:
projections packed for oneDNN on a CPU, a small model keeping a row-major twin for one and two
rows; ``--row-major``: as the ``generate`` and ``chat`` commands load it) and decodes with ``generate.generate_tokens``; transformers with ``model.generate``
(do_sample=False, its own KV cache). Each figure is the best of --repeats runs, the two
libraries taking turns. Usage:

    python bench/generate.py                          # shakespeare-char size, batch 1 and 16
    python bench/generate.py --run runs/demo --batch 1,16 --threads 1

Targets: decode >= 2x transformers at batch 1 and >= 1x at batch 16 (2 CPU cores).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from moorelm.config import build_configs, with_vocab
from moorelm.errors import MoorelmError
from moorelm.generate import generate_tokens
from moorelm.model import GPT


def build(run: str | None, preset: str, vocab: int) -> GPT:
    if run:
        from moorelm.run import RunFolder

        return RunFolder(run).load(device="cpu").model
    cfg, _ = build_configs(preset=preset, recipe="gpt2-baseline")
    torch.manual_seed(0)
    return GPT(with_vocab(cfg, vocab)).eval()


CLOCK = time.perf_counter


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        t0 = CLOCK()
        fn()
        times.append(CLOCK() - t0)
    return min(times)


@torch.no_grad()
def moorelm_decode(model: GPT, idx: torch.Tensor, n: int) -> torch.Tensor:
    return torch.stack(list(generate_tokens(model, idx, n, temperature=0)), dim=1)  # (B, n)


@torch.no_grad()
def hf_decode(hf, idx: torch.Tensor, n: int) -> torch.Tensor:
    out = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n,
                      min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[:, idx.shape[1]:]


@torch.no_grad()
def moorelm_prefill(model: GPT, idx: torch.Tensor) -> None:
    # a cache of the prompt's length, as transformers' grows to: a full-window cache is
    # 377 MB a row on SmolLM2 (8k positions), and zeroing it was timed as prefill
    cache = model.new_cache(idx.shape[0], idx.shape[1])
    model(idx, kv_cache=cache, last_only=True)


@torch.no_grad()
def hf_prefill(hf, idx: torch.Tensor) -> None:
    hf(idx, use_cache=True, logits_to_keep=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default=None, help="run folder (default: random weights)")
    ap.add_argument("--preset", default="shakespeare-char", help="size without --run")
    ap.add_argument("--vocab", type=int, default=65, help="vocabulary without --run (default 65)")
    ap.add_argument("--batch", default="1,16", help="batch sizes (default 1,16)")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for both libraries (default: torch's own, one per core; "
                    "on a busy shared machine --threads 1 varies less)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall time (default) or this process's CPU time: on a machine shared "
                    "by busy processes, CPU time of a --threads 1 run counts only the work done, "
                    "not the time spent waiting for a core")
    ap.add_argument("--row-major", action="store_true",
                    help="keep moorelm's projections row-major instead of packed for oneDNN "
                    "(as moorelm.load(..., batched=False) does for the generate and chat "
                    "commands: one sequence at a time)")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()

    from moorelm.interop.hf import to_transformers

    model = build(args.run, args.preset, args.vocab)
    cfg = model.config
    if args.prompt_len + args.new_tokens > cfg.seq_len:
        raise SystemExit(f"--prompt-len + --new-tokens must fit the context window {cfg.seq_len}")
    try:
        hf = to_transformers(model)
    except MoorelmError as e:
        raise SystemExit(f"this model has no transformers twin ({e}); use the default "
                         "random GPT-2-style model or a gpt2-baseline run") from None
    import transformers

    from moorelm.quantize import quantize

    quantize(model, "fp32", batched=not args.row_major)  # what moorelm.load does for inference
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(1, cfg.vocab_size, (2, args.prompt_len), generator=g)
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(idx).logits
    diff = float((ours - theirs).abs().max())
    same = torch.equal(moorelm_decode(model, idx, 16), hf_decode(hf, idx, 16))
    params = model.param_counts()["total"]
    print(f"model: {args.run or args.preset + ' (GPT-2 style, random weights)'}  "
          f"{params / 1e6:.1f}M params  {cfg.n_layer} layers  width {cfg.n_embd}  "
          f"context {cfg.seq_len}  vocab {cfg.vocab_size}")
    print(f"torch {torch.__version__}  transformers {transformers.__version__}  "
          f"threads {args.threads}  clock {args.clock}  load average {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPU cores)")
    print(f"same logits: max |diff| {diff:.1e};  same greedy tokens: {same}")
    print(f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, best of {args.repeats}")
    print(f"{'batch':>5} {'':>9} {'moorelm':>10} {'transformers':>13} {'ratio':>6}")
    for b in [int(x) for x in args.batch.split(",")]:
        x = torch.randint(1, cfg.vocab_size, (b, args.prompt_len), generator=g)
        sides = (("moorelm", moorelm_decode, moorelm_prefill, model),
                 ("transformers", hf_decode, hf_prefill, hf))
        times = {name: {"pre": [], "n": [], "1": []} for name, *_ in sides}
        for _name, decode, _, m in sides:
            decode(m, x, 2)  # warm up
        # repeats alternate between the two, so a burst of load on a shared machine lands on
        # both; each figure is the best of its repeats
        for _ in range(args.repeats):
            for name, decode, prefill, m in sides:
                t = times[name]
                t["pre"].append(best_of(1, lambda m=m, f=prefill, x=x: f(m, x)))
                t["n"].append(best_of(1, lambda m=m, f=decode, x=x: f(m, x, args.new_tokens)))
                t["1"].append(best_of(1, lambda m=m, f=decode, x=x: f(m, x, 1)))
        rows = {name: (b * args.prompt_len / min(t["pre"]),
                       b * (args.new_tokens - 1) / max(min(t["n"]) - min(t["1"]), 1e-9))
                for name, t in times.items()}
        for k, label in ((1, "decode"), (0, "prefill")):
            ours_v, theirs_v = rows["moorelm"][k], rows["transformers"][k]
            print(f"{b:>5} {label:>9} {ours_v:>8.0f}/s {theirs_v:>11.0f}/s {ours_v / theirs_v:>5.2f}x",
                  flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
