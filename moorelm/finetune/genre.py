"""A demo text-classification set: which genre is this Shakespeare passage from?

Built from the bundled corpus (``moorelm.corpus.shakespeare_plays``: 38 plays, folded into
three genres: comedy, including the problem plays and romances; tragedy, including the Roman
plays; history).

Passages. Each play's text is cut into consecutive, non-overlapping passages of roughly
``min_chars`` to ``max_chars`` characters (400-800 by default). A cut falls at the end of a
speech when the passage is long enough, otherwise at a line boundary before ``max_chars``,
so a passage is always a run of whole lines copied verbatim from the play text. Title, act
and scene headings are never part of a passage and a passage never crosses a scene heading.
From each play, ``passages_per_play`` passages are drawn at random (seeded per play) and
labelled with the play's genre.

Split. Train and eval are split by play, never by passage, so no play (and none of its
character names or phrasing) is on both sides. For each genre, ``eval_plays_per_genre``
plays are chosen with a seeded generator from that genre's plays sorted by name, so every
genre appears in eval and the choice depends only on ``seed``.

Files written to ``out_dir``: ``genre_train.csv`` and ``genre_eval.csv`` (columns
``text,label``; texts keep their newlines, CSV-quoted), plus ``genre_splits.json`` saying
which plays went where and how many passages each side has per genre. Use them with
``finetune_classifier(None, train, out, eval_file=eval)``.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
from collections import Counter
from pathlib import Path

from moorelm.corpus import Play, shakespeare_plays
from moorelm.errors import MoorelmError

GENRES = ("comedy", "history", "tragedy")
TRAIN_FILE = "genre_train.csv"
EVAL_FILE = "genre_eval.csv"
SPLITS_FILE = "genre_splits.json"

_HEADING = re.compile(r"^(ACT|SCENE|PROLOGUE|EPILOGUE|INDUCTION)\b")


def _scenes(text: str) -> list[list[str]]:
    """Play text -> runs of lines between headings (the title and act/scene lines)."""
    lines = text.splitlines()
    scenes: list[list[str]] = [[]]
    for i, line in enumerate(lines):
        alone = (i == 0 or not lines[i - 1].strip()) and (
            i + 1 == len(lines) or not lines[i + 1].strip()
        )
        is_heading = i == 0 or (alone and _HEADING.match(line) and not line.rstrip().endswith(":"))
        if is_heading:
            if scenes[-1]:
                scenes.append([])
            continue
        scenes[-1].append(line)
    return [s for s in scenes if any(x.strip() for x in s)]


def play_passages(text: str, min_chars: int = 400, max_chars: int = 800) -> list[str]:
    """Cut a play's text into consecutive passages of about ``min_chars``-``max_chars``.

    A passage ends at the end of a speech (a blank line follows) once it has ``min_chars``,
    or at the last whole line that keeps it within ``max_chars``. Passages that stay shorter
    than ``min_chars`` (a scene's tail) are dropped.
    """
    if not 0 < min_chars <= max_chars:
        raise MoorelmError(f"need 0 < min_chars <= max_chars, got {min_chars} and {max_chars}")
    passages: list[str] = []
    for scene in _scenes(text):
        current: list[str] = []
        size = 0  # length of "\n".join(current)

        def flush() -> None:
            nonlocal current, size
            body = "\n".join(current).strip("\n")
            if len(body) >= min_chars:
                passages.append(body)
            current, size = [], 0

        for line in scene:
            if not line.strip():
                if size >= min_chars:
                    flush()  # the speech ended and the passage is long enough
                elif current:
                    current.append(line)
                    size += 1
                continue
            added = len(line) + (1 if current else 0)
            if current and size + added > max_chars:
                flush()  # cut at this line boundary
                added = len(line)
            current.append(line)
            size += added
        flush()
    return passages


def split_plays(
    plays: list[Play], eval_plays_per_genre: int = 2, seed: int = 0
) -> tuple[list[Play], list[Play]]:
    """Choose ``eval_plays_per_genre`` eval plays per genre (seeded, from name order)."""
    rng = random.Random(seed)
    train: list[Play] = []
    held: list[Play] = []
    for genre in GENRES:
        members = sorted((p for p in plays if p.genre == genre), key=lambda p: p.name)
        if len(members) <= eval_plays_per_genre:
            raise MoorelmError(
                f"genre {genre!r} has {len(members)} plays; need more than "
                f"eval_plays_per_genre={eval_plays_per_genre}"
            )
        chosen = set(rng.sample(range(len(members)), eval_plays_per_genre))
        for i, play in enumerate(members):
            (held if i in chosen else train).append(play)
    return sorted(train, key=lambda p: p.name), sorted(held, key=lambda p: p.name)


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)


def make_genre_dataset(
    out_dir: str | os.PathLike,
    *,
    passages_per_play: int = 60,
    seed: int = 0,
    eval_plays_per_genre: int = 2,
    min_chars: int = 400,
    max_chars: int = 800,
) -> tuple[Path, Path]:
    """Write the Shakespeare genre set (see the module docstring) and return
    ``(train_csv, eval_csv)``. With the defaults: 32 training plays and 6 eval plays (two per
    genre), up to 60 passages each."""
    if passages_per_play < 1:
        raise MoorelmError(f"passages_per_play must be positive, not {passages_per_play}")
    if eval_plays_per_genre < 1:
        raise MoorelmError(f"eval_plays_per_genre must be positive, not {eval_plays_per_genre}")
    plays = [p for p in shakespeare_plays() if p.genre in GENRES]
    train_plays, eval_plays = split_plays(plays, eval_plays_per_genre, seed)

    def rows_for(group: list[Play]) -> list[tuple[str, str]]:
        rows = []
        for play in group:
            passages = play_passages(play.text(), min_chars, max_chars)
            rng = random.Random(f"{seed}:{play.name}")
            picked = sorted(rng.sample(range(len(passages)), min(passages_per_play, len(passages))))
            rows += [(passages[i], play.genre) for i in picked]
        random.Random(f"{seed}:shuffle:{len(rows)}").shuffle(rows)
        return rows

    train_rows, eval_rows = rows_for(train_plays), rows_for(eval_plays)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_path, eval_path = out / TRAIN_FILE, out / EVAL_FILE
    _write_csv(train_path, train_rows)
    _write_csv(eval_path, eval_rows)
    manifest = {
        "seed": seed,
        "passages_per_play": passages_per_play,
        "chars": [min_chars, max_chars],
        "train_plays": {p.name: p.genre for p in train_plays},
        "eval_plays": {p.name: p.genre for p in eval_plays},
        "train_rows": dict(sorted(Counter(y for _, y in train_rows).items())),
        "eval_rows": dict(sorted(Counter(y for _, y in eval_rows).items())),
    }
    (out / SPLITS_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return train_path, eval_path
