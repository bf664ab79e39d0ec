"""Scaling-lab verbs: ``scale`` (train a ladder, fit, verify, report) and ``trend`` (history).

    moorelm scale --budget 30m --out DIR [--corpus C] [--tokenizer char|bpe] [--compare-recipes]
    moorelm scale --budget-flops 1e14 --out DIR
    moorelm scale --report-only DIR
    moorelm trend [--out DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moorelm.cli.core import _exts, _plays, add_corpus_flags, add_tokenizer_flags
from moorelm.config import RECIPES, check_threads
from moorelm.errors import MoorelmError, from_os_error


def cmd_scale(args) -> int:
    from moorelm.scaling import ladder as LD
    from moorelm.scaling import ladder_plan as LP

    if args.report_only:
        if args.budget or args.budget_flops or args.out:
            raise MoorelmError("--report-only DIR rebuilds a report; drop --budget/--budget-flops/--out")
        path = LD.write_report(args.report_only, n_bootstrap=args.bootstrap, trends=args.trends)
        print(f"report: {path}")
        return 0
    if not args.out:
        raise MoorelmError("scale needs --out DIR (or --report-only DIR)")
    out = Path(args.out)
    resuming = (out / LD.LADDER_JSON).exists()
    if not resuming and (args.budget is None) == (args.budget_flops is None):
        raise MoorelmError("give one budget: --budget 30m (wall clock) or --budget-flops 1e14")
    seconds = LP.parse_duration(args.budget) if args.budget is not None else None
    if args.budget_flops is not None and not (0 < args.budget_flops <= LP.MAX_FLOPS):  # NaN too
        raise MoorelmError(f"--budget-flops must be a positive number of at most "
                           f"{LP.MAX_FLOPS:.0e}, got {args.budget_flops}")
    if args.bootstrap < 0:
        raise MoorelmError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    check_threads(args.threads, "--threads")  # before the corpus is prepared and --out made
    spec = LP.LadderSpec(
        shapes=LP.parse_shapes(args.shapes) if args.shapes else LP.DEFAULT_SHAPES,
        head_dim=args.head_dim, seq_len=args.seq_len, batch_size=args.batch_size,
        levels=args.levels, sizes_per_level=args.sizes_per_level, level_ratio=args.level_ratio,
        min_steps=args.min_steps, eval_iters=args.eval_iters, recipe=args.recipe,
        compare=args.compare_recipes, baseline=args.baseline_recipe, verify=args.verify,
        threads=args.threads, device=args.device, seed=args.seed)
    from moorelm.training.pretrain import prepare_data

    data = prepare_data(args.corpus, args.tokenizer, args.vocab_size, args.val_frac, args.data,
                        args.text_field, _exts(args), _plays(args), progress=not args.quiet)
    LD.scale(out, data, spec, budget_s=seconds, budget_flops=args.budget_flops,
             n_bootstrap=args.bootstrap, trends=args.trends, progress=not args.quiet)
    return 0


def cmd_trend(args) -> int:
    from moorelm.scaling import trend as T

    if args.top_k < 1:
        raise MoorelmError(f"--top-k must be >= 1, got {args.top_k}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():  # no --force: a user's file is never replaced
        raise MoorelmError(f"--out {out} is a file, not a folder; trend writes trends.png into "
                           "a folder: choose another one")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # e.g. --out under a file
        raise from_os_error(e, f"create the folder {out}") from None
    rows = T.trend_table(top_k=args.top_k)
    print(T.format_trend_table(rows))
    try:
        path = T.plot_trends(out / "trends.png", top_k=args.top_k)
    except OSError as e:
        raise from_os_error(e, f"write {out / 'trends.png'}") from None
    print(f"\nplot: {path}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "scale", help="train a ladder of models under a budget, fit scaling laws, verify, report",
        description="Plan IsoFLOP profiles (several model sizes at each of several compute "
        "levels) that fit a wall-clock or FLOPs budget, train each rung as an ordinary run in "
        "DIR/runs/, fit L(N), L(D), L(C) and L(N, D) with bootstrap intervals, predict and then "
        "train a run with 10x the largest rung's compute, and write DIR/report.html. Compute "
        "C = tokens x (6 x matmul params + 12 x n_layer x seq_len x n_embd). Re-running resumes.")
    p.add_argument("--out", default=None, help="ladder folder (runs/, ladder.json, report)")
    p.add_argument("--budget", default=None,
                   help="total wall clock for probe, ladder and verification: 30m, 90s, 1h")
    p.add_argument("--budget-flops", type=float, default=None,
                   help="total training FLOPs for ladder and verification instead of time")
    p.add_argument("--report-only", metavar="DIR", default=None,
                   help="rebuild DIR's report from its finished runs")
    p.add_argument("--recipe", default="moorelm", choices=tuple(RECIPES),
                   help="recipe of every rung (default moorelm)")
    p.add_argument("--compare-recipes", action="store_true",
                   help="also train the baseline recipe on the same rungs and report the "
                   "compute each needs to reach one loss")
    p.add_argument("--baseline-recipe", default="gpt2-baseline", choices=tuple(RECIPES))
    p.add_argument("--shapes", default=None,
                   help="model family as N_LAYERxN_EMBD list (default 1x16,2x16,2x32,2x48,3x64,4x80)")
    p.add_argument("--head-dim", type=int, default=16, help="head size of every shape (default 16)")
    p.add_argument("--seq-len", type=int, default=64, help="context (default 64)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step (default 16)")
    p.add_argument("--levels", type=int, default=3, help="compute levels (default 3)")
    p.add_argument("--sizes-per-level", type=int, default=4, help="model sizes per level (default 4)")
    p.add_argument("--level-ratio", type=float, default=4.0,
                   help="compute ratio between levels (default 4)")
    p.add_argument("--min-steps", type=int, default=20, help="leave out rungs shorter than this")
    p.add_argument("--eval-iters", type=int, default=16, help="val batches per final evaluation")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="predict and train the 10x-compute verification run (default on)")
    p.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamples per fit")
    p.add_argument("--trends", action=argparse.BooleanOptionalAction, default=True,
                   help="include the historical trends of landmark models (default on)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per run (default 1)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--data", default=None, help="a dataset folder made by 'moorelm prepare'")
    add_corpus_flags(p)
    add_tokenizer_flags(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_scale)

    p = sub.add_parser(
        "trend", help="growth of landmark language models beside Moore's law",
        description="Fit exponential trends (doubling times with 95% intervals) to the bundled "
        "table of landmark models since 2018 and set them beside Moore's law and published "
        "estimates; writes trends.png.")
    p.add_argument("--out", default=".", help="folder for trends.png (default: here)")
    p.add_argument("--top-k", type=int, default=3, help="frontier: top-k models at release (default 3)")
    p.set_defaults(func=cmd_trend)
