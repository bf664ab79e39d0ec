"""Training throughput: moorelm's loop against a plain PyTorch loop over the same model.

    python bench/train_speed.py                        # both parts, 2 threads
    python bench/train_speed.py --skip-preset          # only the loop comparison
    python bench/train_speed.py --preset-steps 30 --rounds 5

Part 1 trains the ``shakespeare-char`` preset (default recipe) on the bundled corpus for a
fixed number of steps through ``moorelm.training.loop.train`` and prints tokens/s, peak memory and
the val loss.

Part 2 is the comparison of issue 3, section 4: at the baseline's own architecture
(``gpt2-baseline`` recipe, ``--preset nano`` by default, batch 12: nanoGPT's CPU setting),
``train()`` against the loop a PyTorch user writes by hand (nanoGPT's: random windows with
``torch.randint``, forward, backward, clip, ``torch.optim.AdamW`` with its default
implementation, zero_grad). Both time the same region, a whole step including fetching the
batch; logging and evaluation are outside it in both. The two alternate for ``--rounds``
rounds so load from other users of the machine hits both; medians are printed.
"""

from __future__ import annotations

import os

# sleeping (not spinning) OpenMP workers: see bench/recipe.py. Must precede importing torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402


def load_average() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "uptime unavailable"


def plain_loop(model_cfg, cfg, data, steps: int) -> float:
    """Tokens/s of a hand-written nanoGPT-style loop over moorelm's GPT (same init, same
    optimizer settings, same schedule formula), timing whole steps."""
    from moorelm.model import GPT

    torch.manual_seed(cfg.seed)
    model = GPT(model_cfg)
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=cfg.weight_decay),
                             dict(params=no_decay, weight_decay=0.0)],
                            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    shards = data.manifest["splits"]["train"]["shards"]
    train_tokens = np.concatenate([np.fromfile(data.folder / s["file"], dtype=data.dtype)
                                   for s in shards])
    B, T = cfg.batch_size, model_cfg.seq_len

    def get_batch():
        ix = torch.randint(len(train_tokens) - T - 1, (B,))
        x = torch.stack([torch.from_numpy(train_tokens[i:i + T].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(train_tokens[i + 1:i + 1 + T].astype(np.int64))
                         for i in ix])
        return x, y

    def lr_at(it: int) -> float:  # nanoGPT's get_lr
        if it < cfg.warmup_steps:
            return cfg.lr * (it + 1) / (cfg.warmup_steps + 1)
        ratio = (it - cfg.warmup_steps) / max(1, steps - cfg.warmup_steps)
        return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)

    t0 = time.perf_counter()
    for it in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(it)
        x, y = get_batch()
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())  # the loop reads its loss every step, as moorelm's does
    return steps * B * T / (time.perf_counter() - t0)


def moorelm_loop(model_cfg, cfg, data, steps: int) -> float:
    from moorelm.training.loop import train

    with tempfile.TemporaryDirectory() as tmp:
        r = train(model_cfg, cfg.__class__(**{**cfg.to_dict(), "max_steps": steps}), data,
                  Path(tmp) / "run", progress=False)
    return r.tokens_per_s


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--preset-steps", type=int, default=20,
                   help="steps of the shakespeare-char run (default 20)")
    p.add_argument("--preset-batch", type=int, default=8,
                   help="sequences per step of the shakespeare-char run (default 8)")
    p.add_argument("--skip-preset", action="store_true", help="skip part 1")
    p.add_argument("--preset", default="nano", help="model size of the loop comparison")
    p.add_argument("--batch", type=int, default=12, help="loop comparison batch (default 12)")
    p.add_argument("--steps", type=int, default=100, help="steps per round (default 100)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--corpus", default=None, help="corpus (default: bundled Shakespeare)")
    args = p.parse_args(argv)

    from moorelm.config import build_configs, with_vocab
    from moorelm.device import peak_memory_bytes
    from moorelm.training.loop import train
    from moorelm.training.pretrain import prepare_data

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads; load: {load_average()}")
    data = prepare_data(args.corpus, "char", progress=False)

    if not args.skip_preset:
        model_cfg, cfg = build_configs(
            preset="shakespeare-char",
            train_overrides=dict(max_steps=args.preset_steps, batch_size=args.preset_batch,
                                 eval_interval=0, eval_iters=10, ckpt_interval=0,
                                 threads=args.threads, device="cpu"))
        model_cfg = with_vocab(model_cfg, data.vocab_size)
        with tempfile.TemporaryDirectory() as tmp:
            r = train(model_cfg, cfg, data, Path(tmp) / "run", progress=False)
        mem = peak_memory_bytes(torch.device("cpu"))
        print(f"\nshakespeare-char (default recipe, {r.params['total']:,} params), batch "
              f"{args.preset_batch} x {model_cfg.seq_len}: {r.step} steps in {r.elapsed:.1f} s, "
              f"{r.tokens_per_s:,.0f} tokens/s, peak memory (process RSS) "
              f"{(mem or 0) / 2**20:,.0f} MiB, val loss {r.val_loss:.4f}")

    model_cfg, cfg = build_configs(
        preset=args.preset, recipe="gpt2-baseline",
        train_overrides=dict(batch_size=args.batch, max_steps=args.steps, eval_interval=0,
                             eval_iters=1, log_interval=args.steps, ckpt_interval=0,
                             threads=args.threads, device="cpu"))
    model_cfg = with_vocab(model_cfg, data.vocab_size)
    print(f"\nloop comparison: gpt2-baseline at preset {args.preset}, batch {args.batch} x "
          f"{model_cfg.seq_len}, {args.steps} steps x {args.rounds} rounds, alternating")
    plain_loop(model_cfg, cfg, data, 5)  # warm up allocator and kernels
    speeds: dict[str, list[float]] = {"plain PyTorch loop": [], "moorelm train()": []}
    for i in range(args.rounds):
        order = list(speeds) if i % 2 == 0 else list(reversed(speeds))
        for name in order:
            fn = plain_loop if name.startswith("plain") else moorelm_loop
            speeds[name].append(fn(model_cfg, cfg, data, args.steps))
    for name, v in speeds.items():
        print(f"  {name:20s} median {statistics.median(v):8,.0f} tokens/s   rounds: "
              + ", ".join(f"{s:,.0f}" for s in v))
    ratio = statistics.median(speeds["moorelm train()"]) / statistics.median(
        speeds["plain PyTorch loop"])
    print(f"  moorelm / plain: {ratio:.2f}x   (load after: {load_average()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
