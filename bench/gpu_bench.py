"""Training and decoding speed of a preset on one device: tokens/s, MFU, peak memory.

    python bench/gpu_bench.py --preset gpt2 --device cuda --batch-size 16 --steps 30
    python bench/gpu_bench.py --preset tiny --device cpu --steps 3      # smoke test on CPU

Training steps use the same pieces as ``moorelm train`` (GPT, build_optimizer, autocast per
device, gradient clipping) on random tokens, timed after warm-up steps, once eager and once
with torch.compile. Decoding prefills a prompt and then times one-token steps through the KV
cache at batch 1 and 64. MFU = model FLOPs/token (6N + 12 L T C) x tokens/s / device peak.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from moorelm.config import ModelConfig, TrainConfig, get_preset, get_recipe
from moorelm.device import (
    autocast,
    choose_precision,
    device_name,
    mfu,
    peak_flops,
    resolve_device,
    setup_device,
)
from moorelm.model import GPT
from moorelm.optim import build_optimizer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_train(cfg: ModelConfig, tcfg: TrainConfig, device, batch: int, steps: int,
                warmup: int, compile_: bool) -> dict:
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    opt = build_optimizer(model, tcfg, device.type)
    run = torch.compile(model) if compile_ else model
    precision = choose_precision(device, tcfg.dtype)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), device=device)
    y = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        with autocast(device, precision):
            _, loss = run(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    tok_s = batch * cfg.seq_len * len(times) / sum(times)
    peak = peak_flops(device)
    out = {"compile": compile_, "precision": precision.name, "tokens_per_s": round(tok_s, 1),
           "step_ms": round(1000 * sum(times) / len(times), 2), "loss": round(float(loss.detach()), 4)}
    m = mfu(model.flops_per_token(), tok_s, peak)
    out["mfu"] = None if m is None else round(m, 4)
    if device.type == "cuda":
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return out


@torch.no_grad()
def bench_decode(cfg: ModelConfig, device, batch: int, prompt: int, new: int) -> dict:
    torch.manual_seed(0)
    model = GPT(cfg).to(device).eval()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model.to(dtype)
    idx = torch.randint(0, cfg.vocab_size, (batch, prompt), device=device)
    cache = model.new_cache(batch)
    sync(device)
    t0 = time.perf_counter()
    logits, _ = model(idx, kv_cache=cache, last_only=True)
    sync(device)
    prefill = time.perf_counter() - t0
    nxt = logits[:, -1].argmax(-1, keepdim=True)
    t0 = time.perf_counter()
    for _ in range(new):
        logits, _ = model(nxt, kv_cache=cache, last_only=True)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
    sync(device)
    decode = time.perf_counter() - t0
    return {"batch": batch, "prefill_tokens_per_s": round(batch * prompt / prefill, 1),
            "decode_tokens_per_s": round(batch * new / decode, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--recipe", default="gpt2-baseline")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--vocab-size", type=int, default=50304)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile run")
    ap.add_argument("--decode-new", type=int, default=128)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    device = resolve_device(args.device)
    setup_device(device)
    r = get_recipe(args.recipe)
    cfg = ModelConfig(**{**r.model, **get_preset(args.preset), "vocab_size": args.vocab_size})
    tcfg = TrainConfig(**{**r.train, "dtype": args.dtype})
    results = {"device": device_name(device), "preset": args.preset, "recipe": args.recipe,
               "params": GPT(cfg).param_counts()["total"] if device.type != "meta" else None,
               "train": [], "decode": []}
    print(f"{results['device']}: {args.preset} ({results['params']:,} params), "
          f"batch {args.batch_size} x {cfg.seq_len}")
    for compile_ in ([False] if args.no_compile else [False, True]):
        res = bench_train(cfg, tcfg, device, args.batch_size, args.steps, args.warmup, compile_)
        results["train"].append(res)
        print(f"train compile={compile_}: {json.dumps(res)}")
    for batch in (1, 64):
        res = bench_decode(cfg, device, batch, prompt=min(128, cfg.seq_len // 2),
                           new=min(args.decode_new, cfg.seq_len // 2 - 1))
        results["decode"].append(res)
        print(f"decode: {json.dumps(res)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
