"""How fast `moorelm prepare` tokenizes: MB/s with 1 worker versus N workers.

    python bench/prepare_speed.py                       # 128 MB synthetic corpus, char + bpe
    python bench/prepare_speed.py --size-mb 32 --tokenizer char --workers 1,2,4

Writes a synthetic corpus (Zipf-distributed words, some non-ASCII, as one big file and as a
folder of many files) under --dir, trains each tokenizer once on it, then times the
streaming tokenize-and-write pass of ``prepare`` for each worker count (the tokenizer is
passed in, so training is not timed; its time is printed separately). Every run must write
the same bytes; the script checks that, then deletes the datasets.

The 1-worker run is the baseline. Note: with one worker the BPE tokenizer's Rust side
already spreads each batch over all cores (TOKENIZERS_PARALLELISM), while worker processes
tokenize single-threaded each, so BPE gains less from workers than the char tokenizer.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import time
from pathlib import Path

import numpy as np

from moorelm.corpus import load_corpus
from moorelm.data import PrepareOptions, prepare
from moorelm.tokenizer import Tokenizer

WORDS = 20_000


def make_corpus(folder: Path, size_mb: int, seed: int = 0) -> tuple[Path, Path]:
    """(one big .txt, a folder of ~1 MB files), both about ``size_mb`` MB of the same kind of text."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    vocab = ["".join(rng.choice(letters, size=rng.integers(1, 10))) for _ in range(WORDS)]
    vocab[:6] = ["café", "naïve", "über", "日本", "😀", "—"]  # some multi-byte words
    vocab = np.array(vocab)
    probs = 1.0 / np.arange(1, WORDS + 1)
    probs /= probs.sum()
    big, many = folder / "big.txt", folder / "many"
    many.mkdir(parents=True, exist_ok=True)
    written, part = 0, 0
    with open(big, "w", encoding="utf-8") as f:
        while written < size_mb * 1_000_000:
            words = vocab[rng.choice(WORDS, size=180_000, p=probs)]
            lines = [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
            block = "\n".join(lines) + "\n\n"
            f.write(block)
            (many / f"doc-{part:05d}.txt").write_text(block, encoding="utf-8")
            written += len(block.encode("utf-8"))
            part += 1
    return big, many


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=128)
    ap.add_argument("--tokenizer", default="char,bpe", help="comma-separated: char, bpe")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts (first = baseline)")
    ap.add_argument("--layouts", default="file,folder", help="comma-separated: file, folder")
    ap.add_argument("--dir", default="bench-prepare", help="scratch folder (deleted at the end)")
    args = ap.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    print(f"cpu cores: {os.cpu_count()}; load average at start: "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    t0 = time.perf_counter()
    big, many = make_corpus(root / "corpus", args.size_mb)
    mb = big.stat().st_size / 1e6
    print(f"synthetic corpus: {mb:.1f} MB ({time.perf_counter() - t0:.1f}s to write)")
    try:
        for kind in args.tokenizer.split(","):
            corpus = load_corpus(big)
            t0 = time.perf_counter()
            tok = Tokenizer.train(corpus.iter_text(), kind, args.vocab_size)
            print(f"\n[{kind}] tokenizer trained in {time.perf_counter() - t0:.1f}s "
                  f"({tok.vocab_size} tokens); tokenize + write pass:")
            for layout in args.layouts.split(","):
                corpus = load_corpus(big if layout == "file" else many)
                base_out, base_rate = None, None
                for w in workers:
                    out = root / f"data-{kind}-{layout}-{w}"
                    shutil.rmtree(out, ignore_errors=True)
                    start = time.perf_counter()
                    prepare(corpus, out, PrepareOptions(tokenizer=kind, vocab_size=args.vocab_size),
                            progress=False, workers=w, tokenizer=tok)
                    dt = time.perf_counter() - start
                    rate = mb / dt
                    same = "" if base_out is None else \
                        ("  same bytes as baseline" if same_files(base_out, out) else "  DIFFERENT BYTES")
                    speedup = "" if base_rate is None else f"  x{rate / base_rate:.2f}"
                    print(f"  {layout:<6} workers={w}: {dt:6.1f}s  {rate:6.1f} MB/s{speedup}{same}"
                          f"  (load {os.getloadavg()[0]:.2f})")
                    if base_out is None:
                        base_out, base_rate = out, rate
                    else:
                        shutil.rmtree(out)
                shutil.rmtree(base_out)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
