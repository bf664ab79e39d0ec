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
"""

from __future__ import annotations

import math
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moorelm import checkpoint as ckpt
from moorelm.atomic import atomic_write_json
from moorelm.config import DEFAULT_RECIPE, ModelConfig, TrainConfig, build_configs, get_recipe
from moorelm.data import TokenData
from moorelm.errors import MoorelmError

LADDER_JSON = "ladder.json"
BASELINE_RECIPE = "gpt2-baseline"
VERIFY_FACTOR = 10.0  # the verification run gets this many times the largest rung's compute
SAFETY = 0.9  # plan to this fraction of the wall-clock budget: the machine's load varies
# (n_layer, n_embd) at head size 16: non-embedding parameters 3.1k to 307k (2.0 decades),
# small enough that a useful ladder and its 10x check fit half an hour on two CPU cores
DEFAULT_SHAPES = ((1, 16), (2, 16), (2, 32), (2, 48), (3, 64), (4, 80))


@dataclass(frozen=True)
class LadderSpec:
    """Everything that defines a ladder besides its budget and data."""

    shapes: tuple[tuple[int, int], ...] = DEFAULT_SHAPES
    head_dim: int = 16
    seq_len: int = 64
    batch_size: int = 16
    levels: int = 3
    sizes_per_level: int = 4
    level_ratio: float = 4.0
    min_steps: int = 20
    eval_iters: int = 16
    recipe: str = DEFAULT_RECIPE
    compare: bool = False  # also train the baseline recipe on the same rungs
    baseline: str = BASELINE_RECIPE
    verify: bool = True
    threads: int | None = 1  # one thread: on a shared, loaded CPU two threads run slower
    device: str = "auto"
    seed: int = 1337
    probe_steps: int = 5

    def __post_init__(self) -> None:
        if not self.shapes:
            raise MoorelmError("the ladder needs at least one shape (--shapes 2x64,4x128)")
        for n_layer, n_embd in self.shapes:
            if n_layer < 1 or n_embd < self.head_dim or n_embd % self.head_dim:
                raise MoorelmError(
                    f"shape {n_layer}x{n_embd} is invalid: n_layer must be >= 1 and n_embd a "
                    f"multiple of the head size {self.head_dim}")
        if self.levels < 1 or self.sizes_per_level < 1:
            raise MoorelmError("--levels and --sizes-per-level must be >= 1")
        if self.level_ratio <= 1:
            raise MoorelmError(f"--level-ratio must be > 1, got {self.level_ratio}")
        for name in ("seq_len", "batch_size", "min_steps", "eval_iters", "probe_steps", "head_dim"):
            if getattr(self, name) < 1:
                raise MoorelmError(f"{name} must be >= 1, got {getattr(self, name)}")
        get_recipe(self.recipe)
        if self.compare:
            get_recipe(self.baseline)
            if self.baseline == self.recipe:
                raise MoorelmError(f"--compare-recipes needs a recipe other than {self.baseline!r}")

    @property
    def recipes(self) -> tuple[str, ...]:
        return (self.recipe, self.baseline) if self.compare else (self.recipe,)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


def shape_name(shape: tuple[int, int]) -> str:
    return f"L{shape[0]}C{shape[1]}"


def parse_shapes(text: str) -> tuple[tuple[int, int], ...]:
    """'1x32,2x64' -> ((1, 32), (2, 64)), sorted by size."""
    out = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", part)
        if not m:
            raise MoorelmError(f"shape {part.strip()!r} is not N_LAYERxN_EMBD (e.g. 2x64)")
        out.append((int(m.group(1)), int(m.group(2))))
    return tuple(sorted(set(out), key=lambda s: s[0] * s[1] * s[1]))


def parse_duration(text: str) -> float:
    """'30m', '90s', '1.5h' or a plain number of seconds -> seconds."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*([smh]?)\s*", str(text).lower())
    if not m:
        raise MoorelmError(f"budget {text!r} is not a duration; write e.g. 30m, 90s or 1.5h")
    value = float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]
    if value <= 0:
        raise MoorelmError(f"budget {text!r} must be positive")
    return value


# ----------------------------------------------------------------------------- configs


def rung_configs(spec: LadderSpec, shape: tuple[int, int], recipe: str, vocab_size: int,
                 steps: int) -> tuple[ModelConfig, TrainConfig]:
    """The model and training config of one rung: the recipe at this shape, ``steps`` steps.

    Warmup is 10% of the run capped at the recipe's own warmup, so short rungs still reach
    their peak learning rate; evaluation happens once, at the end, on the same val batches.
    """
    n_layer, n_embd = shape
    warmup = get_recipe(recipe).train.get("warmup_steps", 0)
    train = dict(batch_size=spec.batch_size, grad_accum=1, max_steps=steps,
                 warmup_steps=min(warmup, max(1, steps // 10)), eval_interval=0,
                 eval_iters=spec.eval_iters, log_interval=max(1, steps // 20),
                 ckpt_interval=steps // 2 if steps >= 200 else 0, keep_checkpoints=1, threads=spec.threads,
                 device=spec.device, seed=spec.seed)
    model = dict(n_layer=n_layer, n_embd=n_embd, n_head=n_embd // spec.head_dim,
                 seq_len=spec.seq_len, vocab_size=vocab_size)
    return build_configs(recipe=recipe, model_overrides=model, train_overrides=train)


def shape_stats(spec: LadderSpec, vocab_size: int) -> dict[str, dict[str, float]]:
    """Parameters and training FLOPs per token of every shape (the same for every recipe
    up to embeddings; counted under the main recipe)."""
    from moorelm.model import GPT

    out = {}
    for shape in spec.shapes:
        mcfg, _ = rung_configs(spec, shape, spec.recipe, vocab_size, 1)
        model = GPT(mcfg)
        p = model.param_counts()
        out[shape_name(shape)] = {"n_params": p["total"], "n_params_nonembed": p["non_embedding"],
                                  "flops_per_token": model.flops_per_token(spec.seq_len)}
    return out


# ----------------------------------------------------------------------------- probe and plan


def probe(spec: LadderSpec, data: TokenData, *, progress: bool = True) -> dict[str, dict]:
    """Seconds per training step and fixed per-run overhead of every (recipe, shape), measured
    with a few real steps of ``train`` on this machine."""
    from moorelm.train import train

    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="moorelm-probe-") as tmp:
        for recipe in spec.recipes:
            for shape in spec.shapes:
                mcfg, tcfg = rung_configs(spec, shape, recipe, data.vocab_size, spec.probe_steps)
                tcfg = TrainConfig.from_dict({**tcfg.to_dict(), "eval_iters": 1, "log_interval": 1,
                                              "ckpt_interval": 0})
                t0 = time.perf_counter()
                r = train(mcfg, tcfg, data, Path(tmp) / f"{recipe}-{shape_name(shape)}",
                          progress=False)
                wall = time.perf_counter() - t0
                # the first step pays for allocation; time the rest
                rates = [float(h["tokens_per_s"]) for h in r.history[1:]] or [r.tokens_per_s]
                step_s = spec.tokens_per_step / float(np.median(rates))
                out[f"{recipe}/{shape_name(shape)}"] = {
                    "step_s": step_s, "overhead_s": max(0.0, wall - r.elapsed)}
                if progress:
                    print(f"probe {recipe:>14} {shape_name(shape):>8}: {step_s * 1e3:8.1f} ms/step")
    # per-run overhead (building the model, checkpoint, plot) hardly depends on the shape, and
    # the first probe also pays for imports; the median is the fairer estimate
    overhead = float(np.median([r["overhead_s"] for r in out.values()]))
    for r in out.values():
        r["overhead_s"] = overhead
    return out


@dataclass
class Plan:
    """Rungs (name, recipe, shape, level, compute, steps) and what they should cost."""

    rungs: list[dict]
    levels: list[float]
    verify_compute: float | None
    est_seconds: float | None
    est_flops: float
    budget: dict
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        return cls(**d)


def _windows(spec: LadderSpec) -> list[list[int]]:
    """Shape indices trained at each level: a window sliding from the smallest shapes at the
    lowest level to the largest at the highest."""
    m = len(spec.shapes)
    w = min(spec.sizes_per_level, m)
    out = []
    for j in range(spec.levels):
        start = 0 if spec.levels == 1 else round(j * (m - w) / (spec.levels - 1))
        out.append(list(range(start, start + w)))
    return out


def _layout(spec: LadderSpec, stats: dict, c0: float) -> tuple[list[dict], list[float]]:
    levels = [c0 * spec.level_ratio**j for j in range(spec.levels)]
    rungs = []
    for recipe in spec.recipes:
        for j, window in enumerate(_windows(spec)):
            for i in window:
                shape = spec.shapes[i]
                fpt = stats[shape_name(shape)]["flops_per_token"]
                steps = round(levels[j] / (fpt * spec.tokens_per_step))
                if steps < spec.min_steps:
                    continue
                rungs.append({"name": f"{recipe}-c{j}-{shape_name(shape)}", "recipe": recipe,
                              "shape": list(shape), "level": j, "compute_level": levels[j],
                              "steps": steps})
    return rungs, levels


def _cost(spec: LadderSpec, stats: dict, rates: dict | None, rungs: list[dict],
          verify_c: float | None) -> tuple[float, float | None]:
    """(FLOPs, seconds or None without a probe) of the rungs plus the verification run."""
    flops, secs = 0.0, 0.0

    def run_cost(recipe: str, shape: tuple[int, int], steps: int) -> tuple[float, float]:
        key = shape_name(shape)
        f = stats[key]["flops_per_token"] * steps * spec.tokens_per_step
        if rates is None:
            return f, 0.0
        r = rates[f"{recipe}/{key}"]
        # evaluation: eval_iters forward passes, about a third of a training step each
        return f, steps * r["step_s"] + spec.eval_iters * r["step_s"] / 3 + r["overhead_s"]

    for r in rungs:
        f, s = run_cost(r["recipe"], tuple(r["shape"]), r["steps"])
        flops, secs = flops + f, secs + s
    if verify_c is not None:
        # the verification shape is chosen after the fits; plan for the slowest per FLOP of
        # the top level's shapes so the plan is not overrun
        top = [r for r in rungs if r["recipe"] == spec.recipe]
        top_level = max(r["level"] for r in top)
        worst_f, worst_s = 0.0, 0.0
        for r in top:
            if r["level"] != top_level:
                continue
            shape = tuple(r["shape"])
            steps = round(verify_c / (stats[shape_name(shape)]["flops_per_token"] * spec.tokens_per_step))
            f, s = run_cost(spec.recipe, shape, steps)
            worst_f, worst_s = max(worst_f, f), max(worst_s, s)
        flops, secs = flops + worst_f, secs + worst_s
    return flops, (secs if rates is not None else None)


def make_plan(spec: LadderSpec, stats: dict, *, seconds: float | None = None,
              flops: float | None = None, rates: dict | None = None,
              spent_s: float = 0.0) -> Plan:
    """Choose C_0 so the whole plan fits the wall-clock ``seconds`` (with ``rates`` from
    ``probe``; ``spent_s`` already used, e.g. by the probe) or the FLOPs budget ``flops``."""
    if (seconds is None) == (flops is None):
        raise MoorelmError("give exactly one budget: --budget (wall clock) or --budget-flops")
    if seconds is not None and rates is None:
        raise MoorelmError("a wall-clock budget needs a throughput probe")
    limit = flops if flops is not None else SAFETY * seconds - spent_s

    def evaluate(c0: float):
        rungs, levels = _layout(spec, stats, c0)
        if not any(r["recipe"] == spec.recipe for r in rungs):
            return rungs, levels, None, 0.0, 0.0
        top = max(r["compute_level"] for r in rungs if r["recipe"] == spec.recipe)
        vc = VERIFY_FACTOR * top if spec.verify else None
        f, s = _cost(spec, stats, rates, rungs, vc)
        return rungs, levels, vc, f, s

    def used(c0: float) -> float:
        _, _, _, f, s = evaluate(c0)
        return f if flops is not None else s

    # the smallest C_0 at which one rung (the cheapest shape at the top level) gets min_steps
    fpt_min = min(stats[shape_name(spec.shapes[i])]["flops_per_token"] for i in _windows(spec)[-1])
    lo = fpt_min * spec.tokens_per_step * spec.min_steps / spec.level_ratio ** (spec.levels - 1)
    if limit <= 0 or used(lo) > limit:
        need = used(lo)
        what = (f"{flops:.3g} FLOPs" if flops is not None else f"{seconds:.0f}s")
        unit = "FLOPs" if flops is not None else "s"
        raise MoorelmError(
            f"budget {what} is too small for even one rung of {spec.min_steps} steps "
            f"(the cheapest plan needs about {need:.3g} {unit}"
            + ("" if flops is not None else f" after {spent_s:.0f}s of probing") + "); raise the budget")
    hi = lo
    while used(hi) <= limit:
        lo, hi = hi, hi * 2
    for _ in range(40):  # bisection in log space on a non-decreasing cost
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if used(mid) <= limit else (lo, mid)
    rungs, levels, vc, f, s = evaluate(lo)
    notes = []
    dropped = sum(len(w) for w in _windows(spec)) * len(spec.recipes) - len(rungs)
    if dropped:
        notes.append(f"{dropped} rung(s) left out: they would get fewer than {spec.min_steps} steps")
    ns = [stats[shape_name(tuple(r["shape"]))]["n_params_nonembed"] for r in rungs]
    decades = math.log10(max(ns) / min(ns))
    if decades < 1.5:
        notes.append(f"the rungs span {decades:.2f} decades of non-embedding parameters "
                     "(fewer than 1.5); a larger budget or more shapes widen it")
    budget = {"seconds": seconds, "flops": flops, "probe_s": spent_s}
    return Plan(rungs, levels, vc, s if rates is not None else None, f, budget, notes)


def describe_plan(plan: Plan, stats: dict) -> str:
    lines = [f"ladder: {len(plan.rungs)} rungs at compute levels "
             + ", ".join(f"{c:.3g}" for c in plan.levels) + " FLOPs"]
    for r in plan.rungs:
        s = stats[shape_name(tuple(r["shape"]))]
        lines.append(f"  {r['name']:<28} N={s['n_params_nonembed']:>9,}  C={r['compute_level']:.3g}"
                     f"  {r['steps']:>6} steps")
    if plan.verify_compute:
        lines.append(f"  verification run: C={plan.verify_compute:.3g} FLOPs (10x the largest rung)")
    est = f"{plan.est_seconds / 60:.1f} min" if plan.est_seconds is not None else "n/a"
    lines.append(f"estimated: {plan.est_flops:.3g} FLOPs, wall time {est}")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- running rungs


class LadderState:
    """DIR/ladder.json: spec, stats, probe, plan, per-rung results, prediction, comparison."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = self.out / LADDER_JSON
        self.doc: dict[str, Any] = {}
        if self.path.exists():
            import json

            try:
                self.doc = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise MoorelmError(f"{self.path} is unreadable ({e}); move it away to start afresh") from None

    @property
    def results(self) -> dict[str, dict]:
        return self.doc.setdefault("results", {})

    def save(self) -> None:
        atomic_write_json(self.path, self.doc)


def run_rung(spec: LadderSpec, data: TokenData, out: Path, rung: dict, *,
             progress: bool = True) -> dict:
    """Train one rung into out/runs/NAME (resuming a partial run) and return its record."""
    from moorelm.train import train

    shape = tuple(rung["shape"])
    mcfg, tcfg = rung_configs(spec, shape, rung["recipe"], data.vocab_size, rung["steps"])
    run_dir = out / "runs" / rung["name"]
    resume = bool(ckpt.list_checkpoints(run_dir))
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
    front = F.compute_frontier(C, L)
    fit = F.fit_power_law(C[front], L[front], n_bootstrap=n_bootstrap, seed=seed, variable="C")
    best_rec = records[int(front[-1])]
    shape = (best_rec["n_layer"], best_rec["n_embd"])
    steps = round(compute / (stats[shape_name(shape)]["flops_per_token"] * spec.tokens_per_step))
    c = steps * spec.tokens_per_step * stats[shape_name(shape)]["flops_per_token"]
    p = fit.predict(c, interval="prediction", seed=seed)
    return {"shape": list(shape), "steps": steps, "val_loss": float(p.value),
            "ci95": [float(p.lo), float(p.hi)], "law": "L(C)", "notes": notes}


# ----------------------------------------------------------------------------- recipes


def compare_recipes(records: list[dict], recipe: str, baseline: str) -> dict:
    """Compute each recipe needs to reach one loss, and their ratio (the algorithmic-progress
    factor of ``recipe`` over ``baseline``).

    Each recipe's frontier is its best run per compute level (runs of one level share a budget,
    so their small differences in FLOPs are not progress), reduced to the lower envelope of loss
    against compute; log C is interpolated linearly in loss along it. The target is the lowest
    loss both frontiers reach. When one recipe's cheapest level is already below the target,
    its compute is an upper bound and the factor a bound too; ``factor_kind`` says which.
    """
    from moorelm.scaling import fit as F

    fronts = {}
    for name in (recipe, baseline):
        best: dict[float, dict] = {}
        for r in records:
            if r.get("recipe") != name or r.get("verification"):
                continue
            level = float(r.get("compute_level") or r["flops"])
            if level not in best or r["val_loss"] < best[level]["val_loss"]:
                best[level] = r
        if len(best) < 2:
            raise MoorelmError(f"need finished runs of recipe {name!r} at 2 or more compute "
                               f"levels to compare recipes; got {len(best)}")
        C = np.array([r["flops"] for r in best.values()], dtype=float)
        L = np.array([r["val_loss"] for r in best.values()], dtype=float)
        idx = F.compute_frontier(C, L)
        fronts[name] = (C[idx], L[idx])
    target = max(float(L.min()) for _, L in fronts.values())
    compute, bound = {}, {}
    for name, (C, L) in fronts.items():
        if target >= L[0]:  # the cheapest run already reaches it
            compute[name], bound[name] = float(C[0]), "at most"
        else:  # L decreases along the frontier; np.interp needs increasing x
            compute[name] = float(np.exp(np.interp(target, L[::-1], np.log(C[::-1]))))
            bound[name] = "exact"
    factor = compute[baseline] / compute[recipe]
    kind = "exact"
    if bound[recipe] == "at most" and bound[baseline] == "exact":
        kind = "at least"
    elif bound[baseline] == "at most" and bound[recipe] == "exact":
        kind = "at most"
    elif bound[recipe] == bound[baseline] == "at most":
        kind = "undetermined"
    return {"recipe": recipe, "baseline": baseline, "target_loss": target, "compute": compute,
            "factor": factor, "factor_kind": kind,
            "frontiers": {k: {"flops": v[0].tolist(), "val_loss": v[1].tolist()}
                          for k, v in fronts.items()}}


def _factor_text(cmp: dict) -> str:
    qual = {"exact": "", "at least": "at least ", "at most": "at most ",
            "undetermined": "(bounded on both sides, so undetermined) "}[cmp["factor_kind"]]
    return f"{qual}{cmp['factor']:.2f}x"


def comparison_sentence(cmp: dict) -> str:
    c = cmp["compute"]
    return (f"To reach a validation loss of {cmp['target_loss']:.4g}, the {cmp['baseline']} recipe "
            f"needed {c[cmp['baseline']]:.3g} FLOPs and the {cmp['recipe']} recipe "
            f"{c[cmp['recipe']]:.3g}: an algorithmic-progress factor of {_factor_text(cmp)}, "
            "measured on this machine along each recipe's compute frontier.")


def _plot_comparison(path: Path, records: list[dict], cmp: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, color in ((cmp["recipe"], "tab:blue"), (cmp["baseline"], "tab:orange")):
        rs = [r for r in records if r.get("recipe") == name and not r.get("verification")]
        ax.scatter([r["flops"] for r in rs], [r["val_loss"] for r in rs], s=18, color=color,
                   alpha=0.6)
        f = cmp["frontiers"][name]
        ax.plot(f["flops"], f["val_loss"], color=color, marker="o", label=f"{name} frontier")
        ax.axvline(cmp["compute"][name], color=color, linestyle=":", linewidth=1)
    ax.axhline(cmp["target_loss"], color="0.4", linestyle="--", linewidth=1,
               label=f"target loss {cmp['target_loss']:.3f}")
    ax.set_xscale("log")
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"compute to reach the same loss: factor {_factor_text(cmp)}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- report


def write_report(out: str | Path, *, n_bootstrap: int = 100, trends: bool = True) -> Path:
    """(Re)build DIR's report from the finished runs in ladder.json (or runs.csv);
    ``trends=False`` leaves out the historical section."""
    from moorelm.scaling.report import build_report, load_records

    out = Path(out)
    if not out.is_dir():
        raise MoorelmError(f"{out} is not a folder; pass the --out folder of a ladder")
    state = LadderState(out)
    if state.results:
        spec = LadderSpec(**_spec_from_json(state.doc.get("spec", {})))
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
