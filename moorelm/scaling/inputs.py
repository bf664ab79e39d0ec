"""Checks on what callers pass to the fits (measured values, bootstrap counts, the
FLOPs-per-token convention k), each failing with a ``MoorelmError`` that says what to fix.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from moorelm.errors import MoorelmError

DEFAULT_FLOPS_PER_TOKEN = 6.0
"""k in C = k * N * D: training FLOPs per parameter per token (forward 2 + backward 4)."""


def _positive(name: str, values: Any) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        raise MoorelmError(f"{name} must be a list of numbers; got {str(values)[:60]!r}") from None
    if arr.ndim != 1:
        raise MoorelmError(f"{name} must be a flat list of numbers; got an array of shape {arr.shape}")
    bad = ~np.isfinite(arr) | (arr <= 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise MoorelmError(
            f"{name}[{i}] = {float(arr[i])!r} is not a finite positive number; "
            "drop or fix that run before fitting"
        )
    return arr


def _same_length(**arrays: np.ndarray) -> int:
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1:
        listed = ", ".join(f"{k} has {n}" for k, n in lengths.items())
        raise MoorelmError(f"inputs must have one value per run, but {listed}")
    return next(iter(lengths.values()))


def _check_bootstrap(n_bootstrap: int) -> int:
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, (int, np.integer)) or n_bootstrap < 0:
        raise MoorelmError(f"n_bootstrap must be a whole number >= 0; got {n_bootstrap!r}")
    return int(n_bootstrap)


def _check_varies(loss: np.ndarray, what: str) -> None:
    # Equal losses leave every exponent undetermined; the optimiser would wander off.
    if np.ptp(np.log(loss)) <= 1e-12:
        raise MoorelmError(
            f"all {len(loss)} losses are equal ({loss[0]:.6g}), so {what} cannot be fitted; "
            "use runs whose losses differ"
        )


def _check_k(flops_per_token: float) -> float:
    k = float(flops_per_token)
    if not math.isfinite(k) or k <= 0:
        raise MoorelmError(f"flops_per_token must be a positive number (6 is usual); got {flops_per_token!r}")
    return k
