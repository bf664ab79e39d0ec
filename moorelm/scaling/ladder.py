"""The scaling ladder: plan and train many small runs under one budget, then fit and verify.

    moorelm scale --budget 30m --out DIR          (or --budget-flops 1e15)
    moorelm scale --report-only DIR

A *ladder* is a set of ordinary training runs (``train.train``) of models from one family of
shapes (n_layer x n_embd at a fixed head size and context), arranged as IsoFLOP profiles in the
manner of Hoffmann et al. 2022: at each of several compute levels C_j = C_0 * ratio**j, a
window of neighbouring sizes is trained on exactly C_j FLOPs each (the window slides towards
larger models as compute grows, so the whole family, spanning about two decades of
non-embedding parameters, is covered).

Compute is counted with the model's own accounting, ``GPT.flops_per_token``:
C = D x (6 x matmul parameters + 12 x n_layer x T x n_embd) for D training tokens at context T
(forward 2 FLOPs per weight per token plus 4 x n_layer x T x n_embd for attention scores and
weighted values; backward twice the forward).

Planning: a short throughput probe (a few real training steps per shape) measures seconds per
step on this machine; C_0 is then the largest value whose estimated wall time for the whole
plan (ladder, the 10x verification run and, with ``compare``, the baseline recipe's ladder) fits
the budget. Rungs that would get fewer than ``min_steps`` steps are left out.

After the ladder: L(N, D) is fitted, the loss of a run with 10x the largest rung's compute is
predicted (the family shape the fit says is best at that budget), that run is trained, and the
report sets prediction against measurement. State lives in DIR/ladder.json (plan, probe,
results, prediction), written after every rung, so an interrupted ladder resumes where it
stopped: finished rungs are skipped and a rung killed midway resumes from its checkpoint.

Planning (spec, shapes, probe, plan) lives in ``ladder_plan`` and the recipe comparison in
``compare``; this module runs and resumes the ladder, predicts and trains the verification
run and writes the report. Their public names are importable from here as before.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from moorelm.atomic import atomic_write_json
from moorelm.data import TokenData
from moorelm.errors import MoorelmError
from moorelm.jsonfile import read_json
from moorelm.run import RunFolder
from moorelm.scaling.compare import _plot_comparison, compare_recipes, comparison_sentence
from moorelm.scaling.ladder_plan import (
    LadderSpec,
    Plan,
    describe_plan,
    make_plan,
    probe,
    rung_configs,
    shape_name,
    shape_stats,
)

LADDER_JSON = "ladder.json"


# ----------------------------------------------------------------------------- running rungs


class LadderState:
    """DIR/ladder.json: spec, stats, probe, plan, per-rung results, prediction, comparison."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = self.out / LADDER_JSON
        self.doc: dict[str, Any] = {}
        if self.path.exists() or self.path.is_symlink():
            try:
                doc = read_json(self.path)  # a folder, a device, deep nesting: one line
            except MoorelmError as e:
                raise MoorelmError(f"{e}; move it away to start afresh") from None
            results = doc.get("results", {}) if isinstance(doc, dict) else None
            if not isinstance(results, dict) or not all(isinstance(r, dict)
                                                        for r in results.values()):
                raise MoorelmError(f"{self.path} is not a ladder's state (a JSON object with "
                                   "a 'results' object); move it away to start afresh")
            self.doc = doc

    @property
    def results(self) -> dict[str, dict]:
        return self.doc.setdefault("results", {})

    def save(self) -> None:
        atomic_write_json(self.path, self.doc)


def run_rung(spec: LadderSpec, data: TokenData, out: Path, rung: dict, *,
             progress: bool = True) -> dict:
    """Train one rung into out/runs/NAME (resuming a partial run) and return its record."""
    from moorelm.training.loop import train

    shape = tuple(rung["shape"])
    mcfg, tcfg = rung_configs(spec, shape, rung["recipe"], data.vocab_size, rung["steps"])
    run_dir = out / "runs" / rung["name"]
    resume = bool(RunFolder(run_dir).checkpoints())
    meta = {"recipe": rung["recipe"], "ladder": {k: v for k, v in rung.items() if k != "shape"}}
    t0 = time.perf_counter()
    r = train(mcfg, tcfg, data, run_dir, resume=resume, run_meta=meta, progress=progress)
    wall = time.perf_counter() - t0
    return {
        "name": rung["name"], "n_params": r.params["total"],
        "n_params_nonembed": r.params["non_embedding"], "tokens": r.tokens, "flops": r.flops,
        "val_loss": r.val_loss, "wall_s": round(wall, 2), "compute_level": rung["compute_level"],
        "recipe": rung["recipe"], "verification": bool(rung.get("verification", False)),
        "n_layer": shape[0], "n_embd": shape[1], "steps": r.step,
        "flops_per_token": r.flops_per_token, "train_s": round(r.elapsed, 2),
        "resumed": resume,
    }


def _records(state: LadderState, recipe: str | None = None, verification: bool | None = None):
    out = []
    for rec in state.results.values():
        if recipe is not None and rec.get("recipe") != recipe:
            continue
        if verification is not None and bool(rec.get("verification")) != verification:
            continue
        out.append(rec)
    return out


def choose_verification(spec: LadderSpec, stats: dict, records: list[dict], compute: float, *,
                        n_bootstrap: int = 100, seed: int = 0) -> dict:
    """Pick the verification shape for ``compute`` FLOPs and predict its loss before training.

    With an L(N, D) fit: the family shape with the lowest predicted loss at that budget (N is
    non-embedding parameters, D = compute / flops_per_token of the shape), predicted with a 95%
    prediction interval. Otherwise L(C) on the compute frontier at the shape of the best run.
    """
    from moorelm.scaling import fit as F
    from moorelm.scaling.isoflop import compute_frontier

    N = np.array([r["n_params_nonembed"] for r in records], dtype=float)
    D = np.array([r["tokens"] for r in records], dtype=float)
    C = np.array([r["flops"] for r in records], dtype=float)
    L = np.array([r["val_loss"] for r in records], dtype=float)
    notes = []
    try:
        fit = F.fit_chinchilla(N, D, L, n_bootstrap=n_bootstrap, seed=seed)
        best = None
        for shape in spec.shapes:
            s = stats[shape_name(shape)]
            steps = round(compute / (s["flops_per_token"] * spec.tokens_per_step))
            if steps < 1:
                continue
            d = steps * spec.tokens_per_step
            p = fit.predict(s["n_params_nonembed"], d, interval="prediction", seed=seed)
            if best is None or p.value < best[1].value:
                best = (shape, p, steps)
        shape, p, steps = best
        return {"shape": list(shape), "steps": steps, "val_loss": float(p.value),
                "ci95": [float(p.lo), float(p.hi)], "law": "L(N, D)", "notes": notes}
    except MoorelmError as e:
        notes.append(f"L(N, D) not fitted ({e}); predicting from L(C) on the compute frontier")
    front = compute_frontier(C, L)
    fit = F.fit_power_law(C[front], L[front], n_bootstrap=n_bootstrap, seed=seed, variable="C")
    best_rec = records[int(front[-1])]
    shape = (best_rec["n_layer"], best_rec["n_embd"])
    steps = round(compute / (stats[shape_name(shape)]["flops_per_token"] * spec.tokens_per_step))
    c = steps * spec.tokens_per_step * stats[shape_name(shape)]["flops_per_token"]
    p = fit.predict(c, interval="prediction", seed=seed)
    return {"shape": list(shape), "steps": steps, "val_loss": float(p.value),
            "ci95": [float(p.lo), float(p.hi)], "law": "L(C)", "notes": notes}


# ----------------------------------------------------------------------------- report


def write_report(out: str | Path, *, n_bootstrap: int = 100, trends: bool = True) -> Path:
    """(Re)build DIR's report from the finished runs in ladder.json (or runs.csv);
    ``trends=False`` leaves out the historical section."""
    from moorelm.scaling.records import load_records
    from moorelm.scaling.report import build_report

    out = Path(out)
    if not out.is_dir():
        raise MoorelmError(f"{out} is not a folder; pass the --out folder of a ladder")
    state = LadderState(out)
    if state.results:
        spec = _saved_spec(state)
        records = _records(state, recipe=spec.recipe)
        others = [r for r in state.results.values() if r.get("recipe") != spec.recipe]
    elif (out / "runs.csv").exists():
        spec, records, others = None, load_records(out), []
    else:
        raise MoorelmError(f"{out} has no finished runs (no {LADDER_JSON} results or runs.csv); "
                           "run 'moorelm scale --out DIR' first")
    pred = state.doc.get("prediction")
    prediction = None if not pred else {"name": pred["name"], "val_loss": pred["val_loss"],
                                        "ci95": pred["ci95"]}
    if prediction and not any(r["name"] == pred["name"] for r in records):
        prediction = None
    path = build_report(out, records, prediction=prediction, n_bootstrap=n_bootstrap,
                        param_key="n_params_nonembed", trends=trends)
    if spec is not None and spec.compare and others:
        cmp = compare_recipes(list(state.results.values()), spec.recipe, spec.baseline)
        state.doc["comparison"] = cmp
        state.save()
        build_report(out / "baseline", others, n_bootstrap=n_bootstrap,
                     param_key="n_params_nonembed", trends=False)
        png = _plot_comparison(out / "compare_recipes.png", list(state.results.values()), cmp)
        _add_section(path, "Our own algorithmic progress", comparison_sentence(cmp), png,
                     f"The {cmp['baseline']} recipe's own report: baseline/report.html.")
    return path


def _add_section(report: Path, title: str, text: str, png: Path, note: str) -> None:
    """Insert a section (text and an embedded plot) before the runs table of report.html."""
    import base64
    import html

    page = report.read_text(encoding="utf-8")
    img = base64.b64encode(png.read_bytes()).decode("ascii")
    section = (f"<h2>{html.escape(title)}</h2><div class='answer'><p>{html.escape(text)}</p></div>"
               f"<figure><img alt='{html.escape(title)}' src='data:image/png;base64,{img}'>"
               f"</figure><p class='small'>{html.escape(note)}</p>\n")
    anchor = "<h2>Runs</h2>" if "<h2>Runs</h2>" in page else "</body>"
    report.write_text(page.replace(anchor, section + anchor, 1), encoding="utf-8")


def _saved_spec(state: LadderState) -> LadderSpec:
    """The spec a ladder.json records; anything else there is one line."""
    try:
        return LadderSpec(**_spec_from_json(state.doc.get("spec", {})))
    except (TypeError, ValueError) as e:
        raise MoorelmError(f"{state.path}: 'spec' is not a ladder spec ({str(e)[:100]}); move "
                           "the file away to start afresh") from None


def _spec_from_json(d: dict) -> dict:
    d = dict(d)
    if "shapes" in d:
        d["shapes"] = tuple(tuple(s) for s in d["shapes"])
    return d


# ----------------------------------------------------------------------------- the whole job


def scale(
    out: str | Path,
    data: TokenData,
    spec: LadderSpec = LadderSpec(),
    *,
    budget_s: float | None = None,
    budget_flops: float | None = None,
    n_bootstrap: int = 100,
    trends: bool = True,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Plan (or reload the plan of) a ladder in ``out``, train its missing rungs, fit, predict
    and train the 10x verification run, and write the report. Returns ladder.json's content."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = LadderState(out)
    t_start = time.perf_counter()
    if "plan" in state.doc:
        saved = _spec_from_json(state.doc["spec"])
        if saved != _spec_from_json(asdict(spec)):
            log(f"note: {out} holds a ladder with other settings; continuing that ladder as planned")
        spec = LadderSpec(**saved)
        if state.doc["data_fingerprint"] != data.manifest["fingerprint"]:
            raise MoorelmError(f"the dataset differs from the one the ladder in {out} was planned "
                               "on; use the same corpus and tokenizer, or another --out")
        plan = Plan.from_dict(state.doc["plan"])
        stats = state.doc["stats"]
        log(f"resuming the ladder in {out}: {len(state.results)} of {len(plan.rungs)} rungs done")
    else:
        stats = shape_stats(spec, data.vocab_size)
        rates = None
        if budget_s is not None:
            rates = probe(spec, data, progress=progress)
        plan = make_plan(spec, stats, seconds=budget_s, flops=budget_flops, rates=rates,
                         spent_s=time.perf_counter() - t_start)
        state.doc = {"spec": asdict(spec), "data_fingerprint": data.manifest["fingerprint"],
                     "data_dir": str(data.folder), "stats": stats, "probe": rates,
                     "plan": plan.to_dict(), "results": {}}
        state.save()
    log(describe_plan(plan, stats))

    for i, rung in enumerate(plan.rungs, 1):
        if rung["name"] in state.results:
            log(f"[{i}/{len(plan.rungs)}] {rung['name']}: done, skipped")
            continue
        rec = run_rung(spec, data, out, rung, progress=progress)
        state.results[rung["name"]] = rec
        state.save()
        log(f"[{i}/{len(plan.rungs)}] {rung['name']}: val loss {rec['val_loss']:.4f}, "
            f"{rec['flops']:.3g} FLOPs, {rec['wall_s']:.1f}s")

    if spec.verify and plan.verify_compute:
        ladder_recs = _records(state, recipe=spec.recipe, verification=False)
        if "prediction" not in state.doc:
            try:
                pred = choose_verification(spec, stats, ladder_recs, plan.verify_compute,
                                           n_bootstrap=n_bootstrap)
            except MoorelmError as e:
                pred = None
                log(f"note: no verification run: nothing could be fitted to predict it ({e})")
            if pred is not None:
                pred["name"] = f"verify-{shape_name(tuple(pred['shape']))}"
                pred["compute"] = plan.verify_compute
                state.doc["prediction"] = pred
                state.save()
        pred = state.doc.get("prediction")
        if pred is not None and pred["name"] not in state.results:
            log(f"verification: {pred['name']}, {pred['steps']} steps at "
                f"{plan.verify_compute:.3g} FLOPs; predicted val loss {pred['val_loss']:.4f} "
                f"(95% interval {pred['ci95'][0]:.4f} to {pred['ci95'][1]:.4f}) from {pred['law']}")
            rung = {"name": pred["name"], "recipe": spec.recipe, "shape": pred["shape"],
                    "level": None, "compute_level": plan.verify_compute, "steps": pred["steps"],
                    "verification": True}
            rec = run_rung(spec, data, out, rung, progress=progress)
            state.results[pred["name"]] = rec
            state.save()
        if pred is not None:
            rec = state.results[pred["name"]]
            err = (rec["val_loss"] - pred["val_loss"]) / pred["val_loss"]
            log(f"verification: measured {rec['val_loss']:.4f} vs predicted {pred['val_loss']:.4f}"
                f" ({100 * err:+.2f}%), in {rec['wall_s']:.0f}s")

    path = write_report(out, n_bootstrap=n_bootstrap, trends=trends)
    state = LadderState(out)
    if "comparison" in state.doc:
        log(comparison_sentence(state.doc["comparison"]))
    total = sum(r["wall_s"] for r in state.results.values())
    log(f"report: {path}  (runs took {total / 60:.1f} min in all)")
    return state.doc
