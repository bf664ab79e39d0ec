"""Hoffmann et al.'s Approach 2: the compute-efficient frontier of a set of runs, and IsoFLOP
parabola minima per compute budget regressed on compute to give N_opt ~ C**a.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from moorelm.errors import MoorelmError
from moorelm.scaling.estimates import Estimate, _json_float
from moorelm.scaling.inputs import DEFAULT_FLOPS_PER_TOKEN, _check_k, _positive, _same_length


def compute_frontier(flops: Sequence[float], loss: Sequence[float]) -> np.ndarray:
    """Indices of the runs on the compute-efficient frontier, cheapest first.

    A run is on the frontier when no run that used the same or less compute reached a lower
    loss: the lower envelope of loss against compute, which is what a law L(C) describes.
    """
    cs = _positive("flops", flops)
    ys = _positive("loss", loss)
    _same_length(flops=cs, loss=ys)
    order = np.lexsort((ys, cs))
    keep, best = [], math.inf
    for i in order:
        if ys[i] < best:
            keep.append(int(i))
            best = ys[i]
    return np.array(keep, dtype=int)


@dataclass(frozen=True)
class IsoFLOPLevel:
    """One compute budget: its parabola loss = c2*u**2 + c1*u + c0 in u = ln N, and minimum."""

    compute: float
    n_runs: int
    n_opt: float | None
    loss_min: float | None
    coeffs: tuple[float, float, float] | None
    used: bool
    note: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "compute": _json_float(self.compute), "n_runs": self.n_runs,
            "n_opt": _json_float(self.n_opt), "loss_min": _json_float(self.loss_min),
            "coeffs_ln_n": None if self.coeffs is None else [_json_float(c) for c in self.coeffs],
            "used": self.used, "note": self.note,
        }


@dataclass(frozen=True)
class IsoFLOPFit:
    """N_opt = exp(log_coef) * C**a over the levels' parabola minima; D_opt = C/(k N_opt)."""

    levels: tuple[IsoFLOPLevel, ...]
    a: Estimate
    b: Estimate
    log_coef: float
    flops_per_token: float

    @property
    def n_levels_used(self) -> int:
        return sum(lv.used for lv in self.levels)

    def n_opt(self, compute: Any) -> Any:
        """The fitted compute-optimal model size at budget(s) C."""
        c = np.asarray(compute, dtype=float)
        return np.exp(self.log_coef + self.a.value * np.log(c))

    def d_opt(self, compute: Any) -> Any:
        """The matching token count, C / (k * N_opt)."""
        c = np.asarray(compute, dtype=float)
        return c / (self.flops_per_token * self.n_opt(c))

    def to_dict(self) -> dict[str, Any]:
        return {
            "law": "N_opt = exp(log_coef) * C^a, D_opt = C / (k * N_opt)",
            "method": "parabola of loss vs ln N per compute level (Hoffmann et al. 2022, Approach 2)",
            "a": self.a.to_dict(), "b": self.b.to_dict(),
            "log_coef": _json_float(self.log_coef),
            "convention": f"C = {self.flops_per_token:g} * N * D",
            "n_levels_used": self.n_levels_used,
            "levels": [lv.to_dict() for lv in self.levels],
        }


def fit_isoflop(n_params: Sequence[float], loss: Sequence[float], compute: Sequence[float], *,
                flops_per_token: float = DEFAULT_FLOPS_PER_TOKEN) -> IsoFLOPFit:
    """Approach 2: per-budget parabolas in ln N, then ln N_opt regressed on ln C.

    ``compute`` gives each run's budget; runs with exactly equal values form one IsoFLOP curve,
    so pass the nominal budget of the level, not each run's measured FLOPs. A level is used
    when it has at least 3 distinct model sizes, its parabola opens upwards and its minimum
    lies within the sizes tried (an extrapolated minimum is not trusted). At least 2 usable
    levels are needed; with 3 or more the exponent gets a t-distribution 95% interval.
    """
    k = _check_k(flops_per_token)
    ns = _positive("N", n_params)
    ys = _positive("loss", loss)
    cs = _positive("compute", compute)
    _same_length(N=ns, loss=ys, compute=cs)
    levels = []
    for c in np.unique(cs):
        sel = cs == c
        n_sel, y_sel = ns[sel], ys[sel]
        kinds = len(np.unique(n_sel))
        if kinds < 3:
            levels.append(IsoFLOPLevel(float(c), int(sel.sum()), None, None, None, False,
                                       f"only {kinds} distinct model sizes; a parabola needs 3"))
            continue
        u = np.log(n_sel)
        centre = u.mean()  # centring keeps the quadratic fit well conditioned
        c2, c1, c0 = np.polyfit(u - centre, y_sel, 2)
        # Back to coefficients in u itself.
        coeffs = (float(c2), float(c1 - 2 * c2 * centre), float(c2 * centre**2 - c1 * centre + c0))
        if c2 <= 0:
            levels.append(IsoFLOPLevel(float(c), int(sel.sum()), None, None, coeffs, False,
                                       "loss is not convex in log N here, so there is no minimum"))
            continue
        u_star = centre - c1 / (2 * c2)
        loss_min = float(c0 - c1**2 / (4 * c2))
        inside = u.min() <= u_star <= u.max()
        note = "" if inside else "minimum lies outside the model sizes tried; add sizes there"
        levels.append(IsoFLOPLevel(float(c), int(sel.sum()), float(np.exp(u_star)), loss_min,
                                   coeffs, bool(inside), note))
    used = [lv for lv in levels if lv.used]
    if len(used) < 2:
        raise MoorelmError(
            "need at least 2 compute levels, each with at least 3 distinct model sizes around "
            f"its best size, to fit IsoFLOP minima; got {len(used)} usable of {len(levels)}"
        )
    lc = np.log([lv.compute for lv in used])
    ln = np.log([lv.n_opt for lv in used])
    slope, intercept = np.polyfit(lc, ln, 1)
    ci = None
    dof = len(used) - 2
    if dof >= 1:
        resid = ln - (slope * lc + intercept)
        se = math.sqrt(float(resid @ resid) / dof / float(((lc - lc.mean()) ** 2).sum()))
        t = float(stats.t.ppf(0.975, dof))
        ci = (float(slope - t * se), float(slope + t * se))
    a = Estimate(float(slope), ci)
    b = Estimate(1.0 - float(slope), None if ci is None else (1.0 - ci[1], 1.0 - ci[0]))
    return IsoFLOPFit(tuple(levels), a, b, float(intercept), k)
