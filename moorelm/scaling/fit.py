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
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import optimize, stats

from moorelm.errors import MoorelmError

HUBER_DELTA = 1e-3
"""Huber threshold on log-loss residuals, as in Hoffmann et al. 2022."""

DEFAULT_FLOPS_PER_TOKEN = 6.0
"""k in C = k * N * D: training FLOPs per parameter per token (forward 2 + backward 4)."""

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

# Starting grid for the optimiser, the one Hoffmann et al. describe: exponents in
# {0, 0.5, ..., 2}, log-coefficients in {0, 5, ..., 25}, log E in {-1, -0.5, ..., 1}.
_GRID_COEF = np.arange(0.0, 25.1, 5.0)
_GRID_E = np.arange(-1.0, 1.01, 0.5)
_GRID_EXP = np.arange(0.0, 2.01, 0.5)

# L-BFGS runs for the point estimate: the best grid points after screening, by number of inputs
# (the one-input grid has 150 points, the two-input grid 4500).
_MAIN_STARTS = {1: 10, 2: 20}
_BOOT_STARTS = 2  # starts per bootstrap resample: the best distinct optima of the full-data fit
_MAXITER = 1000
_MIN_BOOT_FOR_CI = 5  # fewer successful resamples than this give no interval


# --------------------------------------------------------------------------------------------
# Small result types


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


# --------------------------------------------------------------------------------------------
# Input checks


def _positive(name: str, values: Any) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        raise MoorelmError(f"{name} must be a list of numbers; got {str(values)[:60]!r}") from None
    if arr.ndim != 1:
        raise MoorelmError(f"{name} must be a flat list of numbers; got an array of shape {arr.shape}")
    bad = ~np.isfinite(arr) | (arr <= 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise MoorelmError(
            f"{name}[{i}] = {float(arr[i])!r} is not a finite positive number; "
            "drop or fix that run before fitting"
        )
    return arr


def _same_length(**arrays: np.ndarray) -> int:
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1:
        listed = ", ".join(f"{k} has {n}" for k, n in lengths.items())
        raise MoorelmError(f"inputs must have one value per run, but {listed}")
    return next(iter(lengths.values()))


def _check_bootstrap(n_bootstrap: int) -> int:
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, (int, np.integer)) or n_bootstrap < 0:
        raise MoorelmError(f"n_bootstrap must be a whole number >= 0; got {n_bootstrap!r}")
    return int(n_bootstrap)


def _check_varies(loss: np.ndarray, what: str) -> None:
    # Equal losses leave every exponent undetermined; the optimiser would wander off.
    if np.ptp(np.log(loss)) <= 1e-12:
        raise MoorelmError(
            f"all {len(loss)} losses are equal ({loss[0]:.6g}), so {what} cannot be fitted; "
            "use runs whose losses differ"
        )


def _one_blas_thread():
    """Run BLAS single-threaded while optimising, when threadpoolctl is available.

    L-BFGS-B calls BLAS on vectors of five numbers; a multi-threaded OpenBLAS wakes its
    threads for each call, which on a busy machine made fits some 50 times slower.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: without it fits are correct, just slower on busy machines
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


# --------------------------------------------------------------------------------------------
# The shared optimiser: log L = logsumexp(c_j - s_j * log x_j for each input j, e)
#
# theta = [c_1..c_m, e, s_1..s_m]; logx has one column per input variable.


def _objective(theta: np.ndarray, logx: np.ndarray, logy: np.ndarray, delta: float):
    """Huber(log pred - log obs) summed over runs, divided by delta, and its gradient.

    Dividing by delta does not move the minimum; it keeps the objective near 1 per badly fit
    run so that L-BFGS's tolerances mean the same whatever delta is.
    """
    m = logx.shape[1]
    c, e, s = theta[:m], theta[m], theta[m + 1 :]
    z = np.empty((logx.shape[0], m + 1))
    z[:, :m] = c - logx * s
    z[:, m] = e
    zmax = z.max(axis=1, keepdims=True)
    w = np.exp(z - zmax)
    total = w.sum(axis=1, keepdims=True)
    pred = zmax[:, 0] + np.log(total[:, 0])
    r = pred - logy
    absr = np.abs(r)
    f = np.where(absr <= delta, 0.5 * r * r / delta, absr - 0.5 * delta).sum()
    dr = np.clip(r / delta, -1.0, 1.0)
    w /= total  # softmax weights = d pred / d z
    grad = np.empty_like(theta)
    grad[:m] = dr @ w[:, :m]
    grad[m] = dr @ w[:, m]
    grad[m + 1 :] = -(dr[:, None] * w[:, :m] * logx).sum(axis=0)
    return f, grad


def _grid(m: int) -> np.ndarray:
    axes = [_GRID_COEF] * m + [_GRID_E] + [_GRID_EXP] * m
    return np.array(list(itertools.product(*axes)))


def _screen(grid: np.ndarray, logx: np.ndarray, logy: np.ndarray, delta: float, k: int) -> np.ndarray:
    """The k grid points with the lowest objective, evaluated all at once."""
    m = logx.shape[1]
    c, e, s = grid[:, :m], grid[:, m], grid[:, m + 1 :]
    z = c[:, None, :] - s[:, None, :] * logx[None, :, :]  # (grid, runs, m)
    z = np.concatenate([z, np.broadcast_to(e[:, None, None], z.shape[:2] + (1,))], axis=2)
    zmax = z.max(axis=2)
    pred = zmax + np.log(np.exp(z - zmax[..., None]).sum(axis=2))
    absr = np.abs(pred - logy[None, :])
    f = np.where(absr <= delta, 0.5 * absr**2 / delta, absr - 0.5 * delta).sum(axis=1)
    order = np.argsort(f, kind="stable")
    return grid[order[:k]]


def _minimise(starts: Sequence[np.ndarray], logx: np.ndarray, logy: np.ndarray, delta: float):
    """L-BFGS from each start: (lowest finite optimum or None, list of all finite optima).

    scipy's L-BFGS-B is used with no bounds, which makes it plain L-BFGS as in the papers.
    """
    best, optima = None, []
    for x0 in starts:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            res = optimize.minimize(
                _objective, np.asarray(x0, dtype=float), args=(logx, logy, delta), jac=True,
                method="L-BFGS-B",
                options={"maxiter": _MAXITER, "ftol": 1e-10, "gtol": 1e-6},
            )
        if not (np.isfinite(res.fun) and np.all(np.isfinite(res.x))) or res.nit >= _MAXITER:
            continue
        optima.append(res)
        if best is None or res.fun < best.fun:
            best = res
    return best, optima


def _distinct_optima(optima: list, limit: int) -> list[np.ndarray]:
    """Up to ``limit`` competitive optima with different parameters, best first.

    Competitive means an objective within twice the best: an optimum much worse on the full
    data is not going to become the best on a resample of it, and starting there is slow.
    """
    ranked = sorted(optima, key=lambda r: r.fun)
    kept: list[np.ndarray] = []
    for res in ranked:
        if res.fun > 2.0 * ranked[0].fun + 1e-12:
            break
        if all(np.max(np.abs(res.x - x)) > 1e-3 for x in kept):
            kept.append(res.x)
        if len(kept) == limit:
            break
    return kept


def _fit_lse(logx: np.ndarray, logy: np.ndarray, **kwargs):
    with _one_blas_thread():
        return _fit_lse_unlimited(logx, logy, **kwargs)


def _fit_lse_unlimited(logx: np.ndarray, logy: np.ndarray, *, n_bootstrap: int, seed: int,
                       resample_ok, what: str):
    """Point fit plus bootstrap thetas for the log-sum-exp law.

    ``resample_ok(idx)`` says whether a resample still identifies the law (enough distinct
    values); resamples that do not are redrawn, up to a limit.
    """
    grid = _grid(logx.shape[1])
    best, optima = _minimise(_screen(grid, logx, logy, HUBER_DELTA, _MAIN_STARTS[logx.shape[1]]), logx, logy,
                             HUBER_DELTA)
    if best is None:
        raise MoorelmError(
            f"the fit of {what} did not converge; check the runs for outliers or add runs "
            "spanning a wider range"
        )
    theta = best.x
    # Each resample starts from the distinct optima the full data produced: the resampled
    # landscape is close to the full one, and re-screening the grid every time is what made
    # the bootstrap slow without changing its answer.
    boot_starts = _distinct_optima(optima, _BOOT_STARTS)
    rng = np.random.default_rng(seed)
    n = len(logy)
    boots: list[np.ndarray] = []
    attempts = 0
    while len(boots) < n_bootstrap and attempts < 5 * n_bootstrap:
        attempts += 1
        idx = rng.integers(0, n, size=n)
        if not resample_ok(idx):
            continue
        res, _ = _minimise(boot_starts, logx[idx], logy[idx], HUBER_DELTA)
        if res is not None:
            boots.append(res.x)
    boot = np.array(boots).reshape(-1, theta.size)
    residuals = _predict_log(theta, logx) - logy
    return theta, best.fun, boot, residuals


def _predict_log(theta: np.ndarray, logx: np.ndarray) -> np.ndarray:
    m = logx.shape[1]
    z = np.concatenate([theta[:m] - logx * theta[m + 1 :], np.full((logx.shape[0], 1), theta[m])], axis=1)
    zmax = z.max(axis=1)
    return zmax + np.log(np.exp(z - zmax[:, None]).sum(axis=1))


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


def _check_k(flops_per_token: float) -> float:
    k = float(flops_per_token)
    if not math.isfinite(k) or k <= 0:
        raise MoorelmError(f"flops_per_token must be a positive number (6 is usual); got {flops_per_token!r}")
    return k


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
# Compute frontier and IsoFLOP (Approach 2)


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
