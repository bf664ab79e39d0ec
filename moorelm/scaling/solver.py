"""The numerical engine shared by the power-law and L(N, D) fits: the Huber loss on log loss
for a log-sum-exp law, grid screening for starting points, L-BFGS from several starts, and
the bootstrap refits over resampled runs.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence

import numpy as np
from scipy import optimize

from moorelm.errors import MoorelmError

HUBER_DELTA = 1e-3
"""Huber threshold on log-loss residuals, as in Hoffmann et al. 2022."""

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
