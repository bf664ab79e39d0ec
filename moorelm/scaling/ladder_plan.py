"""Planning a scaling ladder: the spec and its shapes, each rung's configs, parameter and
FLOP counts per shape, the throughput probe, and the plan that fits a wall-clock or FLOPs
budget.
"""

from __future__ import annotations

import math
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from moorelm.config import DEFAULT_RECIPE, ModelConfig, TrainConfig, build_configs, get_recipe
from moorelm.data import TokenData
from moorelm.errors import MoorelmError

BASELINE_RECIPE = "gpt2-baseline"
VERIFY_FACTOR = 10.0  # the verification run gets this many times the largest rung's compute
SAFETY = 0.9  # plan to this fraction of the wall-clock budget: the machine's load varies
# (n_layer, n_embd) at head size 16: non-embedding parameters 3.1k to 307k (2.0 decades),
# small enough that a useful ladder and its 10x check fit half an hour on two CPU cores
DEFAULT_SHAPES = ((1, 16), (2, 16), (2, 32), (2, 48), (3, 64), (4, 80))


MAX_SPAN = 1e12  # the most the ladder's levels may span in compute (top / lowest)
MAX_FLOPS = 1e30  # the largest FLOPs budget taken (GPT-4's training is estimated at ~2e25)
MAX_SECONDS = 366 * 24 * 3600.0  # the longest wall-clock budget taken


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
        if not (isinstance(self.level_ratio, (int, float)) and self.level_ratio > 1
                and math.isfinite(self.level_ratio)):  # NaN and inf too
            raise MoorelmError(f"--level-ratio must be a finite number > 1, got {self.level_ratio}")
        # the top level's compute over the lowest's; beyond MAX_SPAN the lowest levels' rungs
        # round to fewer steps than min_steps in float arithmetic, and no budget a ladder is
        # run with spans more
        decades = (self.levels - 1) * math.log10(self.level_ratio)
        if decades > math.log10(MAX_SPAN):
            raise MoorelmError(
                f"--level-ratio {self.level_ratio:g} over {self.levels} levels spans 1e{decades:.0f} "
                f"in compute; at most {MAX_SPAN:.0e} (fewer levels or a smaller ratio)")
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
    if value > MAX_SECONDS:  # inf too
        raise MoorelmError(f"budget {text!r} is more than a year; write at most "
                           f"{MAX_SECONDS / 3600:.0f}h")
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
    from moorelm.training.loop import train

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
