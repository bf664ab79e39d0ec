"""Benchmark: English -> German with SmolLM2-135M-Instruct, zero-shot and after a LoRA run on chat rows.

    python bench/smollm2_translate.py --data ../shared/data/multi30k [--run runs/smol]
        [--lora-time 600] [--test-rows 20] [--train-rows 2000] [--threads 1] [--out DIR]

DATA must hold Multi30k's ``train.en`` and ``train.de`` (aligned, one sentence a line; read by
``bench/translate.py``'s ``read_pairs``, scored by its ``score``: sacrebleu chrF and BLEU).

1. The last ``--test-rows`` pairs are the held-out test slice, never trained on. The first
   ``--train-rows`` of the others become chat rows: a user message asking for the German
   translation of the English sentence, and the German reference as the assistant's reply.
2. The bundled SmolLM2-135M-Instruct GGUF is imported (``moorelm import smollm2``) unless
   ``--run`` names an imported run already.
3. Zero-shot: each test sentence is asked in the same chat message, rendered by the model's
   own template (ChatML), decoded greedily by the inference engine until ``<|im_end|>`` or a
   line break; the first line of the reply is the translation.
4. ``moorelm.finetune.sft.finetune`` trains LoRA adapters (rank 8 on every linear layer of the
   30 blocks, merged on save) for ``--lora-time`` seconds of training, one example per row
   (``pack=False``: rows as wide as the longest example of a batch, not the 8k window); the
   loss counts the assistant's tokens and its ``<|im_end|>``. ``--val-rows`` training rows are
   held out for the validation loss.
5. The fine-tuned run translates the test slice the same way, and both are scored.

Printed: chrF and BLEU before and after, training steps and time, decoding times, the load
average and CPU, and a few example translations; ``OUT/smollm2_translate.json`` keeps them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from translate import read_pairs, score  # noqa: E402  (bench/translate.py: the same data and scorer)

INSTRUCTION = "Translate this English sentence into German. Reply with the German translation only.\n\n"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def messages(en: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": INSTRUCTION + en}]


def translate(run: Path, sources: list[str], max_new_tokens: int) -> tuple[list[str], float]:
    """Greedy replies of the run to the translation request, first line only, and the time."""
    import moorelm
    from moorelm.finetune.sft import complete_batch

    lm = moorelm.load(run, device="cpu")
    prompts = [lm.chat_prompt(messages(s), max_new_tokens)[0] for s in sources]
    t0 = time.perf_counter()
    out = complete_batch(lm, prompts, batch_size=len(prompts), max_new_tokens=max_new_tokens,
                         stop=("\n",), templated=False)
    return [o.strip().split("\n")[0].strip() for o in out], time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="folder with train.en and train.de")
    ap.add_argument("--run", default=None, help="an imported SmolLM2 run (default: import it into OUT/smol)")
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--test-rows", type=int, default=20, help="held-out pairs translated before and after")
    ap.add_argument("--train-rows", type=int, default=2000, help="training pairs made into chat rows")
    ap.add_argument("--val-rows", type=int, default=16)
    ap.add_argument("--lora-time", type=float, default=600, help="seconds of LoRA training")
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared machine more threads can be much slower)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from moorelm.finetune.lora import LoRAConfig
    from moorelm.finetune.sft import finetune
    from moorelm.interop.gguf import import_gguf

    started = time.perf_counter()
    out = Path(args.out or tempfile.mkdtemp(prefix="moorelm-smol-translate-"))
    out.mkdir(parents=True, exist_ok=True)
    en, de = read_pairs(Path(args.data))
    if args.test_rows + args.train_rows > len(en) or args.val_rows >= args.train_rows:
        sys.exit(f"only {len(en)} pairs: lower --test-rows/--train-rows (or --val-rows)")
    test_en, test_de = en[-args.test_rows:], de[-args.test_rows:]
    rows = [{"messages": [*messages(e), {"role": "assistant", "content": d}]}
            for e, d in zip(en[: args.train_rows], de[: args.train_rows])]
    (out / "chat.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                    encoding="utf-8")
    load0 = os.getloadavg()
    print(f"{len(en)} pairs: {args.train_rows} as chat rows for training, {args.test_rows} held out "
          f"for the test; {cpu_name()}; threads {args.threads}; load {load0[0]:.1f} at start",
          flush=True)

    base = Path(args.run) if args.run else out / "smol"
    if not (base / "checkpoints").exists():
        t0 = time.perf_counter()
        import_gguf("smollm2", base)
        print(f"imported SmolLM2 in {time.perf_counter() - t0:.0f}s", flush=True)

    results: dict[str, dict] = {}
    outputs: dict[str, list[str]] = {}
    hyps, dt = translate(base, test_en, args.max_new_tokens)
    results["zero-shot"] = {"decode_s": round(dt, 1), **score(hyps, test_de)}
    outputs["zero-shot"] = hyps
    print(f"zero-shot: chrF {results['zero-shot']['chrf']:.1f}, BLEU "
          f"{results['zero-shot']['bleu']:.2f} ({dt:.0f}s to decode)", flush=True)

    run = out / "lora"
    r = finetune(base, out / "chat.jsonl", run, eval_rows=args.val_rows,
                 lora=LoRAConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank),
                 train_overrides={"max_time": args.lora_time, "lr": args.lr,
                                  "batch_size": args.batch_size, "threads": args.threads,
                                  "device": "cpu", "eval_interval": 0, "warmup_steps": 2,
                                  "log_interval": 1},
                 seed=args.seed, pack=False, exact_match_rows=0, progress=False)
    print(f"LoRA rank {args.lora_rank}: {r.train.step} steps ({r.train.step * args.batch_size} "
          f"conversations) in {r.train.elapsed:.0f}s, val loss {r.train.val_loss:.3f}, "
          f"{r.trainable_params:,} trainable of {r.total_params:,}", flush=True)
    hyps, dt = translate(run, test_en, args.max_new_tokens)
    results["LoRA"] = {"decode_s": round(dt, 1), "steps": r.train.step,
                       "train_s": round(r.train.elapsed, 1), "val_loss": r.train.val_loss,
                       "trainable_params": r.trainable_params, **score(hyps, test_de)}
    outputs["LoRA"] = hyps

    load1 = os.getloadavg()
    print(f"\nEnglish -> German, SmolLM2-135M-Instruct, {len(test_en)} held-out Multi30k pairs "
          f"({cpu_name()}; load {load0[0]:.1f} at start, {load1[0]:.1f} at end; "
          f"{time.perf_counter() - started:.0f}s in all)")
    print(f"{'system':<12} {'steps':>6} {'train s':>8} {'val loss':>8} {'decode s':>8} {'chrF':>6} {'BLEU':>6}")
    for name, res in results.items():
        print(f"{name:<12} {res.get('steps', '-'):>6} {res.get('train_s', '-'):>8} "
              f"{format(res['val_loss'], '.3f') if 'val_loss' in res else '-':>8} "
              f"{res['decode_s']:>8} {res['chrf']:>6.1f} {res['bleu']:>6.2f}")
    print("\nexamples:")
    for i in range(min(4, len(test_en))):
        print(f"  {'en':<10} {test_en[i]}\n  {'reference':<10} {test_de[i]}")
        for name in outputs:
            print(f"  {name:<10} {outputs[name][i]}")
    (out / "smollm2_translate.json").write_text(json.dumps(
        {"args": vars(args), "cpu": cpu_name(), "load": [load0[0], load1[0]], "results": results,
         "examples": [{"en": e, "ref": d, **{k: v[i] for k, v in outputs.items()}}
                      for i, (e, d) in enumerate(zip(test_en, test_de))]},
        indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"\nresults: {out / 'smollm2_translate.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
