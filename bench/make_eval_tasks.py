"""Write the data of moorelm's bundled lm-evaluation-harness tasks (``moorelm/tasks/``).

    python bench/make_eval_tasks.py            # (re)write moorelm/tasks/*.jsonl
    python bench/make_eval_tasks.py --check    # exit 1 if the files differ from what it makes

Everything comes from data moorelm already ships or computes, so the tasks run offline:

- ``genre_{train,test}.jsonl``: Shakespeare passages (``moorelm.finetune.genre.play_passages``,
  200-400 characters) labelled comedy / history / tragedy. The test side is drawn from the
  six plays the genre classifier holds out (``split_plays``, seed 0: two per genre), the
  few-shot side from the other 32 plays, so no play is on both sides.
- ``dates_{train,test}.jsonl``: ISO dates and their spelled-out form (``moorelm.finetune.
  tasks.date_pair``), disjoint draws from 1900-2099.
- ``shakespeare_test.jsonl``: longer passages (600-1000 characters) of the same six held-out
  plays, scored as text (perplexity, bits per byte).

The task YAML files beside them are written by hand; this script only makes the data, with
seeded generators, so running it again gives the same bytes.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parents[1] / "moorelm" / "tasks"
SEED = 0
GENRE_PER_TEST_PLAY = 20
GENRE_PER_TRAIN_PLAY = 1
DATES_TEST, DATES_TRAIN = 100, 50
SHAKESPEARE_PER_PLAY = 5


def _sample(passages: list[str], k: int, key: str) -> list[str]:
    rng = random.Random(f"{SEED}:{key}")
    return [passages[i] for i in sorted(rng.sample(range(len(passages)), min(k, len(passages))))]


def make_files() -> dict[str, str]:
    """File name -> content (JSON Lines) of every bundled task's data."""
    from moorelm.corpus import shakespeare_plays
    from moorelm.finetune.genre import GENRES, play_passages, split_plays
    from moorelm.finetune.tasks import TASKS, date_pair

    plays = [p for p in shakespeare_plays() if p.genre in GENRES]
    train_plays, test_plays = split_plays(plays, 2, SEED)
    texts = {p.name: p.text() for p in plays}

    def genre_rows(group, per_play: int, side: str) -> list[dict]:
        rows = []
        for play in group:
            for text in _sample(play_passages(texts[play.name], 200, 400), per_play,
                                f"genre:{side}:{play.name}"):
                rows.append({"passage": text, "genre": play.genre,
                             "label": GENRES.index(play.genre), "play": play.name})
        random.Random(f"{SEED}:genre:{side}:order").shuffle(rows)
        return rows

    space = TASKS["dates"][0]
    picks = random.Random(f"{SEED}:dates").sample(range(space), DATES_TEST + DATES_TRAIN)
    dates = [date_pair(i) for i in picks]

    def date_rows(pairs: list[dict]) -> list[dict]:
        return [{"date": p["prompt"], "answer": p["completion"]} for p in pairs]

    shakespeare = []
    for play in test_plays:
        for text in _sample(play_passages(texts[play.name], 600, 1000), SHAKESPEARE_PER_PLAY,
                            f"shakespeare:{play.name}"):
            shakespeare.append({"text": text, "play": play.name})

    def jsonl(rows: list[dict]) -> str:
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)

    return {
        "genre_test.jsonl": jsonl(genre_rows(test_plays, GENRE_PER_TEST_PLAY, "test")),
        "genre_train.jsonl": jsonl(genre_rows(train_plays, GENRE_PER_TRAIN_PLAY, "train")),
        "dates_test.jsonl": jsonl(date_rows(dates[:DATES_TEST])),
        "dates_train.jsonl": jsonl(date_rows(dates[DATES_TEST:])),
        "shakespeare_test.jsonl": jsonl(shakespeare),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="compare with the files in moorelm/tasks instead of writing them")
    args = parser.parse_args(argv)
    files = make_files()
    if args.check:
        stale = [n for n, text in files.items()
                 if not (TASKS_DIR / n).is_file()
                 or (TASKS_DIR / n).read_text(encoding="utf-8") != text]
        for name in stale:
            print(f"{TASKS_DIR / name} differs from what this script makes", file=sys.stderr)
        return 1 if stale else 0
    from moorelm.atomic import atomic_write_text

    TASKS_DIR.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        atomic_write_text(TASKS_DIR / name, text)
        print(f"wrote {TASKS_DIR / name} ({text.count(chr(10))} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
