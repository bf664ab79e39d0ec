"""Benchmark: English -> German by SFT of a small moorelm GPT, LoRA and full fine-tuning side by side.

    python bench/translate.py --data ../shared/data/multi30k [--pretrain-time 360]
        [--finetune-time 300] [--test-rows 500] [--threads 1] [--out DIR]

DATA must hold Multi30k's ``train.en`` and ``train.de`` (one sentence per line, aligned).

1. The last ``--test-rows`` pairs are the held-out test slice; they are never trained on, not
   even their German side.
2. A character-level GPT (2 layers, width 96, context 192 by default: the shared 2-core
   machine is slow) is pretrained from scratch on the German side of the remaining pairs for
   ``--pretrain-time`` seconds (``moorelm.pretrain``).
3. That base is fine-tuned on the English -> German pairs (``{"prompt": en, "completion": de}``,
   ``moorelm.finetune.sft.finetune``) twice, for ``--finetune-time`` seconds each: with LoRA
   adapters (merged on save) and with full fine-tuning. A further ``--val-rows`` training
   pairs are held out for the validation loss.
4. Each model translates the test slice greedily (prompt template applied, stop at
   end-of-text or a line break; decoded by the serving engine), and sacrebleu scores the output against the references: chrF and BLEU.
   In the same run, two reference points: the English source copied unchanged (what chrF
   gives for shared names, numbers and cognates), and the base model before fine-tuning.

Printed: a table of trainable parameters, training steps and time, validation loss (nats per
completion token), decoding time, chrF and BLEU per system, and a few example translations;
``OUT/translate.json`` keeps the numbers. Absolute scores from a few CPU minutes on a tiny
model are low; the point is the side-by-side comparison under one budget. Run ``uptime``
beside it: other work on the machine slows every stage.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


def read_pairs(folder: Path) -> tuple[list[str], list[str]]:
    en = (folder / "train.en").read_text(encoding="utf-8").splitlines()
    de = (folder / "train.de").read_text(encoding="utf-8").splitlines()
    if len(en) != len(de):
        sys.exit(f"train.en has {len(en)} lines but train.de has {len(de)}")
    keep = [(e.strip(), d.strip()) for e, d in zip(en, de) if e.strip() and d.strip()]
    return [e for e, _ in keep], [d for _, d in keep]


def score(hyps: list[str], refs: list[str]) -> dict[str, float]:
    import sacrebleu

    return {"chrf": sacrebleu.corpus_chrf(hyps, [refs]).score,
            "bleu": sacrebleu.corpus_bleu(hyps, [refs]).score}


def translate(run: Path, sources: list[str], max_new_tokens: int, template: str | None) -> tuple[list[str], float]:
    import moorelm
    from moorelm.finetune.sft import complete_batch

    lm = moorelm.load(run, device="cpu")
    if template is not None:
        lm.prompt_template = template
    t0 = time.perf_counter()
    out = complete_batch(lm, sources, max_new_tokens=max_new_tokens, stop=("\n",))
    return [o.strip().split("\n")[0] for o in out], time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="folder with train.en and train.de")
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--test-rows", type=int, default=500)
    ap.add_argument("--val-rows", type=int, default=200)
    ap.add_argument("--pretrain-time", type=float, default=360, help="seconds of pretraining")
    ap.add_argument("--finetune-time", type=float, default=300, help="seconds per fine-tuning method")
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=96)
    ap.add_argument("--seq-len", type=int, default=192)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--packing", action=argparse.BooleanOptionalAction, default=True,
                    help="pack pairs into context windows when fine-tuning (default on)")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--full-lr", type=float, default=1e-3)
    ap.add_argument("--lora-lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared machine more threads can be much slower)")
    ap.add_argument("--max-new-tokens", type=int, default=120)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from moorelm.config import SFT_TEMPLATE
    from moorelm.finetune.lora import LoRAConfig
    from moorelm.finetune.sft import finetune
    from moorelm.finetune.tasks import write_pairs
    from moorelm.training.pretrain import pretrain

    started = time.perf_counter()
    out = Path(args.out or tempfile.mkdtemp(prefix="moorelm-translate-"))
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MOORELM_CACHE", str(out / "cache"))
    en, de = read_pairs(Path(args.data))
    if args.test_rows + args.val_rows + 100 > len(en):
        sys.exit(f"only {len(en)} pairs: lower --test-rows/--val-rows")
    n_train = len(en) - args.test_rows
    test_en, test_de = en[n_train:], de[n_train:]
    (out / "de_train.txt").write_text("\n".join(de[:n_train]) + "\n", encoding="utf-8")
    write_pairs([{"prompt": e, "completion": d} for e, d in zip(en[:n_train], de[:n_train])],
                out / "pairs.jsonl")
    print(f"{len(en)} pairs: {n_train} for training, {len(test_en)} held out for the test; "
          f"threads {args.threads}; load {os.getloadavg()[0]:.1f} at start", flush=True)

    # ---- pretrain on the German side
    base = out / "base"
    model = dict(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, seq_len=args.seq_len)
    common = dict(batch_size=args.batch_size, threads=args.threads, device="cpu", seed=args.seed)
    if not (base / "checkpoints").exists():
        r = pretrain(base, corpus=str(out / "de_train.txt"), tokenizer="char", model_overrides=model,
                     train_overrides={**common, "max_time": args.pretrain_time, "eval_interval": 0,
                                      "warmup_steps": 50},
                     progress=False)
        print(f"pretrained on German: {r.step} steps, {r.tokens:,} tokens in {r.elapsed:.0f}s, "
              f"val loss {r.val_loss:.3f} ({r.val_bpb:.3f} bits/byte), {r.params['total']:,} params",
              flush=True)

    # ---- fine-tune twice
    rows: list[dict] = []
    outputs: dict[str, list[str]] = {}
    rows.append({"system": "copy source (baseline)", **score(test_en, test_de)})
    outputs["copy source (baseline)"] = test_en
    hyps, dt = translate(base, test_en, args.max_new_tokens, SFT_TEMPLATE)
    rows.append({"system": "base, no fine-tuning", "decode_s": dt, **score(hyps, test_de)})
    outputs["base, no fine-tuning"] = hyps
    methods = [("lora", LoRAConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank), args.lora_lr),
               ("full", None, args.full_lr)]
    for name, lora, lr in methods:
        run = out / f"ft-{name}"
        if (run / "checkpoints").exists():
            shutil.rmtree(run)
        r = finetune(base, out / "pairs.jsonl", run, eval_rows=args.val_rows, lora=lora,
                     train_overrides={**common, "max_time": args.finetune_time, "lr": lr,
                                      "eval_interval": 0, "warmup_steps": 30},
                     seed=args.seed, pack=args.packing, exact_match_rows=0, progress=False)
        hyps, dt = translate(run, test_en, args.max_new_tokens, None)
        label = f"{name} fine-tuning" + (f" (rank {args.lora_rank})" if lora else "")
        rows.append({"system": label, "trainable_params": r.trainable_params,
                     "total_params": r.total_params, "steps": r.train.step,
                     "train_s": r.train.elapsed, "val_loss": r.train.val_loss, "decode_s": dt,
                     **score(hyps, test_de)})
        outputs[label] = hyps
        print(f"{label}: {r.train.step} steps in {r.train.elapsed:.0f}s, val loss "
              f"{r.train.val_loss:.3f}, chrF {rows[-1]['chrf']:.1f}, BLEU {rows[-1]['bleu']:.2f}",
              flush=True)

    # ---- report
    print(f"\nEnglish -> German on {len(test_en)} held-out Multi30k pairs "
          f"(load {os.getloadavg()[0]:.1f} at end, {time.perf_counter() - started:.0f}s in all)")
    head = f"{'system':<28} {'trainable':>10} {'steps':>6} {'train s':>8} {'val loss':>8} " \
           f"{'decode s':>8} {'chrF':>6} {'BLEU':>6}"
    print(head)
    print("-" * len(head))

    def cell(r: dict, key: str, fmt: str) -> str:
        return format(r[key], fmt) if key in r and r[key] is not None else "-"

    for r in rows:
        print(f"{r['system']:<28} {cell(r, 'trainable_params', ','):>10} {cell(r, 'steps', 'd'):>6} "
              f"{cell(r, 'train_s', '.0f'):>8} {cell(r, 'val_loss', '.3f'):>8} "
              f"{cell(r, 'decode_s', '.0f'):>8} {r['chrf']:>6.1f} {r['bleu']:>6.2f}")
    print("\nexamples:")
    for i in range(3):
        print(f"  {'en':<16} {test_en[i]}\n  {'reference':<16} {test_de[i]}")
        for name in [k for k in outputs if "baseline" not in k]:
            print(f"  {name.split(',')[0].split(' (')[0]:<16} {outputs[name][i]}")
    (out / "translate.json").write_text(json.dumps({"args": vars(args), "results": rows}, indent=2) + "\n",
                                        encoding="utf-8")
    print(f"\nresults: {out / 'translate.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
