"""Scaling-lab report: runs.csv, fits.json, PNG plots and a self-contained report.html.

``build_report(out_dir, records)`` takes finished training runs, one dict each::

    name, n_params, n_params_nonembed, tokens, flops, val_loss, wall_s,
    compute_level (optional), recipe (optional), verification (optional)

and fits what the runs allow: the parametric L(N, D) with its compute-optimal allocation, L(C)
on the compute frontier, L(N) on the best run per model size, L(D) on the best run per token
count, and IsoFLOP minima per compute level. A fit with too few runs is skipped with a note in
the report rather than failing it. Runs whose loss is missing or not a positive number are
kept in runs.csv but left out of the fits.

A run with ``verification`` true is a held-out check of the laws: it is never fitted, and the
report sets its measured loss beside the prediction (the ``prediction`` argument, or else the
L(N, D) fit evaluated at its N and D).

``records.load_records(out_dir)`` reads runs.csv back, so a report can be rebuilt from finished runs.
Plotting uses matplotlib's Agg backend, imported only when a report is built.

The pieces live in modules of one job each: ``records`` (checking records, runs.csv),
``report_plots`` (the PNG figures) and ``report_html`` (the answer and the page). This module
chooses what to fit and writes the folder.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moorelm.atomic import atomic_write_text
from moorelm.errors import MoorelmError
from moorelm.scaling import fit as F
from moorelm.scaling import trend as T
from moorelm.scaling.estimates import Prediction
from moorelm.scaling.inputs import DEFAULT_FLOPS_PER_TOKEN, _check_k
from moorelm.scaling.isoflop import compute_frontier, fit_isoflop
from moorelm.scaling.records import RUNS_CSV, _as_float, _normalise, write_runs_csv
from moorelm.scaling.report_html import _answer, _html
from moorelm.scaling.report_plots import (
    _plot_allocation,
    _plot_isoflop,
    _plot_loss_vs_compute,
    _plot_prediction,
)
from moorelm.scaling.solver import HUBER_DELTA

FITS_JSON = "fits.json"
REPORT_HTML = "report.html"


# --------------------------------------------------------------------------------------------
# Fits


def _fittable(rows: list[dict[str, Any]], param_key: str) -> tuple[list[dict], list[str]]:
    keep, notes = [], []
    for r in rows:
        loss = _as_float(r.get("val_loss"))
        n = _as_float(r.get(param_key))
        if r["verification"]:
            continue
        if loss is None or not math.isfinite(loss) or loss <= 0:
            notes.append(f"run {r['name']!r} has no usable loss ({r.get('val_loss')!r}) and is "
                         "left out of the fits")
            continue
        if n is None or not math.isfinite(n) or n <= 0:
            notes.append(f"run {r['name']!r} has no {param_key} and is left out of the fits")
            continue
        keep.append(r)
    return keep, notes


def _best_per(values: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Indices of the lowest-loss run for each distinct value."""
    return np.array([int(np.flatnonzero(values == v)[np.argmin(loss[values == v])])
                     for v in np.unique(values)], dtype=int)


def _level_budgets(rows: list[dict], flops: np.ndarray) -> np.ndarray | None:
    """The compute budget of each run's level: the level itself when it is a number, else the
    median measured FLOPs of the runs sharing that label. None when no run has a level."""
    labels = [r.get("compute_level") for r in rows]
    if all(lab is None or lab == "" for lab in labels):
        return None
    budgets = np.full(len(rows), np.nan)
    groups: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        if lab is None or lab == "":
            continue
        value = _as_float(lab)
        if value is not None and math.isfinite(value) and value > 0:
            budgets[i] = value
        else:
            groups.setdefault(str(lab), []).append(i)
    for idx in groups.values():
        budgets[idx] = float(np.median(flops[idx]))
    return budgets


def _run_fits(rows, *, n_bootstrap, seed, flops_per_token, param_key):
    fits: dict[str, Any] = {}
    notes: list[str] = []
    if len(rows) == 0:
        return fits, ["no runs with a usable loss, so nothing was fitted"]
    N = np.array([float(r[param_key]) for r in rows])
    D = np.array([float(r["tokens"]) for r in rows])
    C = np.array([float(r["flops"]) for r in rows])
    L = np.array([float(r["val_loss"]) for r in rows])

    def attempt(key: str, label: str, fn):
        try:
            fits[key] = fn()
        except MoorelmError as exc:
            notes.append(f"{label} not fitted: {exc}")

    attempt("chinchilla", "L(N, D)",
            lambda: F.fit_chinchilla(N, D, L, n_bootstrap=n_bootstrap, seed=seed))
    front = compute_frontier(C, L)
    attempt("loss_vs_compute", "L(C) on the compute frontier",
            lambda: F.fit_power_law(C[front], L[front], n_bootstrap=n_bootstrap, seed=seed,
                                    variable="C"))
    bn = _best_per(N, L)
    attempt("loss_vs_params", "L(N) on the best run per model size",
            lambda: F.fit_power_law(N[bn], L[bn], n_bootstrap=n_bootstrap, seed=seed, variable="N"))
    bd = _best_per(D, L)
    attempt("loss_vs_tokens", "L(D) on the best run per token count",
            lambda: F.fit_power_law(D[bd], L[bd], n_bootstrap=n_bootstrap, seed=seed, variable="D"))
    budgets = _level_budgets(rows, C)
    if budgets is None:
        notes.append("IsoFLOP not fitted: no run has a compute_level")
    else:
        has = np.isfinite(budgets)
        attempt("isoflop", "IsoFLOP minima",
                lambda: fit_isoflop(N[has], L[has], budgets[has], flops_per_token=flops_per_token))
        fits["_budgets"] = budgets
    fits["_arrays"] = {"N": N, "D": D, "C": C, "L": L, "frontier": front}
    return fits, notes


def _prediction_for(rows_all, fits, prediction, param_key):
    """Pair the verification run with a prediction; None when there is nothing to compare."""
    target = None
    if prediction is not None and not isinstance(prediction, (Mapping, Prediction)):
        raise MoorelmError("prediction must be a dict with 'val_loss' (and optionally 'ci95', "
                           "'name') or a fit.Prediction")
    wanted = prediction.get("name") if isinstance(prediction, Mapping) else None
    for r in rows_all:
        if (wanted is not None and r["name"] == wanted) or (wanted is None and r["verification"]):
            target = r
            break
    if target is None:
        return None
    source = "given"
    if isinstance(prediction, Prediction):
        value, lo, hi = prediction.value, prediction.lo, prediction.hi
    elif isinstance(prediction, Mapping):
        if _as_float(prediction.get("val_loss")) is None:
            raise MoorelmError("prediction needs a numeric 'val_loss' (the predicted loss)")
        value = float(prediction["val_loss"])
        ci = prediction.get("ci95") or (prediction.get("lo"), prediction.get("hi"))
        lo, hi = (_as_float(ci[0]), _as_float(ci[1])) if ci else (None, None)
    elif "chinchilla" in fits:
        p = fits["chinchilla"].predict(float(target[param_key]), float(target["tokens"]))
        value, lo, hi = p.value, p.lo, p.hi
        source = "L(N, D) fit (which excludes this run), 95% prediction interval"
    else:
        return None
    actual = _as_float(target.get("val_loss"))

    def clean(v):
        return None if v is None or not math.isfinite(float(v)) else float(v)

    lo, hi = clean(lo), clean(hi)
    inside = None
    if actual is not None and lo is not None and hi is not None:
        inside = lo <= actual <= hi
    return {
        "name": target["name"], "n_params": float(target[param_key]),
        "tokens": float(target["tokens"]), "flops": float(target["flops"]),
        "predicted": float(value), "lo": lo, "hi": hi, "actual": actual,
        "relative_error": None if actual is None else (actual - float(value)) / float(value),
        "within_interval": inside, "source": source,
    }


# --------------------------------------------------------------------------------------------


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def build_report(out_dir: str | Path, records: Sequence[Mapping[str, Any]], *,
                 prediction: Mapping[str, Any] | Prediction | None = None,
                 n_bootstrap: int = 100, seed: int = 0,
                 flops_per_token: float = DEFAULT_FLOPS_PER_TOKEN,
                 param_key: str = "n_params", top_k: int = T.DEFAULT_TOP_K,
                 trends: bool = True) -> Path:
    """Fit the runs and write runs.csv, fits.json, PNG plots and report.html into ``out_dir``.

    ``prediction`` is the loss predicted for the verification run before it was trained: a dict
    with ``val_loss`` and optionally ``ci95`` = [lo, hi] and ``name`` (which run it is for;
    default the run with ``verification`` true), or a ``fit.Prediction``. Without one, the
    L(N, D) fit supplies it. ``param_key`` picks the record field used as N ("n_params" or
    "n_params_nonembed"); ``top_k`` sets the historical frontier and ``trends=False`` leaves the
    historical section out. Returns the report.html path.
    """
    if param_key not in ("n_params", "n_params_nonembed"):
        raise MoorelmError(f"param_key must be 'n_params' or 'n_params_nonembed'; got {param_key!r}")
    k = _check_k(flops_per_token)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise MoorelmError(f"{out} is a file; pass a folder for the report")
    out.mkdir(parents=True, exist_ok=True)
    rows_all = _normalise(records)
    write_runs_csv(out / RUNS_CSV, rows_all)

    rows, notes = _fittable(rows_all, param_key)
    fits, fit_notes = _run_fits(rows, n_bootstrap=n_bootstrap, seed=seed, flops_per_token=k,
                                param_key=param_key)
    notes += fit_notes
    verification = _prediction_for(rows_all, fits, prediction, param_key)
    if verification is None and prediction is not None:
        notes.append("a prediction was given but no run is marked as the verification run "
                     "(verification = true, or the prediction's 'name')")
    elif verification is None and any(r["verification"] for r in rows_all):
        notes.append("the verification run has no prediction to compare with (L(N, D) could not "
                     "be fitted and none was given)")
    trend_rows: list[T.TrendRow] | None = None
    if trends:
        try:
            trend_rows = T.trend_table(top_k=top_k)
        except MoorelmError as exc:
            notes.append(f"historical trends not fitted: {exc}")

    images: list[tuple[Path, str]] = []
    if "_arrays" in fits:
        images.append((_plot_loss_vs_compute(out / "loss_vs_compute.png", fits, verification, k),
                       "Validation loss against training compute, with the fitted frontier."))
    if "isoflop" in fits:
        images.append((_plot_isoflop(out / "isoflop.png", fits),
                       "IsoFLOP curves: loss against model size at each compute level."))
    if "chinchilla" in fits or "isoflop" in fits:
        images.append((_plot_allocation(out / "optimal_allocation.png", fits, k),
                       "Compute-optimal parameters and tokens against compute."))
    if trend_rows is not None:
        images.append((T.plot_trends(out / "trends.png", top_k=top_k),
                       "Landmark language models over time, with Moore's law for reference."))
    if verification is not None:
        images.append((_plot_prediction(out / "prediction.png", fits, verification),
                       "Predicted against measured loss of the held-out verification run."))

    settings = {"n_bootstrap": n_bootstrap, "seed": seed, "flops_per_token": k,
                "param_key": param_key, "frontier_top_k": top_k,
                "huber_delta": HUBER_DELTA}
    doc: dict[str, Any] = {"settings": settings, "notes": notes}
    for key in ("chinchilla", "loss_vs_compute", "loss_vs_params", "loss_vs_tokens", "isoflop"):
        doc[key] = fits[key].to_dict() if key in fits else None
    if "chinchilla" in fits:
        c_max = float(fits["_arrays"]["C"].max())
        doc["compute_optimal_at_max_compute"] = fits["chinchilla"].compute_optimal(
            c_max, flops_per_token=k).to_dict()
    doc["verification"] = verification
    doc["trends"] = None if trend_rows is None else [r.to_dict() for r in trend_rows]
    atomic_write_text(out / FITS_JSON, json.dumps(_jsonable(doc), indent=2) + "\n")

    answer = _answer(fits, trend_rows, verification, k, param_key)
    page = _html(answer, fits, notes, images, trend_rows, rows_all, settings, param_key)
    path = out / REPORT_HTML
    atomic_write_text(path, page)
    return path
