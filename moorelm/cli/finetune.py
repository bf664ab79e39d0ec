"""Fine-tuning verbs: finetune, finetune-eval, finetune-demo-data.

    moorelm finetune-demo-data --task dates --rows 6000 --out data/dates.jsonl
    moorelm finetune runs/base --data data/dates.jsonl --out runs/dates [--lora-rank 8]
    moorelm finetune-eval runs/dates --data data/dates.jsonl --rows 200
    moorelm generate runs/dates --prompt 2024-03-07 --temperature 0

    moorelm finetune runs/smol --data chats.jsonl --out runs/smol-ft --lora-rank 8 --no-packing
    moorelm chat runs/smol-ft --prompt "..."      # chat rows: {"messages": [...]}
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moorelm.cli.core import add_dataclass_flags, add_logger_flag, collect, make_loggers
from moorelm.config import LORA_LR, SFT_TRAIN, TrainConfig
from moorelm.errors import MoorelmError

# pretraining-only or handled-by-hand training fields get no flag here
SKIP_TRAIN = {"device", "fsdp", "muon_lr", "muon_momentum", "decay_frac", "peak_flops",
              "embed_lr_scale", "decay_embeddings"}


def _template(text: str | None) -> str | None:
    """Shell-friendly escapes: a typed backslash-n is a line break, backslash-t a tab."""
    return None if text is None else text.replace("\\n", "\n").replace("\\t", "\t")


def cmd_finetune(args) -> int:
    from moorelm.finetune.lora import LoRAConfig, parse_targets
    from moorelm.finetune.sft import describe, finetune

    lora = None
    lora_flags = (args.lora_alpha, args.lora_targets, args.lora_dropout,
                  args.lora_train_embeddings or None)
    if args.lora_rank:
        lora = LoRAConfig(rank=args.lora_rank,
                          alpha=args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora_rank,
                          targets=parse_targets(args.lora_targets),
                          dropout=args.lora_dropout or 0.0, merged=not args.keep_adapters,
                          train_embeddings=args.lora_train_embeddings)
    elif any(f is not None for f in lora_flags) or args.keep_adapters:
        raise MoorelmError("--lora-alpha/--lora-targets/--lora-dropout/--lora-train-embeddings/"
                           "--keep-adapters need --lora-rank R (R >= 1)")
    if args.resume and args.run:
        raise MoorelmError("--resume continues the run in --out with its saved base run; drop RUN")
    if not args.resume and (not args.run or not args.data):
        raise MoorelmError("give the base run folder and --data FILE (or --resume --out DIR)")
    overrides = collect(args, TrainConfig)
    overrides["device"] = args.device
    result = finetune(
        args.run, args.data, args.out, eval_data=args.eval_data, eval_rows=args.eval_rows,
        template=_template(args.template), lora=lora, train_overrides=overrides, epochs=args.epochs,
        seed=args.split_seed, pack=args.packing, resume=args.resume, exact_match_rows=args.exact_match_rows,
        progress=not args.quiet, loggers=make_loggers(args, Path(args.out)),
    )
    print(describe(result))
    return 0


def cmd_finetune_eval(args) -> int:
    import moorelm
    from moorelm.finetune.sft import exact_match, read_rows

    if args.rows is not None and args.rows < 1:
        raise MoorelmError(f"--rows must be >= 1, got {args.rows}")
    pairs = read_rows(args.data)[: args.rows]
    lm = moorelm.load(args.run, device=args.device)
    if args.template is not None:
        from moorelm.generate import check_template

        lm.prompt_template = check_template(_template(args.template))
    r = exact_match(lm, pairs, batch_size=args.batch_size, show=args.show)
    if args.json:
        print(json.dumps(r, indent=2, ensure_ascii=False))
        return 0
    print(f"exact match {r['exact_match']:.4f} ({r['correct']}/{r['rows']} rows of {args.data})")
    for ex in r["examples"]:
        mark = "ok " if ex["ok"] else "BAD"
        print(f"  {mark} {ex['prompt']!r} -> {ex['got']!r}"
              + ("" if ex["ok"] else f" (expected {ex['expected']!r})"))
    return 0


def cmd_demo_data(args) -> int:
    from moorelm.finetune.tasks import make_pairs, write_pairs

    pairs = make_pairs(args.task, args.rows, args.seed)
    path = write_pairs(pairs, args.out)
    print(f"wrote {len(pairs)} {args.task} pairs to {path}, e.g. "
          f"{pairs[0]['prompt']!r} -> {pairs[0]['completion']!r}")
    return 0


def add_parser(sub) -> None:
    from moorelm.config import SFT_EPOCHS, SFT_EVAL_ROWS, SFT_TEMPLATE
    from moorelm.finetune.tasks import TASKS

    p = sub.add_parser(
        "finetune", help="fine-tune a run on prompt/completion pairs or chat rows (full or LoRA)",
        description="Supervised fine-tuning of a moorelm run (trained here or imported) on "
        "{\"prompt\", \"completion\"} JSONL rows (loss on completion tokens only, the prompt "
        "template stored in the new run for generate and serve) or on chat rows "
        "{\"messages\": [{\"role\": \"system\"|\"user\"|\"assistant\", \"content\": ...}]} "
        "(OpenAI's fine-tuning format: the run's chat template applied, loss on assistant "
        "tokens only, each reply's end-of-turn token included); examples packed into context "
        "windows. Full fine-tuning by default; --lora-rank trains low-rank adapters instead "
        "(merged into the weights on save unless --keep-adapters). Prints held-out exact "
        "match at the end.",
    )
    p.add_argument("run", nargs="?", default=None, help="base run folder (omit with --resume)")
    p.add_argument("--data", default=None,
                   help="prompt/completion pairs (.jsonl, or .csv/.tsv) or chat rows (.jsonl)")
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument("--eval-data", default=None, help="held-out pairs (default: hold out --eval-rows)")
    p.add_argument("--eval-rows", type=int, default=None,
                   help=f"rows of --data to hold out (default min({SFT_EVAL_ROWS}, 10%%))")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the held-out split and packing")
    p.add_argument("--template", default=None,
                   help=f"prompt template with {{prompt}}; \\n is a line break (default "
                   f"{SFT_TEMPLATE!r})")
    p.add_argument("--packing", action=argparse.BooleanOptionalAction, default=True,
                   help="pack several examples per context window, each from position 0 and "
                   "attending only to itself (default on); --no-packing trains one example "
                   "per row (more, smaller steps)")
    p.add_argument("--epochs", type=float, default=None,
                   help=f"passes over the training rows when no max-steps/tokens/time is given "
                   f"(default {SFT_EPOCHS:g})")
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-rank", type=int, default=None, help="train rank-R adapters instead of all weights")
    g.add_argument("--lora-alpha", type=float, default=None, help="adapter scale alpha/rank (default alpha = 2 x rank)")
    g.add_argument("--lora-targets", default=None,
                   help="comma-separated layers: c_attn, c_proj, attn.c_proj, mlp.c_proj, c_fc, "
                   "c_gate (default: all linear layers of the blocks)")
    g.add_argument("--lora-dropout", type=float, default=None, help="dropout on the adapter input (default 0)")
    g.add_argument("--lora-train-embeddings", action="store_true",
                   help="also train the token embedding and head in full (needed when the data "
                   "uses tokens the base never saw, e.g. digits for a Shakespeare model)")
    g.add_argument("--keep-adapters", action="store_true",
                   help="save adapters separately (adapter.safetensors) instead of merging them")
    p.add_argument("--exact-match-rows", type=int, default=SFT_EVAL_ROWS,
                   help=f"held-out rows scored by exact match at the end (default {SFT_EVAL_ROWS}; 0 skips)")
    p.add_argument("--resume", action="store_true", help="continue the fine-tuning run in --out")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_logger_flag(p)
    add_dataclass_flags(p, TrainConfig, SKIP_TRAIN, "training (defaults: fine-tuning's; lr 3e-4 "
                        f"full / {LORA_LR:g} LoRA)", defaults=SFT_TRAIN)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("finetune-eval", help="exact match of a run on prompt/completion pairs",
                       description="Greedy completions (the run's prompt template applied, stop "
                       "at end-of-text) compared with the expected completions.")
    p.add_argument("run", help="run folder")
    p.add_argument("--data", required=True,
                   help="prompt/completion pairs (.jsonl, .csv, .tsv) or chat rows (.jsonl): the "
                   "reply to each conversation's last assistant message is scored")
    p.add_argument("--rows", type=int, default=None, help="score the first N rows only")
    p.add_argument("--template", default=None, help="override the run's prompt template")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--show", type=int, default=5, help="examples to print (and failures)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_finetune_eval)

    p = sub.add_parser("finetune-demo-data", help="write a demo prompt/completion task as JSONL",
                       description="Deterministic toy tasks a small model learns in minutes: "
                       + "; ".join(f"{k}: {v[2]}" for k, v in TASKS.items()))
    p.add_argument("--task", default="dates", choices=list(TASKS))
    p.add_argument("--rows", type=int, default=6000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="JSONL file to write")
    p.set_defaults(func=cmd_demo_data)

