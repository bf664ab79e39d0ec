"""Run records for the scaling report: checking the dicts callers pass, and writing and
reading them as runs.csv (standard columns first, exact round trip of numbers).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moorelm.atomic import atomic_write_text
from moorelm.errors import MoorelmError

COLUMNS = ("name", "n_params", "n_params_nonembed", "tokens", "flops", "val_loss", "wall_s",
           "compute_level", "recipe", "verification")
REQUIRED = ("name", "n_params", "tokens", "flops", "val_loss")
_POSITIVE = ("n_params", "tokens", "flops")
_TRUE = {"1", "true", "yes", "y"}

RUNS_CSV = "runs.csv"


def _is_true(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in _TRUE
    return bool(v) and not (isinstance(v, float) and math.isnan(v))


def _as_float(v: Any) -> float | None:
    if v is None or (isinstance(v, str) and not v.strip()):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _normalise(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Check the records and give each every standard column (None where absent)."""
    if isinstance(records, Mapping) or not isinstance(records, Sequence) or not records:
        raise MoorelmError("records must be a non-empty list of run dicts (name, n_params, "
                           "tokens, flops, val_loss, ...)")
    out = []
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            raise MoorelmError(f"run record {i} is a {type(rec).__name__}, not a dict")
        label = f"run record {i} ({rec.get('name', '?')!r})"
        missing = [k for k in REQUIRED if k not in rec]
        if missing:
            raise MoorelmError(f"{label} is missing {', '.join(missing)}; each record needs "
                               f"{', '.join(REQUIRED)}")
        if not str(rec["name"]).strip():
            raise MoorelmError(f"run record {i} has an empty name; give every run a name")
        for k in _POSITIVE:
            v = _as_float(rec[k])
            if v is None or not math.isfinite(v) or v <= 0:
                raise MoorelmError(f"{label}: {k} = {rec[k]!r} must be a positive number")
        row = {k: rec.get(k) for k in COLUMNS}
        row["verification"] = _is_true(rec.get("verification", False))
        for k, v in rec.items():
            if k not in row:
                row[k] = v
        out.append(row)
    return out


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return repr(float(v))  # repr round-trips exactly
    return str(v)


def _parse(text: str) -> Any:
    if text == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def write_runs_csv(path: str | Path, records: Sequence[Mapping[str, Any]]) -> Path:
    """Write records as CSV: the standard columns first, then any extra keys in sorted order."""
    rows = _normalise(records)
    extra = sorted({k for r in rows for k in r} - set(COLUMNS))
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow([*COLUMNS, *extra])
    for r in rows:
        writer.writerow([_cell(r.get(k)) for k in (*COLUMNS, *extra)])
    path = Path(path)
    atomic_write_text(path, buf.getvalue())
    return path


def load_records(out_dir: str | Path) -> list[dict[str, Any]]:
    """Read ``runs.csv`` from a report folder (or a CSV path) back into run dicts.

    Empty cells become None, numbers become int or float, ``verification`` a bool. Labels of
    compute levels that look like numbers come back as numbers.
    """
    p = Path(out_dir)
    path = p / RUNS_CSV if p.is_dir() else p
    if not path.is_file():
        raise MoorelmError(f"{path} does not exist; pass the folder a report was built in")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise MoorelmError(f"{path} lacks columns {missing}; it is not a moorelm runs.csv")
        records = []
        for raw in reader:
            rec: dict[str, Any] = {}
            for k, v in raw.items():
                if k == "verification":
                    rec[k] = _is_true(v or "")
                elif k in ("name", "recipe"):
                    rec[k] = v if v != "" else None
                else:
                    rec[k] = _parse(v or "")
            records.append(rec)
    return records
