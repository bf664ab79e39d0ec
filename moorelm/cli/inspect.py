"""The ``inspect`` verb: why a model said what it said.

    moorelm inspect runs/demo --prompt "ROMEO:" --max-new-tokens 20      # coloured tokens + table
    moorelm inspect runs/demo --prompt "ROMEO:" --html out.html          # hover for alternatives
    moorelm inspect runs/demo --prompt "ROMEO:" --attention-png a.png --layer 3 --lens-png l.png
"""

from __future__ import annotations

import argparse
import sys

from moorelm.errors import MoorelmError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "inspect", help="per-token probabilities, attention maps and the logit lens of a prompt",
        description="Score each token of --prompt (and of a continuation, --max-new-tokens): "
        "its probability, rank and the top alternatives, coloured in the terminal; write a "
        "self-contained HTML page (--html), attention maps per layer and head (--attention-png) "
        "and the logit lens heat map (--lens-png). See docs/inspect.md.")
    p.add_argument("run", help="run folder")
    p.add_argument("--prompt", required=True, help="text to inspect")
    p.add_argument("--max-new-tokens", type=int, default=0,
                   help="continue the prompt first and inspect the continuation too (default 0)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature of the continuation (default 0: greedy)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--top-k", type=int, default=5, help="alternatives shown per token (default 5)")
    p.add_argument("--layer", type=int, action="append", default=None,
                   help="keep and draw only this layer's attention (repeatable; default all)")
    p.add_argument("--head", type=int, default=None,
                   help="draw only this query head (default: every head)")
    p.add_argument("--average", action="store_true", help="draw the mean over heads per layer")
    p.add_argument("--html", default=None, metavar="OUT.html", help="write the HTML page here")
    p.add_argument("--attention-png", default=None, metavar="OUT.png",
                   help="write the attention grid (layers x heads) here")
    p.add_argument("--lens-png", default=None, metavar="OUT.png",
                   help="write the logit lens heat map here")
    p.add_argument("--json", default=None, metavar="OUT.json",
                   help="write the scores and the logit lens as JSON here")
    p.add_argument("--lens", action="store_true", help="print the logit lens table")
    p.add_argument("--table", action=argparse.BooleanOptionalAction, default=True,
                   help="print one line per token (default on)")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="colour the tokens by probability (default: when stdout is a terminal)")
    p.add_argument("--truncate", action="store_true",
                   help="keep the prompt's last tokens when it does not fit the context window")
    p.add_argument("--force", action="store_true", help="replace output files that exist")
    p.add_argument("--template", action=argparse.BooleanOptionalAction, default=False,
                   help="wrap --prompt in the run's prompt template (fine-tuned runs)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args: argparse.Namespace) -> int:
    import moorelm
    from moorelm.atomic import atomic_write_json
    from moorelm.generate import SamplingParams
    from moorelm.inspect import (
        lens_table,
        save_attention_png,
        save_html,
        save_lens_png,
        terminal,
    )
    from moorelm.inspect.render import check_output

    outputs = [p for p in (args.html, args.attention_png, args.lens_png, args.json) if p]
    for path in outputs:  # before loading anything
        check_output(path, args.force)
    if len(set(outputs)) < len(outputs):
        raise MoorelmError("two outputs name the same file; give each its own path")
    if args.top_k < 0:
        raise MoorelmError(f"--top-k must be >= 0, got {args.top_k}")
    SamplingParams(temperature=args.temperature)  # generate's rule, before loading
    lm = moorelm.load(args.run, device=args.device)
    cfg = lm.config
    if args.head is not None and args.head not in range(cfg.n_head):
        raise MoorelmError(f"head {args.head} does not exist; this model has query heads "
                           f"0..{cfg.n_head - 1}")
    prompt = lm.format_prompt(args.prompt) if args.template else args.prompt
    result = lm.inspect(prompt, max_new_tokens=args.max_new_tokens, top_k=args.top_k,
                        temperature=args.temperature, seed=args.seed, layers=args.layer,
                        truncate=args.truncate)
    colour = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    print(terminal(result, colour=colour, table=args.table))
    if args.lens:
        print()
        print(lens_table(result))
    layer = args.layer[0] if args.layer and len(args.layer) == 1 else None
    written = []
    if args.attention_png:
        written.append(save_attention_png(result, args.attention_png, layer, args.head,
                                          args.average, overwrite=args.force))
    if args.lens_png:
        written.append(save_lens_png(result, args.lens_png, overwrite=args.force))
    if args.html:
        written.append(save_html(result, args.html, title=f"moorelm inspect: {args.run}",
                                 overwrite=args.force))
    if args.json:
        atomic_write_json(check_output(args.json, args.force), result.to_dict())
        written.append(args.json)
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
    return 0
