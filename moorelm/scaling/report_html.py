"""The scaling report's words and page: the plain-language answer built from the fits, the
tables, and the self-contained report.html with the figures embedded.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import numpy as np

from moorelm.scaling import fit as F
from moorelm.scaling import trend as T
from moorelm.scaling.estimates import Estimate, Prediction
from moorelm.scaling.records import COLUMNS


def _g(v: float | None, fmt: str = ".3g") -> str:
    if v is None or not math.isfinite(v):
        return "n/a"
    return format(v, fmt)


def _est(e: Estimate, fmt: str = ".3g") -> str:
    text = _g(e.value, fmt)
    if e.ci95 is not None:
        text += f" (95% CI {_g(e.ci95[0], fmt)} to {_g(e.ci95[1], fmt)})"
    return text


def _pred(p: Prediction, fmt: str = ".3g") -> str:
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
