"""``moorelm eval``: EleutherAI lm-evaluation-harness tasks on a run, offline.

    moorelm eval runs/smol --tasks moorelm_genre,moorelm_dates --limit 50 --out results.json
    moorelm eval runs/smol --tasks my_task --include-path my_tasks/
    moorelm eval runs/smol --tasks path/to/task.yaml --num-fewshot 3 --apply-chat-template

A thin layer over ``moorelm.harness.evaluate.evaluate_run``: prints lm-eval's results table
(and where the JSON went).
"""

from __future__ import annotations

from moorelm.harness.tasks import bundled_tasks


def cmd_eval(args) -> int:
    from moorelm.harness.evaluate import evaluate_run, results_table

    results = evaluate_run(
        args.run, args.tasks, limit=args.limit, num_fewshot=args.num_fewshot,
        batch_size=args.batch_size, include_path=args.include_path or (),
        apply_chat_template=args.apply_chat_template, log_samples=args.log_samples,
        out=args.out, device=args.device, seed=args.seed, progress=not args.quiet)
    print(results_table(results))
    print(f"evaluated in {float(results['total_evaluation_time_seconds']):.1f} s"
          + (f"; results written to {args.out}" if args.out else ""))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval", help="run lm-evaluation-harness tasks on a run (offline)",
        description="Run EleutherAI lm-evaluation-harness tasks on the newest checkpoint of a "
        "run, through an lm-eval model over the loaded model (log-likelihoods, rolling "
        "perplexity and generation), and print lm-eval's results table. Nothing is downloaded: "
        "tasks come from moorelm's bundled ones (" + ", ".join(bundled_tasks()) + "; the tag "
        "'moorelm' runs them all), task YAML files with local JSON/JSONL data (--include-path "
        "DIR, or a YAML path in --tasks), or lm-eval's catalogue when their data set is "
        "already on this machine. Needs lm-eval: pip install 'moorelm[eval]'.")
    p.add_argument("run", help="run folder")
    p.add_argument("--tasks", required=True, metavar="T1,T2",
                   help="comma-separated task, group or tag names (patterns like "
                   "'moorelm_*' work) or task YAML paths")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="at most N documents per task (default: all)")
    p.add_argument("--num-fewshot", type=int, default=None, metavar="K",
                   help="worked examples in each prompt (default: the task's own, else 0)")
    p.add_argument("--batch-size", type=int, default=16, metavar="B",
                   help="sequences scored or decoded together (default: 16)")
    p.add_argument("--include-path", action="append", default=None, metavar="DIR",
                   help="a folder of lm-eval task YAML files to add (repeatable)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="also write lm-eval's results as JSON (atomically)")
    p.add_argument("--log-samples", action="store_true",
                   help="keep every request and response in the --out JSON (under 'samples')")
    p.add_argument("--apply-chat-template", action="store_true",
                   help="render prompts with the run's chat template, few-shot examples as turns")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of lm-eval's draws (few-shot examples) and of sampled "
                   "generations (default: lm-eval's own seeds, as the lm_eval command uses)")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true", help="no progress bars for the model's requests")
    p.set_defaults(func=cmd_eval)
