"""Historical trends of landmark language models, set beside Moore's law.

The bundled table ``landmarks.csv`` lists landmark models from 2018 on: name, organisation, date
(YYYY-MM, the month the model was first made public, by paper, announcement or weights),
parameters (total, for mixtures of experts), active_parameters (per token, mixtures of experts
only), training_tokens, training_flops, source and notes. Empty cells are unknown. Where the
compute is not reported but size and tokens are, it is estimated here as 6 * N * D (with the
active parameters for a mixture of experts) and marked ``flops_estimated``.

For each quantity, log10(value) is regressed on the date as a fractional year by ordinary least
squares; the slope gives the growth per year (10**slope) and the doubling time
(12 * log10(2) / slope months), with 95% intervals from the t-distribution of the slope.

The *frontier* variant fits only models that were among the ``top_k`` largest known at their
release: a model counts when fewer than ``top_k`` models released in the same month or earlier
exceed it (``top_k=1`` is the running maximum, i.e. record-setters). This is similar in
spirit to Epoch AI's "top models at release" view of the frontier, on a far smaller table.

Reference rates from the literature are data, kept in ``REFERENCE_RATES`` with their sources,
and are never fitted here.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from moorelm.errors import MoorelmError
from moorelm.plots import pyplot, save_figure

LOG10_2 = math.log10(2.0)
DEFAULT_TOP_K = 3
FLOPS_PER_PARAM_TOKEN = 6.0  # C ~ 6 N D for training a dense decoder (forward 2 + backward 4)

QUANTITIES: dict[str, str] = {
    "parameters": "Parameters",
    "training_tokens": "Training tokens",
    "training_flops": "Training compute (FLOPs)",
}


@dataclass(frozen=True)
class ReferenceRate:
    """A growth rate quoted from the literature, in the form the source states it.

    Exactly one of ``doubling_months`` and ``growth_per_year`` is given; ``low``/``high`` is
    the quoted range or interval in that same unit, when the source gives one.
    """

    key: str
    label: str
    source: str
    doubling_months: float | None = None
    growth_per_year: float | None = None
    low: float | None = None
    high: float | None = None

    @property
    def central_doubling_months(self) -> float:
        """Doubling (or halving) time in months; for a quoted growth range with no central
        value, the geometric middle of the range."""
        if self.doubling_months is not None:
            return self.doubling_months
        g = self.growth_per_year
        if g is None:
            g = math.sqrt(self.low * self.high)
        return 12.0 * math.log(2.0) / math.log(g)

    @property
    def doubling_range(self) -> tuple[float, float] | None:
        if self.low is None or self.high is None:
            return None
        if self.doubling_months is not None:
            return (self.low, self.high)
        # Faster growth means a shorter doubling time, so the ends swap.
        return (_doubling_from_growth(self.high), _doubling_from_growth(self.low))

    @property
    def central_growth_per_year(self) -> float:
        return 2.0 ** (12.0 / self.central_doubling_months)


def _doubling_from_growth(g: float) -> float:
    return 12.0 * math.log(2.0) / math.log(g)


REFERENCE_RATES: tuple[ReferenceRate, ...] = (
    ReferenceRate(
        key="moore",
        label="Moore's law (transistors per chip)",
        doubling_months=24.0,
        source="G. E. Moore, 'Progress in Digital Integrated Electronics', IEDM 1975, which revised "
               "the yearly doubling of 'Cramming more components onto integrated circuits' "
               "(Electronics, 1965) to a doubling every two years",
    ),
    ReferenceRate(
        key="frontier_compute",
        label="Frontier training compute (Epoch AI)",
        growth_per_year=None, low=4.0, high=5.0,
        source="J. Sevilla and E. Roldan, 'Training compute of frontier AI models grows by 4-5x "
               "per year', Epoch AI, 2024 (https://epoch.ai/blog/training-compute-of-frontier-ai-"
               "models-grows-by-4-5x-per-year); earlier: Sevilla et al. 2022, 'Compute Trends "
               "Across Three Eras of Machine Learning', arXiv:2202.05924",
    ),
    ReferenceRate(
        key="algorithmic",
        label="Algorithmic progress (halving of compute for fixed loss)",
        doubling_months=8.0, low=5.0, high=14.0,
        source="Ho et al. 2024, 'Algorithmic progress in language models', arXiv:2403.05812 "
               "(halving time about 8 months, 95% CI about 5-14)",
    ),
)


def reference_rate(key: str) -> ReferenceRate:
    """The entry of ``REFERENCE_RATES`` with this key ("moore", "frontier_compute", "algorithmic")."""
    for ref in REFERENCE_RATES:
        if ref.key == key:
            return ref
    raise MoorelmError(f"no reference rate {key!r}; choose from {[r.key for r in REFERENCE_RATES]}")


# --------------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class Landmark:
    """One row of the landmarks table; numbers are None where unknown."""

    name: str
    organisation: str
    date: str
    year: float
    parameters: float | None
    active_parameters: float | None
    training_tokens: float | None
    training_flops: float | None
    flops_estimated: bool
    source: str
    notes: str

    def value(self, quantity: str) -> float | None:
        return getattr(self, quantity)


_REQUIRED_COLUMNS = ("name", "organisation", "date", "parameters", "training_tokens",
                     "training_flops", "source", "notes")
_DATE = re.compile(r"^(\d{4})-(\d{2})$")


def date_to_year(date: str) -> float:
    """'2020-05' -> 2020.375: the middle of the month as a fractional year."""
    m = _DATE.match(date.strip())
    if not m or not 1 <= int(m.group(2)) <= 12:
        raise MoorelmError(f"date {date!r} is not in YYYY-MM form (for example 2020-05)")
    return int(m.group(1)) + (int(m.group(2)) - 0.5) / 12.0


def _number(text: str, column: str, where: str) -> float | None:
    text = text.strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise MoorelmError(f"{where}: {column} {text!r} is not a number; write it like 1.75e11 "
                           "or leave the cell empty") from None
    if not math.isfinite(value) or value <= 0:
        raise MoorelmError(f"{where}: {column} {text!r} must be a positive number")
    return value


def load_landmarks(path: str | Path | None = None) -> list[Landmark]:
    """Read the bundled landmarks table, or a CSV with the same columns at ``path``."""
    if path is None:
        text = resources.files("moorelm.scaling").joinpath("landmarks.csv").read_text("utf-8")
        label = "landmarks.csv"
    else:
        p = Path(path)
        if not p.is_file():
            raise MoorelmError(f"landmarks table {p} does not exist; pass a CSV file")
        text = p.read_text("utf-8")
        label = str(p)
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in _REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise MoorelmError(f"{label} lacks columns {missing}; it needs {list(_REQUIRED_COLUMNS)}")
    rows = []
    for i, raw in enumerate(reader, start=2):  # line 1 is the header
        where = f"{label} line {i}"
        name = (raw.get("name") or "").strip()
        if not name:
            raise MoorelmError(f"{where}: the name is empty")
        where = f"{where} ({name})"
        source = (raw.get("source") or "").strip()
        if not source:
            raise MoorelmError(f"{where}: every row needs a source; add the paper or report")
        try:
            year = date_to_year(raw.get("date") or "")
        except MoorelmError as exc:
            raise MoorelmError(f"{where}: {exc}") from None
        params = _number(raw.get("parameters") or "", "parameters", where)
        active = _number(raw.get("active_parameters") or "", "active_parameters", where)
        tokens = _number(raw.get("training_tokens") or "", "training_tokens", where)
        flops = _number(raw.get("training_flops") or "", "training_flops", where)
        estimated = False
        used = active if active is not None else params
        if flops is None and used is not None and tokens is not None:
            flops = FLOPS_PER_PARAM_TOKEN * used * tokens
            estimated = True
        rows.append(Landmark(name, (raw.get("organisation") or "").strip(), raw["date"].strip(),
                             year, params, active, tokens, flops, estimated, source,
                             (raw.get("notes") or "").strip()))
    if not rows:
        raise MoorelmError(f"{label} has no rows")
    return rows


# --------------------------------------------------------------------------------------------
# Fitting


@dataclass(frozen=True)
class TrendFit:
    """log10(value) = log10_at_ref + slope * (year - ref_year), fitted by least squares."""

    quantity: str
    slope: float
    slope_ci95: tuple[float, float] | None
    ref_year: float
    log10_at_ref: float
    n_points: int
    r2: float
    year_range: tuple[float, float]

    @property
    def growth_per_year(self) -> float:
        return 10.0**self.slope

    @property
    def growth_ci95(self) -> tuple[float, float] | None:
        if self.slope_ci95 is None:
            return None
        return (10.0 ** self.slope_ci95[0], 10.0 ** self.slope_ci95[1])

    @property
    def doubling_months(self) -> float:
        """Months per doubling (negative: a halving time; infinite for a flat trend)."""
        return 12.0 * LOG10_2 / self.slope if self.slope != 0 else math.inf

    @property
    def doubling_ci95(self) -> tuple[float, float] | None:
        """Interval on the doubling time; the upper end is infinite when the slope's interval
        reaches zero (the data cannot rule out no growth)."""
        if self.slope_ci95 is None:
            return None
        lo_s, hi_s = self.slope_ci95
        if hi_s <= 0:
            return None  # a shrinking quantity has no doubling time
        upper = math.inf if lo_s <= 0 else 12.0 * LOG10_2 / lo_s
        return (12.0 * LOG10_2 / hi_s, upper)

    def predict(self, year: Any) -> Any:
        """Fitted value at fractional year(s)."""
        return 10.0 ** (self.log10_at_ref + self.slope * (np.asarray(year, dtype=float) - self.ref_year))

    def to_dict(self) -> dict[str, Any]:
        def f(v):
            return None if v is None or not math.isfinite(v) else float(v)

        def pair(p):
            return None if p is None else [f(p[0]), f(p[1])]

        return {
            "quantity": self.quantity, "slope_log10_per_year": f(self.slope),
            "slope_ci95": pair(self.slope_ci95), "growth_per_year": f(self.growth_per_year),
            "growth_ci95": pair(self.growth_ci95), "doubling_months": f(self.doubling_months),
            "doubling_ci95": pair(self.doubling_ci95), "n_points": self.n_points,
            "r2": f(self.r2), "year_range": pair(self.year_range),
        }


def fit_trend(years: Sequence[float], values: Sequence[float], *, quantity: str = "value") -> TrendFit:
    """Fit log10(value) linear in fractional year; needs 3 points and 2 distinct years."""
    x = np.asarray(years, dtype=float)
    y = np.asarray(values, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise MoorelmError(f"years and values must be equal-length lists; got {x.shape} and {y.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y)) and np.all(y > 0)):
        raise MoorelmError(f"{quantity}: values must be finite and positive, years finite")
    n = len(x)
    if n < 3 or len(np.unique(x)) < 2:
        raise MoorelmError(f"need at least 3 points over at least 2 dates to fit a trend in "
                           f"{quantity}; got {n} points")
    ly = np.log10(y)
    ref = float(x.mean())
    dx = x - ref
    sxx = float(dx @ dx)
    slope = float(dx @ (ly - ly.mean()) / sxx)
    level = float(ly.mean())
    resid = ly - (level + slope * dx)
    ss_res = float(resid @ resid)
    ss_tot = float(((ly - ly.mean()) ** 2).sum())
    dof = n - 2
    ci = None
    if dof >= 1:
        se = math.sqrt(ss_res / dof / sxx)
        t = float(stats.t.ppf(0.975, dof))
        ci = (slope - t * se, slope + t * se)
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return TrendFit(quantity, slope, ci, ref, level, n, r2, (float(x.min()), float(x.max())))


def frontier_mask(years: Sequence[float], values: Sequence[float], *, top_k: int = DEFAULT_TOP_K) -> np.ndarray:
    """True for models that were among the ``top_k`` largest known when released.

    A model qualifies when fewer than ``top_k`` other models released in the same month or
    earlier have a strictly larger value.
    """
    if not isinstance(top_k, int) or top_k < 1:
        raise MoorelmError(f"top_k must be a whole number >= 1; got {top_k!r}")
    x = np.asarray(years, dtype=float)
    y = np.asarray(values, dtype=float)
    mask = np.zeros(len(x), dtype=bool)
    for i in range(len(x)):
        bigger = (x <= x[i]) & (y > y[i])
        mask[i] = int(bigger.sum()) < top_k
    return mask


def _series(landmarks: Iterable[Landmark], quantity: str) -> tuple[np.ndarray, np.ndarray, list[Landmark]]:
    picked = [lm for lm in landmarks if lm.value(quantity) is not None]
    return (np.array([lm.year for lm in picked]), np.array([lm.value(quantity) for lm in picked]),
            picked)


def fit_landmark_trends(landmarks: Sequence[Landmark] | None = None, *,
                        top_k: int = DEFAULT_TOP_K) -> dict[str, TrendFit]:
    """Trend fits for every quantity over all models and over the frontier.

    Keys are the quantity names ("parameters", ...) and the same with " (frontier)".
    """
    lms = load_landmarks() if landmarks is None else list(landmarks)
    fits: dict[str, TrendFit] = {}
    for q in QUANTITIES:
        years, values, _ = _series(lms, q)
        fits[q] = fit_trend(years, values, quantity=q)
        mask = frontier_mask(years, values, top_k=top_k)
        fits[f"{q} (frontier)"] = fit_trend(years[mask], values[mask], quantity=f"{q} (frontier)")
    return fits


@dataclass(frozen=True)
class TrendRow:
    """One line of the trend table: a fitted trend or a quoted reference rate.

    ``ci`` is the 95% interval (or quoted range) on ``doubling_months``; ``n_points`` is None
    for reference rates.
    """

    quantity: str
    doubling_months: float
    ci: tuple[float, float] | None
    growth_per_year: float
    n_points: int | None
    kind: str = "fit"
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        def f(v):
            return None if v is None or not math.isfinite(v) else float(v)

        return {"quantity": self.quantity, "doubling_months": f(self.doubling_months),
                "ci": None if self.ci is None else [f(self.ci[0]), f(self.ci[1])],
                "growth_per_year": f(self.growth_per_year), "n_points": self.n_points,
                "kind": self.kind, "source": self.source}


def trend_table(landmarks: Sequence[Landmark] | None = None, *, top_k: int = DEFAULT_TOP_K,
                include_reference: bool = True) -> list[TrendRow]:
    """Rows (quantity, doubling_months, ci, growth_per_year, n_points) for each fitted trend,
    followed by the reference rates when ``include_reference``."""
    fits = fit_landmark_trends(landmarks, top_k=top_k)
    rows = [
        TrendRow(name, fit.doubling_months, fit.doubling_ci95, fit.growth_per_year, fit.n_points,
                 "fit", f"landmarks table, {'top-' + str(top_k) + ' at release' if 'frontier' in name else 'all models'}")
        for name, fit in fits.items()
    ]
    if include_reference:
        rows += [
            TrendRow(ref.label, ref.central_doubling_months, ref.doubling_range,
                     ref.central_growth_per_year, None, "reference", ref.source)
            for ref in REFERENCE_RATES
        ]
    return rows


def _fmt_months(v: float) -> str:
    return "inf" if not math.isfinite(v) else f"{v:.1f}"


def format_trend_table(rows: Sequence[TrendRow] | None = None) -> str:
    """The trend table as aligned plain text, with the reference sources listed below it."""
    rows = trend_table() if rows is None else list(rows)
    header = ("Quantity", "Doubling (months)", "95% CI / range", "Growth per year", "Points")
    body = []
    for r in rows:
        ci = "" if r.ci is None else f"{_fmt_months(r.ci[0])}-{_fmt_months(r.ci[1])}"
        body.append((r.quantity, _fmt_months(r.doubling_months), ci, f"{r.growth_per_year:.2f}x",
                     "" if r.n_points is None else str(r.n_points)))
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(header, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in body]
    refs = [r for r in rows if r.kind == "reference"]
    if refs:
        lines.append("")
        lines += [f"* {r.quantity}: {r.source}" for r in refs]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Plot


def plot_trends(path: str | Path, landmarks: Sequence[Landmark] | None = None, *,
                top_k: int = DEFAULT_TOP_K) -> Path:
    """Draw parameters, tokens and compute of landmark models over time (log axes) with the
    fitted all-model and frontier lines and a Moore's-law line, and save a PNG at ``path``."""
    plt = pyplot()
    lms = load_landmarks() if landmarks is None else list(landmarks)
    fits = fit_landmark_trends(lms, top_k=top_k)
    moore = reference_rate("moore")
    path = Path(path)

    fig, axes = plt.subplots(3, 1, figsize=(10, 13), sharex=True)
    for ax, (q, title) in zip(axes, QUANTITIES.items()):
        years, values, picked = _series(lms, q)
        est = np.array([q == "training_flops" and lm.flops_estimated for lm in picked])
        front = frontier_mask(years, values, top_k=top_k)
        ax.scatter(years[~est], values[~est], s=22, color="tab:blue", zorder=3, label="reported")
        if est.any():
            ax.scatter(years[est], values[est], s=22, facecolors="none", edgecolors="tab:blue",
                       zorder=3, label=f"estimated as {FLOPS_PER_PARAM_TOKEN:g}·N·D")
        ax.scatter(years[front], values[front], s=70, facecolors="none", edgecolors="tab:red",
                   linewidths=1.0, zorder=2, label=f"frontier (top-{top_k} at release)")
        for x, y, lm in zip(years, values, picked):
            ax.annotate(lm.name, (x, y), xytext=(3, 2), textcoords="offset points", fontsize=6,
                        color="0.25")
        grid = np.linspace(years.min(), years.max(), 50)
        fit = fits[q]
        ax.plot(grid, fit.predict(grid), color="tab:blue",
                label=f"all models: doubling {fit.doubling_months:.1f} months")
        ffit = fits[f"{q} (frontier)"]
        ax.plot(grid, ffit.predict(grid), color="tab:red", linestyle="--",
                label=f"frontier: doubling {ffit.doubling_months:.1f} months")
        # Moore's law drawn from the fitted all-model value at the first date, so the gap
        # between the lines is the excess growth over transistor scaling.
        start = float(fit.predict(grid[0]))
        ax.plot(grid, start * 2.0 ** ((grid - grid[0]) * 12.0 / moore.doubling_months),
                color="0.4", linestyle=":", linewidth=2,
                label=f"Moore's law: doubling {moore.doubling_months:g} months")
        ax.set_yscale("log")
        ax.set_ylabel(title)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    # Room on the right for the names of the latest models.
    all_years = [lm.year for lm in lms]
    axes[-1].set_xlim(min(all_years) - 0.2, max(all_years) + 0.6)
    axes[-1].set_xlabel("Release date (year)")
    fig.suptitle("Landmark language models over time", fontsize=12)
    # Fixed margins: tight_layout would measure every annotation in an extra pass.
    fig.subplots_adjust(left=0.09, right=0.98, top=0.95, bottom=0.05, hspace=0.08)
    return save_figure(fig, path)
