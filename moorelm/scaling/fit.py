"""Scaling-law fits: pure functions of measured runs (numpy + scipy, no torch).

Three kinds of fit, each with bootstrap (or t-distribution) 95% intervals:

* ``fit_power_law(x, loss)``: the one-variable law L(x) = E + A * x**-alpha, used for loss
  against model size N, training tokens D or compute C.
* ``fit_chinchilla(N, D, loss)``: the parametric law L(N, D) = E + A * N**-alpha + B * D**-beta,
  fitted as in Hoffmann et al. 2022 ("Training Compute-Optimal Large Language Models",
  arXiv:2203.15556, Approach 3) and Besiroglu et al. 2024's replication (arXiv:2404.10102):
  the Huber loss (delta = 1e-3) between the log of the predicted and the log of the observed
  loss is minimised with L-BFGS, where the prediction is written as
  log L = logsumexp(a - alpha*log N, b - beta*log D, e) with a, b, e = log A, log B, log E.
  Several starts are taken from a grid and the best optimum kept; runs are resampled with
  replacement for confidence intervals on every parameter.
* ``fit_isoflop(N, loss, compute)``: Approach 2. For each compute budget a parabola of loss
  against log N locates the best model size; log N_opt is then regressed on log C.

From a parametric fit, ``compute_optimal`` gives the compute-optimal split of a budget under
the convention C = k * N * D FLOPs, with k = 6 by default (about 2 FLOPs per parameter per token
for the forward pass and 4 for the backward pass, ignoring attention):

    N_opt(C) = G * (C/k)**a,  D_opt(C) = (C/k)**b / G,
    a = beta/(alpha+beta),    b = alpha/(alpha+beta),   G = (alpha*A/(beta*B))**(1/(alpha+beta)).

Bad input (too few runs, non-positive or non-finite numbers, losses that do not change, a fit
that does not converge) raises ``MoorelmError`` with a message saying what to add or fix.
Every result has ``to_dict()`` returning plain JSON-ready values (NaN becomes ``None``).

The work is spread over modules of one job each, and everything is importable from here:
``solver`` (the Huber/L-BFGS engine and its bootstrap), ``estimates`` (result values and
their intervals), ``inputs`` (input checks), ``isoflop`` (compute frontier and Approach 2).
This module holds the laws themselves: L(x), L(N, D) and the compute-optimal split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moorelm.errors import MoorelmError
from moorelm.scaling.estimates import (
    Estimate,
    Prediction,
    _band,
    _check_kind,
    _ci,
    _json_array,
    _json_float,
    _scalar_or_array,
)
from moorelm.scaling.inputs import (
    DEFAULT_FLOPS_PER_TOKEN,
    _check_bootstrap,
    _check_k,
    _check_varies,
    _positive,
    _same_length,
)
from moorelm.scaling.solver import HUBER_DELTA, _fit_lse

# Published Approach-3 fits, for comparison in reports. These are data from the papers, not
# something this module computes.
PUBLISHED_FITS: dict[str, dict[str, Any]] = {
    "hoffmann2022": {
        "E": 1.69, "A": 406.4, "alpha": 0.34, "B": 410.7, "beta": 0.28,
        "source": "Hoffmann et al. 2022, 'Training Compute-Optimal Large Language Models', "
                  "arXiv:2203.15556 (Approach 3)",
    },
    "besiroglu2024": {
        "E": 1.8172, "A": 482.01, "alpha": 0.3478, "B": 2085.43, "beta": 0.3658,
        "source": "Besiroglu et al. 2024, 'Chinchilla Scaling: A replication attempt', "
                  "arXiv:2404.10102",
    },
}


# --------------------------------------------------------------------------------------------
# L(x) = E + A x^-alpha


@dataclass(frozen=True, eq=False)
class PowerLawFit:
    """L(x) = E + A * x**-alpha fitted to runs; ``samples`` holds bootstrap [E, A, alpha]."""

    variable: str
    E: Estimate
    A: Estimate
    alpha: Estimate
    n_points: int
    x_range: tuple[float, float]
    huber_objective: float
    residual_rms: float
    samples: np.ndarray = field(repr=False)
    residuals: np.ndarray = field(repr=False)

    @property
    def n_bootstrap(self) -> int:
        return int(self.samples.shape[0])

    def predict(self, x: Any, *, interval: str = "prediction", seed: int = 0) -> Prediction:
        """The fitted loss at x, with a 95% prediction (or confidence) band."""
        _check_kind(interval)
        scalar = np.ndim(x) == 0
        xs = np.atleast_1d(_positive(self.variable, np.ravel(x)))
        value = self.E.value + self.A.value * xs ** -self.alpha.value
        s = self.samples
        curves = s[:, 0:1] + s[:, 1:2] * xs[None, :] ** -s[:, 2:3]
        lo, hi = _band(curves, self.residuals, interval, seed)
        return Prediction(*(_scalar_or_array(v, scalar) for v in (value, lo, hi)), kind=interval)

    def to_dict(self) -> dict[str, Any]:
        return {
            "law": f"L({self.variable}) = E + A*{self.variable}^-alpha",
            "E": self.E.to_dict(), "A": self.A.to_dict(), "alpha": self.alpha.to_dict(),
            "n_points": self.n_points,
            "x_range": [_json_float(v) for v in self.x_range],
            "n_bootstrap": self.n_bootstrap,
            "huber_delta": HUBER_DELTA,
            "huber_objective": _json_float(self.huber_objective),
            "residual_rms_log": _json_float(self.residual_rms),
        }


def fit_power_law(x: Sequence[float], loss: Sequence[float], *, n_bootstrap: int = 200,
                  seed: int = 0, variable: str = "x") -> PowerLawFit:
    """Fit L(x) = E + A * x**-alpha by the Huber-in-log-space method described above.

    ``variable`` names x in messages and in ``to_dict()`` ("N", "D" or "C"). Needs at least 4
    runs (3 free parameters + 1) with at least 3 distinct x. Intervals are percentile intervals
    over ``n_bootstrap`` resamples of the runs (0 for none), drawn from ``seed``.
    """
    n_bootstrap = _check_bootstrap(n_bootstrap)
    xs = _positive(variable, x)
    ys = _positive("loss", loss)
    n = _same_length(**{variable: xs, "loss": ys})
    distinct = len(np.unique(xs))
    if n < 4 or distinct < 3:
        raise MoorelmError(
            f"need at least 4 runs with at least 3 distinct values of {variable} to fit "
            f"L({variable}); got {n} runs with {distinct} distinct"
        )
    what = f"L({variable})"
    _check_varies(ys, what)
    logx, logy = np.log(xs)[:, None], np.log(ys)

    def ok(idx: np.ndarray) -> bool:
        return len(np.unique(xs[idx])) >= 3

    theta, fun, boot, resid = _fit_lse(logx, logy, n_bootstrap=n_bootstrap, seed=seed,
                                       resample_ok=ok, what=what)
    a, e, alpha = theta
    if alpha <= 0:
        raise MoorelmError(
            f"the fitted exponent of {what} is {alpha:.3g}, not positive: loss does not fall "
            f"with {variable} in these runs; check them or add runs over a wider range"
        )
    samples = np.column_stack([np.exp(boot[:, 1]), np.exp(boot[:, 0]), boot[:, 2]])
    return PowerLawFit(
        variable=variable,
        E=Estimate(float(np.exp(e)), _ci(samples[:, 0])),
        A=Estimate(float(np.exp(a)), _ci(samples[:, 1])),
        alpha=Estimate(float(alpha), _ci(samples[:, 2])),
        n_points=n,
        x_range=(float(xs.min()), float(xs.max())),
        huber_objective=float(fun * HUBER_DELTA),
        residual_rms=float(np.sqrt(np.mean(resid**2))),
        samples=samples,
        residuals=resid,
    )


# --------------------------------------------------------------------------------------------
# L(N, D) = E + A N^-alpha + B D^-beta


@dataclass(frozen=True, eq=False)
class ComputeOptimal:
    """Compute-optimal model size and data for budgets C under C = k*N*D.

    The bands are 95% confidence bands from the bootstrap fits (resamples whose exponents are
    not both positive have no optimum and are left out).
    """

    compute: Any
    flops_per_token: float
    n_opt: Prediction
    d_opt: Prediction
    tokens_per_param: Prediction
    a: Estimate
    b: Estimate

    def to_dict(self) -> dict[str, Any]:
        return {
            "convention": f"C = {self.flops_per_token:g} * N * D",
            "compute": _json_array(self.compute),
            "n_opt": self.n_opt.to_dict(),
            "d_opt": self.d_opt.to_dict(),
            "tokens_per_param": self.tokens_per_param.to_dict(),
            "a": self.a.to_dict(),
            "b": self.b.to_dict(),
        }


def _log_allocation(E, A, alpha, B, beta, log_c):
    """log N_opt and log D_opt for log(C/k); parameters may be arrays (broadcast)."""
    s = alpha + beta
    log_g = (np.log(alpha) + np.log(A) - np.log(beta) - np.log(B)) / s
    log_n = log_g + (beta / s) * log_c
    log_d = -log_g + (alpha / s) * log_c
    return log_n, log_d


@dataclass(frozen=True, eq=False)
class ChinchillaFit:
    """L(N, D) = E + A*N**-alpha + B*D**-beta; ``samples`` holds bootstrap [E, A, alpha, B, beta]."""

    E: Estimate
    A: Estimate
    alpha: Estimate
    B: Estimate
    beta: Estimate
    n_runs: int
    n_range: tuple[float, float]
    d_range: tuple[float, float]
    huber_objective: float
    residual_rms: float
    samples: np.ndarray = field(repr=False)
    residuals: np.ndarray = field(repr=False)

    @property
    def n_bootstrap(self) -> int:
        return int(self.samples.shape[0])

    @property
    def params(self) -> tuple[float, float, float, float, float]:
        """Point estimates (E, A, alpha, B, beta)."""
        return (self.E.value, self.A.value, self.alpha.value, self.B.value, self.beta.value)

    def _valid_samples(self) -> np.ndarray:
        s = self.samples
        return s[(s[:, 2] > 0) & (s[:, 4] > 0)]

    def _exponent_estimate(self, fn) -> Estimate:
        s = self._valid_samples()
        return Estimate(float(fn(self.alpha.value, self.beta.value)), _ci(fn(s[:, 2], s[:, 4])))

    @property
    def allocation_exponents(self) -> tuple[Estimate, Estimate]:
        """(a, b) with N_opt ~ C**a and D_opt ~ C**b; a + b = 1."""
        return (self._exponent_estimate(lambda al, be: be / (al + be)),
                self._exponent_estimate(lambda al, be: al / (al + be)))

    @property
    def compute_exponent(self) -> Estimate:
        """gamma in L_opt(C) - E ~ C**-gamma along the compute-optimal frontier.

        Substituting N_opt and D_opt, both reducible terms scale as (C/k)**-(alpha*beta/(alpha+beta)),
        so gamma = alpha*beta/(alpha+beta) exactly.
        """
        return self._exponent_estimate(lambda al, be: al * be / (al + be))

    def predict(self, n_params: Any, tokens: Any, *, interval: str = "prediction",
                seed: int = 0) -> Prediction:
        """The fitted loss at (N, D) (broadcast against each other) with a 95% band."""
        _check_kind(interval)
        scalar = np.ndim(n_params) == 0 and np.ndim(tokens) == 0
        n_arr, d_arr = np.broadcast_arrays(np.atleast_1d(np.asarray(n_params, dtype=float)),
                                           np.atleast_1d(np.asarray(tokens, dtype=float)))
        ns = _positive("N", n_arr.ravel())
        ds = _positive("D", d_arr.ravel())
        E, A, alpha, B, beta = self.params
        value = E + A * ns**-alpha + B * ds**-beta
        s = self.samples
        curves = (s[:, 0:1] + s[:, 1:2] * ns[None, :] ** -s[:, 2:3]
                  + s[:, 3:4] * ds[None, :] ** -s[:, 4:5])
        lo, hi = _band(curves, self.residuals, interval, seed)
        shape = n_arr.shape
        out = [v.reshape(shape) for v in (value, lo, hi)]
        return Prediction(*(_scalar_or_array(v, scalar) for v in out), kind=interval)

    def compute_optimal(self, compute: Any, *,
                        flops_per_token: float = DEFAULT_FLOPS_PER_TOKEN) -> ComputeOptimal:
        """N_opt, D_opt and tokens per parameter for budget(s) C; see the module docstring."""
        return compute_optimal(self, compute, flops_per_token=flops_per_token)

    def optimal_loss(self, compute: Any, *,
                     flops_per_token: float = DEFAULT_FLOPS_PER_TOKEN) -> Prediction:
        """The loss of the compute-optimal model at budget(s) C, with a 95% confidence band."""
        scalar = np.ndim(compute) == 0
        log_c = np.log(_positive("C", np.atleast_1d(compute)) / _check_k(flops_per_token))
        E, A, alpha, B, beta = self.params
        log_n, log_d = _log_allocation(E, A, alpha, B, beta, log_c)
        value = E + A * np.exp(-alpha * log_n) + B * np.exp(-beta * log_d)
        s = self._valid_samples()
        col = [s[:, i : i + 1] for i in range(5)]
        ln, ld = _log_allocation(*col, log_c[None, :])
        curves = col[0] + col[1] * np.exp(-col[2] * ln) + col[3] * np.exp(-col[4] * ld)
        lo, hi = _band(curves, self.residuals, "confidence", 0)
        return Prediction(*(_scalar_or_array(v, scalar) for v in (value, lo, hi)), kind="confidence")

    def to_dict(self) -> dict[str, Any]:
        a, b = self.allocation_exponents
        return {
            "law": "L(N, D) = E + A*N^-alpha + B*D^-beta",
            "method": "Huber (delta=1e-3) on log loss, L-BFGS from a grid (Hoffmann et al. 2022, Approach 3)",
            "E": self.E.to_dict(), "A": self.A.to_dict(), "alpha": self.alpha.to_dict(),
            "B": self.B.to_dict(), "beta": self.beta.to_dict(),
            "a": a.to_dict(), "b": b.to_dict(),
            "compute_exponent": self.compute_exponent.to_dict(),
            "n_runs": self.n_runs,
            "n_range": [_json_float(v) for v in self.n_range],
            "d_range": [_json_float(v) for v in self.d_range],
            "n_bootstrap": self.n_bootstrap,
            "huber_delta": HUBER_DELTA,
            "huber_objective": _json_float(self.huber_objective),
            "residual_rms_log": _json_float(self.residual_rms),
        }


def fit_chinchilla(n_params: Sequence[float], tokens: Sequence[float], loss: Sequence[float], *,
                   n_bootstrap: int = 100, seed: int = 0) -> ChinchillaFit:
    """Fit L(N, D) = E + A*N**-alpha + B*D**-beta (Hoffmann et al. 2022, Approach 3).

    Needs at least 6 runs (5 free parameters + 1) covering at least 2 distinct model sizes and
    2 distinct token counts. The point fit runs L-BFGS from the 20 best points of the grid;
    each of ``n_bootstrap`` resamples of the runs (drawn from ``seed``) starts from the best
    two distinct optima those starts reached. Intervals are bootstrap percentiles.
    """
    n_bootstrap = _check_bootstrap(n_bootstrap)
    ns = _positive("N", n_params)
    ds = _positive("D", tokens)
    ys = _positive("loss", loss)
    n = _same_length(N=ns, D=ds, loss=ys)
    kn, kd = len(np.unique(ns)), len(np.unique(ds))
    if n < 6 or kn < 2 or kd < 2:
        raise MoorelmError(
            "need at least 6 runs with at least 2 distinct model sizes and 2 distinct token "
            f"counts to fit L(N, D); got {n} runs ({kn} sizes, {kd} token counts)"
        )
    _check_varies(ys, "L(N, D)")
    logx = np.column_stack([np.log(ns), np.log(ds)])
    logy = np.log(ys)

    def ok(idx: np.ndarray) -> bool:
        return len(np.unique(ns[idx])) >= 2 and len(np.unique(ds[idx])) >= 2

    theta, fun, boot, resid = _fit_lse(logx, logy, n_bootstrap=n_bootstrap, seed=seed,
                                       resample_ok=ok, what="L(N, D)")
    a, b, e, alpha, beta = theta
    for name, value, var in (("alpha", alpha, "model size"), ("beta", beta, "training tokens")):
        if value <= 0:
            raise MoorelmError(
                f"the fitted exponent {name} is {value:.3g}, not positive: loss does not fall "
                f"with {var} in these runs; check them or add runs over a wider range"
            )
    samples = np.column_stack([np.exp(boot[:, 2]), np.exp(boot[:, 0]), boot[:, 3],
                               np.exp(boot[:, 1]), boot[:, 4]])
    values = (np.exp(e), np.exp(a), alpha, np.exp(b), beta)
    ests = [Estimate(float(v), _ci(samples[:, i])) for i, v in enumerate(values)]
    return ChinchillaFit(
        *ests,
        n_runs=n,
        n_range=(float(ns.min()), float(ns.max())),
        d_range=(float(ds.min()), float(ds.max())),
        huber_objective=float(fun * HUBER_DELTA),
        residual_rms=float(np.sqrt(np.mean(resid**2))),
        samples=samples,
        residuals=resid,
    )


def compute_optimal(fit: ChinchillaFit, compute: Any, *,
                    flops_per_token: float = DEFAULT_FLOPS_PER_TOKEN) -> ComputeOptimal:
    """Split budget(s) C into N_opt and D_opt under C = flops_per_token * N * D.

    Minimising E + A*N**-alpha + B*D**-beta subject to N*D = C/k gives the formulas in the
    module docstring. Returns floats for a scalar C and arrays for a sequence.
    """
    if not isinstance(fit, ChinchillaFit):
        raise MoorelmError("compute_optimal needs a fit from fit_chinchilla")
    k = _check_k(flops_per_token)
    scalar = np.ndim(compute) == 0
    cs = _positive("C", np.atleast_1d(compute))
    log_c = np.log(cs / k)
    E, A, alpha, B, beta = fit.params
    log_n, log_d = _log_allocation(E, A, alpha, B, beta, log_c)
    s = fit._valid_samples()
    col = [s[:, i : i + 1] for i in range(5)]
    bn, bd = _log_allocation(*col, log_c[None, :])

    def pred(point: np.ndarray, boot: np.ndarray) -> Prediction:
        lo, hi = _band(np.exp(boot), np.empty(0), "confidence", 0)
        return Prediction(*(_scalar_or_array(v, scalar) for v in (np.exp(point), lo, hi)),
                          kind="confidence")

    a, b = fit.allocation_exponents
    return ComputeOptimal(
        compute=_scalar_or_array(cs, scalar),
        flops_per_token=k,
        n_opt=pred(log_n, bn),
        d_opt=pred(log_d, bd),
        tokens_per_param=pred(log_d - log_n, bd - bn),
        a=a,
        b=b,
    )


def tokens_per_parameter(fit: ChinchillaFit, compute: Any, *,
                         flops_per_token: float = DEFAULT_FLOPS_PER_TOKEN) -> Prediction:
    """D_opt / N_opt at budget(s) C (about 20 for Chinchilla at its scale)."""
    return compute_optimal(fit, compute, flops_per_token=flops_per_token).tokens_per_param


# --------------------------------------------------------------------------------------------


def predict(fit: PowerLawFit | ChinchillaFit, *points: Any, interval: str = "prediction",
            seed: int = 0) -> Prediction:
    """Evaluate a fitted law at new points: ``predict(power_fit, x)`` or
    ``predict(chinchilla_fit, N, D)``, with a 95% band from the bootstrap fits.
    """
    if isinstance(fit, PowerLawFit):
        if len(points) != 1:
            raise MoorelmError(f"a fit of L({fit.variable}) is evaluated at one input; got {len(points)}")
        return fit.predict(points[0], interval=interval, seed=seed)
    if isinstance(fit, ChinchillaFit):
        if len(points) != 2:
            raise MoorelmError(f"L(N, D) is evaluated at (N, D); got {len(points)} inputs")
        return fit.predict(points[0], points[1], interval=interval, seed=seed)
    raise MoorelmError(f"cannot predict from a {type(fit).__name__}; pass a power-law or L(N, D) fit")
