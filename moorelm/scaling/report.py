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

``load_records(out_dir)`` reads runs.csv back, so a report can be rebuilt from finished runs.
Plotting uses matplotlib's Agg backend, imported only when a report is built.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moorelm.atomic import atomic_write_bytes, atomic_write_text
from moorelm.errors import MoorelmError
from moorelm.scaling import fit as F
from moorelm.scaling import trend as T

COLUMNS = ("name", "n_params", "n_params_nonembed", "tokens", "flops", "val_loss", "wall_s",
           "compute_level", "recipe", "verification")
REQUIRED = ("name", "n_params", "tokens", "flops", "val_loss")
_POSITIVE = ("n_params", "tokens", "flops")
_TRUE = {"1", "true", "yes", "y"}

RUNS_CSV = "runs.csv"
FITS_JSON = "fits.json"
REPORT_HTML = "report.html"


# --------------------------------------------------------------------------------------------
# Records


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
    front = F.compute_frontier(C, L)
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
                lambda: F.fit_isoflop(N[has], L[has], budgets[has], flops_per_token=flops_per_token))
        fits["_budgets"] = budgets
    fits["_arrays"] = {"N": N, "D": D, "C": C, "L": L, "frontier": front}
    return fits, notes


def _prediction_for(rows_all, fits, prediction, param_key):
    """Pair the verification run with a prediction; None when there is nothing to compare."""
    target = None
    if prediction is not None and not isinstance(prediction, (Mapping, F.Prediction)):
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
    if isinstance(prediction, F.Prediction):
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
# Plots


def _save(fig, path: Path) -> Path:
    """Render to memory and write atomically, so a killed build leaves no torn PNG."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _plt():
    # Fixed margins (subplots_adjust) rather than tight_layout in every figure: tight_layout
    # measures every label in an extra pass, which doubled the plotting time.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_loss_vs_compute(path: Path, fits: dict, verification: dict | None, k: float) -> Path:
    plt = _plt()
    a = fits["_arrays"]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    sc = ax.scatter(a["C"], a["L"], c=np.log10(a["N"]), cmap="viridis", s=28, zorder=3)
    fig.colorbar(sc, ax=ax, label="log10 parameters")
    fr = a["frontier"]
    ax.scatter(a["C"][fr], a["L"][fr], s=90, facecolors="none", edgecolors="tab:red", zorder=2,
               label="compute frontier")
    hi_c = a["C"].max() * 10 if verification is None else max(a["C"].max(), verification["flops"]) * 2
    grid = np.logspace(np.log10(a["C"].min()), np.log10(hi_c), 80)
    if "loss_vs_compute" in fits:
        f = fits["loss_vs_compute"]
        p = f.predict(grid)
        ax.plot(grid, p.value, color="tab:red",
                label=f"L(C) frontier fit, alpha = {f.alpha.value:.3f}")
        if np.all(np.isfinite(p.lo)):
            ax.fill_between(grid, p.lo, p.hi, color="tab:red", alpha=0.12, label="95% prediction band")
    if "chinchilla" in fits:
        o = fits["chinchilla"].optimal_loss(grid, flops_per_token=k)
        ax.plot(grid, o.value, color="tab:purple", linestyle="--",
                label="compute-optimal loss from L(N, D)")
        if np.all(np.isfinite(o.lo)):
            ax.fill_between(grid, o.lo, o.hi, color="tab:purple", alpha=0.10)
    if verification is not None and verification.get("actual") is not None:
        ax.scatter([verification["flops"]], [verification["actual"]], marker="*", s=220,
                   color="gold", edgecolors="black", zorder=4, label="verification run")
    ax.set_xscale("log")
    ax.set_yscale("log")
    _plain_log_y(ax)
    ax.set_xlabel("Training compute C (FLOPs)")
    ax.set_ylabel("Validation loss")
    ax.set_title("Loss against compute")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8)
    fig.subplots_adjust(left=0.1, right=0.97, top=0.92, bottom=0.11)
    return _save(fig, path)


def _plot_isoflop(path: Path, fits: dict) -> Path:
    plt = _plt()
    a, iso, budgets = fits["_arrays"], fits["isoflop"], fits["_budgets"]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    cmap = plt.get_cmap("plasma")
    levels = iso.levels
    for j, lv in enumerate(levels):
        color = cmap(0.1 + 0.8 * j / max(1, len(levels) - 1))
        sel = budgets == lv.compute
        ax.scatter(a["N"][sel], a["L"][sel], color=color, s=26, zorder=3,
                   label=f"C = {lv.compute:.2g}" + ("" if lv.used else " (not used)"))
        if lv.coeffs is not None:
            u = np.linspace(np.log(a["N"][sel].min()), np.log(a["N"][sel].max()), 60)
            c2, c1, c0 = lv.coeffs
            ax.plot(np.exp(u), c2 * u**2 + c1 * u + c0, color=color, linewidth=1.2)
        if lv.used:
            ax.scatter([lv.n_opt], [lv.loss_min], marker="D", s=50, color=color,
                       edgecolors="black", zorder=4)
    ax.set_xscale("log")
    ax.set_xlabel("Parameters N")
    ax.set_ylabel("Validation loss")
    ax.set_title(f"IsoFLOP curves (diamonds: fitted minima; N_opt ~ C^{iso.a.value:.2f})")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8)
    fig.subplots_adjust(left=0.1, right=0.97, top=0.92, bottom=0.11)
    return _save(fig, path)


def _plot_allocation(path: Path, fits: dict, k: float) -> Path:
    plt = _plt()
    a = fits["_arrays"]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    grid = np.logspace(np.log10(a["C"].min()), np.log10(a["C"].max() * 100), 80)
    if "chinchilla" in fits:
        co = fits["chinchilla"].compute_optimal(grid, flops_per_token=k)
        for pred, color, name, exp in ((co.n_opt, "tab:blue", "N_opt", co.a),
                                       (co.d_opt, "tab:green", "D_opt", co.b)):
            ax.plot(grid, pred.value, color=color, label=f"{name} from L(N, D) ~ C^{exp.value:.2f}")
            if np.all(np.isfinite(pred.lo)):
                ax.fill_between(grid, pred.lo, pred.hi, color=color, alpha=0.15)
    if "isoflop" in fits:
        iso = fits["isoflop"]
        used = [lv for lv in iso.levels if lv.used]
        cs = np.array([lv.compute for lv in used])
        ns = np.array([lv.n_opt for lv in used])
        ax.scatter(cs, ns, marker="D", color="tab:blue", edgecolors="black", zorder=4,
                   label="IsoFLOP minima N_opt")
        ax.scatter(cs, cs / (k * ns), marker="D", color="tab:green", edgecolors="black", zorder=4,
                   label="IsoFLOP D_opt = C / (k N_opt)")
        ax.plot(grid, iso.n_opt(grid), color="tab:blue", linestyle=":",
                label=f"IsoFLOP fit N_opt ~ C^{iso.a.value:.2f}")
        ax.plot(grid, iso.d_opt(grid), color="tab:green", linestyle=":")
    ax.scatter(a["C"], a["N"], s=10, color="tab:blue", alpha=0.3, label="runs: N")
    ax.scatter(a["C"], a["D"], s=10, color="tab:green", alpha=0.3, label="runs: D")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"Training compute C (FLOPs), C = {k:g}·N·D")
    ax.set_ylabel("Parameters / tokens")
    ax.set_title("Compute-optimal model size and data")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8)
    fig.subplots_adjust(left=0.1, right=0.97, top=0.92, bottom=0.11)
    return _save(fig, path)


def _plot_prediction(path: Path, fits: dict, v: dict) -> Path:
    plt = _plt()
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(10, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    if "_arrays" in fits:
        a = fits["_arrays"]
        ax.scatter(a["C"], a["L"], s=18, color="0.6", label="fitted runs")
    yerr = None
    if v["lo"] is not None and v["hi"] is not None:
        yerr = [[v["predicted"] - v["lo"]], [v["hi"] - v["predicted"]]]
    for axis, x in ((ax, v["flops"]), (zoom, 0.0)):
        axis.errorbar([x], [v["predicted"]], yerr=yerr, fmt="o", color="tab:blue", capsize=6,
                      markersize=7, zorder=5, label="predicted (95% interval)")
    if v["actual"] is not None:
        ax.scatter([v["flops"]], [v["actual"]], marker="*", s=160, color="gold",
                   edgecolors="black", zorder=4, label="measured")
        zoom.scatter([1.0], [v["actual"]], marker="*", s=240, color="gold", edgecolors="black",
                     zorder=4)
    ax.set_xscale("log")
    ax.set_yscale("log")
    _plain_log_y(ax)
    ax.set_xlabel("Training compute C (FLOPs)")
    ax.set_ylabel("Validation loss")
    ax.set_title(f"Verification run {v['name']!r} among the fitted runs")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8)
    zoom.set_xlim(-0.7, 1.7)
    zoom.set_xticks([0.0, 1.0], ["predicted", "measured"])
    zoom.set_title("Close-up")
    zoom.grid(True, axis="y", alpha=0.25)
    fig.subplots_adjust(left=0.08, right=0.98, top=0.9, bottom=0.12, wspace=0.25)
    return _save(fig, path)


def _plain_log_y(ax) -> None:
    """Plain numbers on a log loss axis: losses span less than a decade, where matplotlib's
    default labels read like 6x10^0. Minor ticks are labelled only when few decades show."""
    from matplotlib.ticker import LogFormatter

    ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


# --------------------------------------------------------------------------------------------
# HTML


def _g(v: float | None, fmt: str = ".3g") -> str:
    if v is None or not math.isfinite(v):
        return "n/a"
    return format(v, fmt)


def _est(e: F.Estimate, fmt: str = ".3g") -> str:
    text = _g(e.value, fmt)
    if e.ci95 is not None:
        text += f" (95% CI {_g(e.ci95[0], fmt)} to {_g(e.ci95[1], fmt)})"
    return text


def _pred(p: F.Prediction, fmt: str = ".3g") -> str:
    text = _g(p.value, fmt)
    if p.lo is not None and math.isfinite(p.lo):
        text += f" (95% CI {_g(p.lo, fmt)} to {_g(p.hi, fmt)})"
    return text


def _answer(fits: dict, trends: list[T.TrendRow] | None, verification: dict | None,
            k: float, param_key: str) -> list[str]:
    """The plain-words answer, one sentence per item; every number comes from a fit or a
    reference constant."""
    lines = []
    if "chinchilla" in fits:
        ch = fits["chinchilla"]
        gamma = ch.compute_exponent
        lines.append(
            f"In these runs, loss above the fitted floor E = {_g(ch.E.value)} falls as "
            f"C<sup>-{_g(gamma.value)}</sup> along the compute-optimal frontier "
            f"(exponent {_est(gamma)}), from L(N, D) with alpha = {_est(ch.alpha)} and "
            f"beta = {_est(ch.beta)}.")
        c_max = float(fits["_arrays"]["C"].max())
        co = ch.compute_optimal(c_max, flops_per_token=k)
        lines.append(
            f"At the largest budget tried (C = {_g(c_max)} FLOPs) the compute-optimal model has "
            f"{_pred(co.n_opt)} parameters trained on {_pred(co.d_opt)} tokens, about "
            f"{_pred(co.tokens_per_param)} tokens per parameter. N<sub>opt</sub> grows as "
            f"C<sup>a</sup> with a = {_est(co.a, '.2f')} and D<sub>opt</sub> as C<sup>b</sup> "
            f"with b = {_est(co.b, '.2f')}.")
        ref = F.PUBLISHED_FITS["hoffmann2022"]
        log_n, log_d = F._log_allocation(ref["E"], ref["A"], ref["alpha"], ref["B"], ref["beta"],
                                         np.log(c_max / k))
        lines.append(
            f"For comparison, Hoffmann et al.'s published L(N, D) gives "
            f"{_g(float(np.exp(log_d - log_n)))} tokens per parameter at the same budget.")
    elif "loss_vs_compute" in fits:
        f = fits["loss_vs_compute"]
        lines.append(f"In these runs, loss on the compute frontier falls as "
                     f"E + A·C<sup>-alpha</sup> with alpha = {_est(f.alpha)} and E = {_est(f.E)}.")
    else:
        lines.append("There were too few runs to fit how loss falls with compute; see the notes.")
    if "loss_vs_compute" in fits and "chinchilla" in fits:
        f = fits["loss_vs_compute"]
        lines.append(f"A direct fit of E + A·C<sup>-alpha</sup> to the compute-frontier runs gives "
                     f"alpha = {_est(f.alpha)}.")
    if "isoflop" in fits:
        iso = fits["isoflop"]
        lines.append(f"IsoFLOP minima ({iso.n_levels_used} compute levels) give N<sub>opt</sub> ~ "
                     f"C<sup>a</sup> with a = {_est(iso.a, '.2f')}.")
    if verification is not None and verification.get("actual") is not None:
        v = verification
        interval = ("" if v["lo"] is None else
                    f" (95% interval {_g(v['lo'], '.4g')} to {_g(v['hi'], '.4g')})")
        verdict = {True: "inside the interval", False: "outside the interval",
                   None: "with no interval to judge by"}[v["within_interval"]]
        side = "above" if v["relative_error"] > 0 else "below"
        lines.append(
            f"The held-out run {html.escape(str(v['name']))} measured a loss of "
            f"{_g(v['actual'], '.4g')} against a prediction of {_g(v['predicted'], '.4g')}"
            f"{interval}: {verdict}, {_g(abs(100 * v['relative_error']), '.2g')}% {side} the "
            "prediction.")
    if trends:
        by = {r.quantity: r for r in trends}
        moore = T.reference_rate("moore")
        comp = by.get("training_flops")
        front = by.get("training_flops (frontier)")
        if comp is not None:
            ci = comp.ci
            ci_text = "" if ci is None else f" (95% CI {_g(ci[0], '.1f')} to {_g(ci[1], '.1f')})"
            text = (f"Historically, the training compute of landmark language models doubled every "
                    f"{_g(comp.doubling_months, '.1f')} months{ci_text}")
            if front is not None:
                text += f", {_g(front.doubling_months, '.1f')} months for the frontier"
            text += (f", against Moore's law's {_g(moore.doubling_months, 'g')} months: "
                     f"{_g(moore.doubling_months / comp.doubling_months, '.2g')} times as fast.")
            lines.append(text)
        ep = T.reference_rate("frontier_compute")
        alg = T.reference_rate("algorithmic")
        lines.append(
            f"Epoch AI put frontier compute growth at {_g(ep.low, 'g')}-{_g(ep.high, 'g')}× a year "
            f"(doubling every {_g(ep.doubling_range[0], '.1f')}-{_g(ep.doubling_range[1], '.1f')} "
            f"months), and Ho et al. found the compute needed for a fixed loss halving about every "
            f"{_g(alg.doubling_months, 'g')} months, so effective compute has grown faster still.")
    return lines


def _fit_table(fits: dict) -> str:
    rows = []
    names = {"chinchilla": "L(N, D)", "loss_vs_compute": "L(C), compute frontier",
             "loss_vs_params": "L(N), best run per size", "loss_vs_tokens": "L(D), best run per token count"}
    for key, label in names.items():
        if key not in fits:
            continue
        f = fits[key]
        params = ("E", "A", "alpha", "B", "beta") if key == "chinchilla" else ("E", "A", "alpha")
        count = f.n_runs if key == "chinchilla" else f.n_points
        for j, p in enumerate(params):
            e = getattr(f, p)
            ci = "" if e.ci95 is None else f"{_g(e.ci95[0], '.4g')} to {_g(e.ci95[1], '.4g')}"
            first = f"<td rowspan='{len(params)}'>{label}<br><small>{count} runs, {f.n_bootstrap} bootstrap</small></td>" if j == 0 else ""
            rows.append(f"<tr>{first}<td>{p}</td><td>{_g(e.value, '.4g')}</td><td>{ci}</td></tr>")
    if not rows:
        return "<p>No law could be fitted.</p>"
    return ("<table><tr><th>Law</th><th>Parameter</th><th>Value</th><th>95% CI</th></tr>"
            + "".join(rows) + "</table>")


def _runs_table(rows_all: list[dict], param_key: str) -> str:
    head = "".join(f"<th>{c}</th>" for c in COLUMNS)
    body = []
    for r in rows_all:
        cells = []
        for c in COLUMNS:
            v = r.get(c)
            if isinstance(v, bool):
                text = "yes" if v else ""
            elif isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
                text = _g(float(v), ".4g")
            else:
                text = "" if v is None else html.escape(str(v))
            cells.append(f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table class='runs'><tr>{head}</tr>{''.join(body)}</table>"


def _trend_html(trends: list[T.TrendRow]) -> str:
    rows = []
    for r in trends:
        ci = "" if r.ci is None else f"{_g(r.ci[0], '.1f')} to {_g(r.ci[1], '.1f')}"
        rows.append(f"<tr><td>{html.escape(r.quantity)}</td><td>{_g(r.doubling_months, '.1f')}</td>"
                    f"<td>{ci}</td><td>{_g(r.growth_per_year, '.2f')}×</td>"
                    f"<td>{'' if r.n_points is None else r.n_points}</td></tr>")
    sources = "".join(f"<li>{html.escape(r.quantity)}: {html.escape(r.source)}</li>"
                      for r in trends if r.kind == "reference")
    return ("<table><tr><th>Quantity</th><th>Doubling (months)</th><th>95% CI / range</th>"
            "<th>Growth per year</th><th>Models</th></tr>" + "".join(rows) + "</table>"
            f"<ul class='small'>{sources}</ul>")


def _img(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 960px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
table.runs { font-size: 0.78em; }
.answer { background: #f5f8ff; border-left: 4px solid #4a6fd8; padding: 0.6em 1em; }
.small, .notes { font-size: 0.85em; color: #555; }
figure { margin: 1em 0; } img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.85em; color: #555; }
"""


def _html(answer, fits, notes, images, trends, rows_all, settings, param_key) -> str:
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>moorelm scaling report</title>", f"<style>{_CSS}</style></head><body>",
        "<h1>Scaling report: do language models have their own Moore's law?</h1>",
        "<h2>Answer</h2><div class='answer'>",
        "".join(f"<p>{line}</p>" for line in answer), "</div>",
    ]
    if notes:
        parts.append("<h2>Notes</h2><ul class='notes'>"
                     + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    parts.append("<h2>Fitted laws</h2>" + _fit_table(fits))
    parts.append(
        "<p class='small'>Laws are fitted by minimising the Huber loss (delta = 10<sup>-3</sup>) "
        "between log predicted and log observed loss with L-BFGS from a grid of starting points "
        "(Hoffmann et al. 2022, Approach 3; Besiroglu et al. 2024). Intervals are bootstrap "
        f"percentiles over resampled runs. Model size N is <code>{html.escape(param_key)}</code>; "
        f"compute-optimal allocations use C = {settings['flops_per_token']:g}·N·D.</p>")
    parts.append("<h2>Plots</h2>" + "".join(_img(p, c) for p, c in images))
    if trends:
        parts.append("<h2>Historical trends of landmark models</h2>" + _trend_html(trends))
    parts.append("<h2>Runs</h2>" + _runs_table(rows_all, param_key))
    parts.append("</body></html>")
    return "\n".join(parts)


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
                 prediction: Mapping[str, Any] | F.Prediction | None = None,
                 n_bootstrap: int = 100, seed: int = 0,
                 flops_per_token: float = F.DEFAULT_FLOPS_PER_TOKEN,
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
    k = F._check_k(flops_per_token)
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
                "huber_delta": F.HUBER_DELTA}
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
