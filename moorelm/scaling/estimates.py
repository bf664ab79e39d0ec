"""What a fit hands back: point estimates with 95% intervals, fitted values with bands, and
their JSON form (NaN and infinities become ``None``).

The bootstrap percentile helpers that turn resampled parameters or curves into those
intervals and bands live here too, so every fit reports uncertainty the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from moorelm.errors import MoorelmError

_MIN_BOOT_FOR_CI = 5  # fewer successful resamples than this give no interval


def _json_float(v: Any) -> float | None:
    """A float for JSON: NaN and infinities become None (JSON has no spelling for them)."""
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _json_array(v: Any) -> Any:
    arr = np.asarray(v, dtype=float)
    if arr.ndim == 0:
        return _json_float(arr)
    return [_json_array(x) for x in arr]


def _ci(samples: np.ndarray) -> tuple[float, float] | None:
    if samples.size < _MIN_BOOT_FOR_CI:
        return None
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return (float(lo), float(hi))


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its 95% interval (``None`` where none could be formed)."""

    value: float
    ci95: tuple[float, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "value": _json_float(self.value),
            "ci95": None if self.ci95 is None else [_json_float(v) for v in self.ci95],
        }

    def format(self, fmt: str = ".3g") -> str:
        """'0.34 (95% CI 0.31-0.37)', or just the value when there is no interval."""
        text = format(self.value, fmt)
        if self.ci95 is not None:
            text += f" (95% CI {format(self.ci95[0], fmt)}-{format(self.ci95[1], fmt)})"
        return text


@dataclass(frozen=True, eq=False)
class Prediction:
    """Fitted values with a 95% band; floats for scalar input, arrays otherwise.

    ``kind`` is "prediction" when the band includes the scatter of runs about the law (a
    resampled residual is added to each bootstrap curve), "confidence" when it covers only
    uncertainty in the fitted law itself. Bands are NaN when the fit had no bootstrap.
    """

    value: Any
    lo: Any
    hi: Any
    kind: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "value": _json_array(self.value),
            "lo": _json_array(self.lo),
            "hi": _json_array(self.hi),
            "kind": self.kind,
        }


def _band(curves: np.ndarray, residuals: np.ndarray, kind: str, seed: int):
    """Percentile band over bootstrap curves (S, ...), optionally with residual scatter."""
    if curves.shape[0] < _MIN_BOOT_FOR_CI:
        nan = np.full(curves.shape[1:], np.nan)
        return nan, nan
    if kind == "prediction" and residuals.size:
        # Each bootstrap curve is paired with several resampled log residuals so that the
        # percentiles are not simply the extremes of a few curves.
        rng = np.random.default_rng(seed)
        reps = max(1, math.ceil(2000 / curves.shape[0]))
        curves = np.repeat(curves, reps, axis=0)
        noise = rng.choice(residuals, size=curves.shape)
        curves = curves * np.exp(-noise)
    lo, hi = np.percentile(curves, [2.5, 97.5], axis=0)
    return lo, hi


def _scalar_or_array(v: np.ndarray, scalar: bool) -> Any:
    return float(np.asarray(v).reshape(-1)[0]) if scalar else v


def _check_kind(interval: str) -> None:
    if interval not in ("prediction", "confidence"):
        raise MoorelmError(f"interval must be 'prediction' or 'confidence'; got {interval!r}")
