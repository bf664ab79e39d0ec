"""Prompt -> completion demo tasks that moorelm generates itself (no downloads).

Small, deterministic tasks that a tiny character-level GPT learns in minutes on a CPU, so the
whole fine-tuning story (data, ``moorelm finetune``, exact-match, ``moorelm generate``) can be
shown end to end:

- ``dates``:   ``"2024-03-07"`` -> ``"7 March 2024"`` (ISO date to day, month name, year), for
  dates from 1900-01-01 to 2099-12-31; every date that exists, leap days included.
- ``numbers``: ``"3412"`` -> ``"three thousand four hundred twelve"`` (0 to 9999, US style:
  no "and", hyphenated tens like "forty-two").

``make_pairs(task, rows, seed)`` draws ``rows`` distinct prompts with a seeded generator, so
the same arguments always give the same file; ``write_pairs`` writes ``{"prompt",
"completion"}`` JSON Lines, the format ``moorelm finetune --data`` reads.

    moorelm finetune-demo-data --task dates --rows 6000 --out data/dates.jsonl
"""

from __future__ import annotations

import datetime as dt
import json
import random
from collections.abc import Callable
from pathlib import Path

from moorelm.errors import MoorelmError

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December")
_FIRST_DAY = dt.date(1900, 1, 1)
_DAYS = (dt.date(2099, 12, 31) - _FIRST_DAY).days + 1

_ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
         "eighteen", "nineteen")
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")


def date_pair(i: int) -> dict[str, str]:
    """The i-th day from 1900-01-01 as an ISO prompt and a spelled-out completion."""
    d = _FIRST_DAY + dt.timedelta(days=i)
    return {"prompt": d.isoformat(), "completion": f"{d.day} {MONTHS[d.month - 1]} {d.year}"}


def number_words(n: int) -> str:
    """0 <= n <= 9999 in English words (US style)."""
    if not 0 <= n <= 9999:
        raise ValueError(n)
    if n < 20:
        return _ONES[n]
    parts: list[str] = []
    thousands, rest = divmod(n, 1000)
    hundreds, rest = divmod(rest, 100)
    if thousands:
        parts.append(f"{_ONES[thousands]} thousand")
    if hundreds:
        parts.append(f"{_ONES[hundreds]} hundred")
    if rest:
        if rest < 20:
            parts.append(_ONES[rest])
        else:
            tens, ones = divmod(rest, 10)
            parts.append(_TENS[tens] + (f"-{_ONES[ones]}" if ones else ""))
    return " ".join(parts)


def number_pair(i: int) -> dict[str, str]:
    return {"prompt": str(i), "completion": number_words(i)}


# name -> (size of the item space, item i -> pair, one-line description)
TASKS: dict[str, tuple[int, Callable[[int], dict[str, str]], str]] = {
    "dates": (_DAYS, date_pair, "ISO date -> '7 March 2024' (1900-2099)"),
    "numbers": (10_000, number_pair, "0-9999 -> English words"),
}


def make_pairs(task: str = "dates", rows: int = 6000, seed: int = 0) -> list[dict[str, str]]:
    """``rows`` distinct prompt/completion pairs of ``task``, in a seeded random order."""
    if task not in TASKS:
        raise MoorelmError(f"demo task {task!r} is unknown; choose one of: {', '.join(TASKS)}")
    space, pair, _ = TASKS[task]
    if not 1 <= rows <= space:
        raise MoorelmError(f"--rows must be between 1 and {space} for task {task!r}, got {rows}")
    picks = random.Random(seed).sample(range(space), rows)
    return [pair(i) for i in picks]


def write_pairs(pairs: list[dict[str, str]], out: str | Path) -> Path:
    """Write pairs as JSON Lines (UTF-8, one object per line); returns the path."""
    from moorelm.atomic import atomic_write_text

    out = Path(out)
    if out.is_dir():
        raise MoorelmError(f"{out} is a folder; give a file name such as {out / 'pairs.jsonl'}")
    atomic_write_text(out, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    return out
