"""Side by side: the gpt2-baseline recipe against moorelm's default recipe, equal wall-clock.

    python bench/recipe.py                                   # bundled Shakespeare, characters
    python bench/recipe.py --corpus /work/shared/data/tinyshakespeare.txt --target 1.89
    python bench/recipe.py --tokenizer bpe --vocab-size 1024
    python bench/recipe.py --corpus /tmp/stdlib_py --budget 180

Both recipes train the same model size (``--preset``, default ``nano``: nanoGPT's CPU size)
with the same batch (``--batch``, default 12 sequences) on the same prepared dataset for the
same budget of training seconds (evaluation excluded).
Each runs in its own process; the two take turns in slices of about ``--slice`` seconds, so a
burst of load from other users of the machine lands on both rather than on one. While one
trains the other waits, so they never compete for the cores.

Both are evaluated on the same val windows (``--eval-iters`` x ``--eval-batch`` windows of
the context length), about ``--points`` times per run. Printed: each val-loss-versus-time
curve, tokens/s of each, and the headline, the time the default recipe takes to reach the
baseline's final val loss divided by the baseline's time.

The default recipe's schedule is set for the full budget, so its curve before the end has not
decayed yet: a ratio read off it is a conservative (high) estimate. So the headline is
measured directly: the default recipe trains again with a budget of a fraction of the
baseline's time (``--budgeted``, default 0.33, the target), alone, and the smallest fraction
whose run ends at or below the baseline's final val loss is the ratio. When none does, the
headline falls back to the curve.
"""

from __future__ import annotations

import os

# Spinning OpenMP workers collapse when other processes share the cores (measured: a 2-thread
# step became 30x slower under load); sleeping workers degrade gracefully. Set before torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import multiprocessing as mp  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

BASELINE, DEFAULT = "gpt2-baseline", "moorelm"


def load_average() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "uptime unavailable"


def _configs(recipe: str, args, vocab_size: int, eval_interval: int, budget: float | None,
             max_steps: int | None = None):
    from moorelm.config import build_configs, with_vocab

    # train() evaluates only on logging steps, so log exactly at the evaluation interval
    train_over = dict(max_time=budget, max_steps=max_steps, threads=args.threads,
                      eval_iters=args.eval_iters, eval_batch_size=args.eval_batch,
                      eval_interval=eval_interval, log_interval=eval_interval or 10,
                      ckpt_interval=0, device="cpu", seed=args.seed)
    train_over["batch_size"] = args.batch
    model_cfg, cfg = build_configs(preset=args.preset, recipe=recipe,
                                   train_overrides=train_over)
    return with_vocab(model_cfg, vocab_size), cfg


def _worker(me: int, recipe: str, args, data_dir: str, out_dir: str, eval_interval: int,
            turn, done, cond, results) -> None:
    """Train one recipe, handing the cores to the other process every ``args.slice`` s."""
    import torch

    from moorelm.data import TokenData
    from moorelm.training.loop import train

    torch.set_num_threads(args.threads)
    data = TokenData(data_dir)
    model_cfg, cfg = _configs(recipe, args, data.vocab_size, eval_interval, args.budget)
    other = 1 - me
    slice_start = [0.0]

    def wait_for_turn() -> None:
        with cond:
            cond.wait_for(lambda: turn.value == me or done[other])

    def hand_over(row: dict) -> None:
        elapsed = float(row["elapsed"])
        if elapsed - slice_start[0] < args.slice or done[other]:
            return
        with cond:
            turn.value = other
            cond.notify_all()
        wait_for_turn()
        slice_start[0] = elapsed

    wait_for_turn()
    try:
        result = train(model_cfg, cfg, data, out_dir, progress=False, on_eval=hand_over)
        curve = [(float(r["elapsed"]), int(r["step"]), int(r["tokens"]), float(r["val_loss"]))
                 for r in result.history if r["val_loss"]]
        results[me] = dict(recipe=recipe, curve=curve, steps=result.step, tokens=result.tokens,
                           elapsed=result.elapsed, tokens_per_s=result.tokens_per_s,
                           val_loss=result.val_loss, params=result.params["total"])
    finally:
        with cond:
            done[me] = True
            turn.value = other
            cond.notify_all()


def _probe_step_time(recipe: str, args, data_dir: str, steps: int = 6) -> float:
    """Seconds per training step, from a few steps (sets the evaluation interval)."""
    from moorelm.data import TokenData
    from moorelm.training.loop import train

    data = TokenData(data_dir)
    model_cfg, cfg = _configs(recipe, args, data.vocab_size, 0, None, max_steps=steps)
    with tempfile.TemporaryDirectory() as tmp:
        r = train(model_cfg, cfg, data, Path(tmp) / "probe", progress=False)
    return r.elapsed / r.step


def _budgeted_run(args, data_dir: str, budget: float) -> dict:
    """The default recipe alone, its schedule set for ``budget`` training seconds."""
    from moorelm.data import TokenData
    from moorelm.training.loop import train

    data = TokenData(data_dir)
    model_cfg, cfg = _configs(DEFAULT, args, data.vocab_size, 0, budget)
    with tempfile.TemporaryDirectory() as tmp:
        r = train(model_cfg, cfg, data, Path(tmp) / "budgeted", progress=False)
    return dict(budget=budget, steps=r.step, elapsed=r.elapsed, val_loss=r.val_loss)


def time_to_reach(curve: list[tuple], loss: float) -> float | None:
    """First time a (time, ..., val_loss) curve reaches ``loss``, interpolating linearly."""
    prev = None
    for point in curve:
        t, v = point[0], point[-1]
        if v <= loss:
            if prev is None or prev[-1] == v:
                return t
            t0, v0 = prev[0], prev[-1]
            return t0 + (t - t0) * (v0 - loss) / (v0 - v)
        prev = point
    return None


def loss_at(curve: list[tuple], t: float) -> float:
    """Val loss on a curve at time t (linear between points, held past the ends)."""
    if t <= curve[0][0]:
        return curve[0][-1]
    for a, b in zip(curve, curve[1:]):
        if a[0] <= t <= b[0]:
            return a[-1] + (b[-1] - a[-1]) * (t - a[0]) / max(b[0] - a[0], 1e-9)
    return curve[-1][-1]


def plot(curves: dict[str, list[tuple]], path: Path, title: str,
         budgeted: list[dict] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, curve in curves.items():
        ax.plot([p[0] for p in curve], [p[-1] for p in curve], marker="o", ms=3, label=name)
    if budgeted:
        ax.scatter([b["elapsed"] for b in budgeted], [b["val_loss"] for b in budgeted], marker="*",
                   s=90, color="C1", zorder=3, label=f"{DEFAULT}, budgeted for that time")
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("val loss (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", default=None, help="corpus path (default: bundled Shakespeare)")
    p.add_argument("--tokenizer", choices=("char", "bpe"), default="char")
    p.add_argument("--vocab-size", type=int, default=1024, help="BPE vocabulary (default 1024)")
    p.add_argument("--ext", default=None, help="file extensions for a folder corpus, e.g. .py")
    p.add_argument("--budget", type=float, default=180.0, help="training seconds per recipe")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--preset", default="nano", help="model size for both recipes (default nano)")
    p.add_argument("--batch", type=int, default=12,
                   help="sequences per step for both (default 12, nanoGPT's CPU setting)")
    p.add_argument("--slice", type=float, default=15.0, help="seconds per turn (default 15)")
    p.add_argument("--points", type=int, default=24, help="evaluations per run (default 24)")
    p.add_argument("--eval-iters", type=int, default=20)
    p.add_argument("--eval-batch", type=int, default=32)
    p.add_argument("--target", type=float, default=None,
                   help="also report each recipe's time to reach this val loss")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--plot", default=None, help="write the two curves to this PNG")
    p.add_argument("--json", default=None, help="write curves and figures to this JSON file")
    p.add_argument("--keep", default=None, help="keep the two run folders under this folder")
    p.add_argument("--budgeted", default="0.33",
                   help="comma-separated fractions of the baseline's time: the default recipe "
                   "reruns with each as its budget (default 0.33; '' to skip)")
    args = p.parse_args(argv)

    import torch

    from moorelm.training.pretrain import prepare_data

    torch.set_num_threads(args.threads)
    print(f"load before: {load_average()}")
    exts = tuple(e if e.startswith(".") else "." + e for e in args.ext.split(",")) \
        if args.ext else None
    data = prepare_data(args.corpus, args.tokenizer, args.vocab_size, extensions=exts,
                        progress=False)
    print(f"data: {data.manifest['corpus']}, {data.manifest['tokenizer']} tokenizer "
          f"({data.vocab_size} tokens), train {data.tokens('train'):,} / val "
          f"{data.tokens('val'):,} tokens, split by {data.manifest['split']}")

    recipes = [BASELINE, DEFAULT]
    intervals = {}
    for r in recipes:
        dt = _probe_step_time(r, args, str(data.folder))
        intervals[r] = max(5, round(args.budget / args.points / dt))
        print(f"{r}: ~{dt * 1000:.0f} ms/step in a probe; evaluating every {intervals[r]} steps")

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="moorelm-recipe-"))
    ctx = mp.get_context("spawn")
    turn, cond = ctx.Value("i", 0), ctx.Condition()
    done = ctx.Array("b", [False, False])
    manager = ctx.Manager()
    results = manager.dict()
    t0 = time.time()
    procs = []
    for me, r in enumerate(recipes):
        out = root / r
        shutil.rmtree(out, ignore_errors=True)
        procs.append(ctx.Process(target=_worker, args=(me, r, args, str(data.folder), str(out),
                                                       intervals[r], turn, done, cond, results)))
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    wall = time.time() - t0
    if any(proc.exitcode for proc in procs) or len(results) < 2:
        print("a training process failed; see its error above", file=sys.stderr)
        return 1
    res = {results[i]["recipe"]: dict(results[i]) for i in range(2)}
    manager.shutdown()
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)

    base, dflt = res[BASELINE], res[DEFAULT]
    print(f"\nload after: {load_average()}   (wall {wall:.0f} s for both runs with evaluation)")
    print(f"model: preset {args.preset}, batch {args.batch}; eval: {args.eval_iters} x "
          f"{args.eval_batch} fixed val windows of the context length; {args.threads} threads")
    for name, r in res.items():
        print(f"\n{name}: {r['steps']} steps, {r['tokens']:,} tokens in {r['elapsed']:.1f} s "
              f"-> {r['tokens_per_s']:,.0f} tokens/s, {r['params']:,} params, "
              f"final val loss {r['val_loss']:.4f}")
        print("   time(s)   step    tokens  val_loss")
        for t, step, tok, v in r["curve"]:
            print(f"  {t:8.1f} {step:6d} {tok:9,d}  {v:.4f}")

    target = base["val_loss"]
    t_reach = time_to_reach(dflt["curve"], target)
    curve_ratio = None if t_reach is None else t_reach / base["elapsed"]
    at_equal = loss_at(dflt["curve"], base["elapsed"])
    print(f"\nbaseline final val loss {target:.4f} at {base['elapsed']:.1f} s")
    if t_reach is None:
        print(f"default recipe's {args.budget:.0f} s curve never reached it")
    else:
        print(f"default recipe's curve reaches it at {t_reach:.1f} s "
              f"(ratio read off the curve {curve_ratio:.3f}; its schedule decays only at the end)")
    budgeted = []
    for frac in sorted(float(f) for f in args.budgeted.split(",") if f.strip()):
        b = _budgeted_run(args, str(data.folder), frac * base["elapsed"])
        b["fraction"], b["reached"] = frac, b["val_loss"] <= target
        budgeted.append(b)
        print(f"default recipe budgeted for {frac:.2f} x the baseline's time ({b['elapsed']:.1f} s, "
              f"{b['steps']} steps): final val loss {b['val_loss']:.4f} -> "
              f"{'reaches' if b['reached'] else 'does not reach'} {target:.4f}", flush=True)
    reached = [b["fraction"] for b in budgeted if b["reached"]]
    if reached and (curve_ratio is None or min(reached) < curve_ratio):
        ratio, how = min(reached), "a run budgeted for that fraction reaches the baseline's loss"
    else:
        ratio, how = curve_ratio, "read off the full-budget curve"
    print(f"HEADLINE time-to-baseline-loss ratio: {'n/a (> 1)' if ratio is None else f'{ratio:.3f}'}"
          f"  ({how}; target <= 0.33)")
    print(f"equal-time val loss: baseline {target:.4f}, default {at_equal:.4f}, "
          f"gap {target - at_equal:.3f} nats  (target >= 0.15)")
    print(f"load after the budgeted runs: {load_average()}")
    reach = {}
    if args.target is not None:
        for name, r in res.items():
            reach[name] = time_to_reach(r["curve"], args.target)
            s = "not reached" if reach[name] is None else f"{reach[name]:.1f} s"
            print(f"time to val loss {args.target}: {name} {s}")
    if args.plot:
        title = (f"{data.manifest['corpus']} ({data.manifest['tokenizer']}), preset "
                 f"{args.preset}, {args.threads} threads: ratio "
                 f"{'n/a' if ratio is None else f'{ratio:.2f}'}")
        plot({n: r["curve"] for n, r in res.items()}, Path(args.plot), title, budgeted)
        print(f"plot: {args.plot}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(
            args=vars(args), results=res, ratio=ratio, curve_ratio=curve_ratio,
            budgeted=budgeted, time_to_baseline_loss=t_reach,
            equal_time_gap=target - at_equal, time_to_target=reach, wall=wall,
            load=load_average()), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
