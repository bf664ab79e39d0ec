"""Scaling-law fits recover known laws from synthetic runs and reject bad input clearly."""

import json
import math

import numpy as np
import pytest

from moorelm.errors import MoorelmError
from moorelm.scaling import fit as F
from moorelm.scaling.isoflop import compute_frontier, fit_isoflop

TRUE = {"E": 1.7, "A": 400.0, "alpha": 0.34, "B": 410.0, "beta": 0.28}


def law(n, d):
    return TRUE["E"] + TRUE["A"] * n ** -TRUE["alpha"] + TRUE["B"] * d ** -TRUE["beta"]


@pytest.fixture(scope="module")
def grid_runs():
    rng = np.random.default_rng(0)
    n, d = np.meshgrid(np.logspace(5, 7, 5), np.logspace(6, 9, 5))
    n, d = n.ravel(), d.ravel()
    loss = law(n, d) * np.exp(rng.normal(0.0, 0.005, n.size))
    return n, d, loss


@pytest.fixture(scope="module")
def chinchilla(grid_runs):
    n, d, loss = grid_runs
    return F.fit_chinchilla(n, d, loss, n_bootstrap=10, seed=0)


def test_chinchilla_recovers_known_exponents(chinchilla):
    """L(N, D) fitted to noisy runs from a known law recovers alpha and beta within 0.03."""
    assert abs(chinchilla.alpha.value - TRUE["alpha"]) < 0.03
    assert abs(chinchilla.beta.value - TRUE["beta"]) < 0.03
    assert abs(chinchilla.E.value - TRUE["E"]) < 0.3
    for name in ("E", "A", "alpha", "B", "beta"):
        est = getattr(chinchilla, name)
        assert est.ci95 is not None and est.ci95[0] <= est.ci95[1]


def test_chinchilla_exact_on_noise_free_runs(grid_runs):
    """Without noise, the Huber/L-BFGS fit lands on the generating parameters."""
    n, d, _ = grid_runs
    fit = F.fit_chinchilla(n, d, law(n, d), n_bootstrap=0)
    for name, value in TRUE.items():
        assert getattr(fit, name).value == pytest.approx(value, rel=1e-4)
    assert fit.alpha.ci95 is None  # no bootstrap, no interval


def test_power_law_recovers_exponent():
    """L(x) = E + A x^-alpha fitted to noisy points recovers alpha within 0.03 and predicts
    a new point inside its prediction interval."""
    rng = np.random.default_rng(1)
    x = np.logspace(5, 9, 9)
    y = (2.0 + 300.0 * x**-0.3) * np.exp(rng.normal(0.0, 0.003, x.size))
    fit = F.fit_power_law(x, y, n_bootstrap=10, variable="N")
    assert abs(fit.alpha.value - 0.3) < 0.03
    p = fit.predict(3e9)
    truth = 2.0 + 300.0 * 3e9**-0.3
    assert isinstance(p.value, float) and p.value == pytest.approx(truth, rel=0.02)
    assert p.lo <= p.value <= p.hi
    arr = F.predict(fit, [1e6, 1e7])
    assert arr.value.shape == (2,)


def test_allocation_exponents_sum_to_one(chinchilla):
    """Compute-optimal exponents satisfy a + b = 1, and N_opt * D_opt * k = C."""
    a, b = chinchilla.allocation_exponents
    assert a.value + b.value == pytest.approx(1.0)
    for k in (6.0, 8.0):
        co = F.compute_optimal(chinchilla, [1e18, 1e21], flops_per_token=k)
        assert np.allclose(co.n_opt.value * co.d_opt.value * k, [1e18, 1e21])
        assert np.allclose(co.tokens_per_param.value, co.d_opt.value / co.n_opt.value)
        assert np.all(co.n_opt.lo <= co.n_opt.value) and np.all(co.n_opt.value <= co.n_opt.hi)


def test_compute_optimal_is_the_constrained_minimum(chinchilla):
    """N_opt from the closed form is where the fitted loss is lowest along C = 6 N D."""
    c = 1e19
    co = chinchilla.compute_optimal(c)
    n = np.logspace(5, 12, 20001)
    losses = chinchilla.predict(n, c / (6 * n), interval="confidence").value
    assert n[np.argmin(losses)] == pytest.approx(co.n_opt.value, rel=0.01)
    assert F.tokens_per_parameter(chinchilla, c).value == pytest.approx(co.tokens_per_param.value)


def test_isoflop_finds_minimum_and_exponent():
    """Parabolas per compute level find each level's best N, and N_opt ~ C^a recovers
    a = beta / (alpha + beta) of the generating law."""
    al, be = TRUE["alpha"], TRUE["beta"]
    g = (al * TRUE["A"] / (be * TRUE["B"])) ** (1 / (al + be))
    n_all, l_all, c_all, best = [], [], [], {}
    for c in (1e15, 1e16, 1e17, 1e18):
        n_star = g * (c / 6) ** (be / (al + be))
        best[c] = n_star
        for m in np.linspace(-1.0, 1.0, 7):
            n = n_star * math.exp(m)
            n_all.append(n)
            l_all.append(law(n, c / (6 * n)))
            c_all.append(c)
    iso = fit_isoflop(n_all, l_all, c_all)
    assert iso.n_levels_used == 4
    for lv in iso.levels:
        assert lv.n_opt == pytest.approx(best[lv.compute], rel=0.05)
    assert iso.a.value == pytest.approx(be / (al + be), abs=0.01)
    assert iso.a.value + iso.b.value == pytest.approx(1.0)
    json.dumps(iso.to_dict())


def test_isoflop_needs_two_levels():
    """One usable compute level is not enough for an IsoFLOP fit."""
    with pytest.raises(MoorelmError, match="at least 2 compute levels"):
        fit_isoflop([1e5, 2e5, 4e5, 1e5], [3.0, 2.9, 3.1, 3.0], [1e15, 1e15, 1e15, 1e16])


def test_too_few_runs_raise_clear_errors(grid_runs):
    """Too few runs or too few distinct sizes raise MoorelmError saying what is needed."""
    n, d, loss = grid_runs
    with pytest.raises(MoorelmError, match=r"need at least 6 runs .* L\(N, D\); got 3 runs"):
        F.fit_chinchilla(n[:3], d[:3], loss[:3])
    same_n = np.full(8, 1e6)
    with pytest.raises(MoorelmError, match=r"\(1 sizes"):
        F.fit_chinchilla(same_n, np.logspace(6, 9, 8), np.linspace(3, 2, 8))
    with pytest.raises(MoorelmError, match=r"need at least 4 runs .* L\(N\); got 3 runs"):
        F.fit_power_law([1e5, 1e6, 1e7], [3.0, 2.5, 2.2], variable="N")


def test_bad_values_raise(grid_runs):
    """Non-finite, non-positive or mismatched inputs raise MoorelmError naming the value."""
    n, d, loss = grid_runs
    bad = loss.copy()
    bad[4] = np.nan
    with pytest.raises(MoorelmError, match=r"loss\[4\]"):
        F.fit_chinchilla(n, d, bad)
    with pytest.raises(MoorelmError, match=r"N\[0\] = -1"):
        F.fit_chinchilla(np.r_[-1.0, n[1:]], d, loss)
    with pytest.raises(MoorelmError, match="one value per run"):
        F.fit_chinchilla(n, d[:-1], loss)
    with pytest.raises(MoorelmError, match="n_bootstrap"):
        F.fit_power_law(n, loss, n_bootstrap=-1)


def test_degenerate_fits_raise(grid_runs):
    """Equal losses, or loss that rises with size, are rejected rather than fitted."""
    n, d, _ = grid_runs
    with pytest.raises(MoorelmError, match="losses are equal"):
        F.fit_chinchilla(n, d, np.full(n.size, 3.0))
    x = np.logspace(5, 8, 6)
    with pytest.raises(MoorelmError, match="not positive"):
        F.fit_power_law(x, 2.0 + 0.1 * np.log(x), n_bootstrap=0, variable="N")


def test_results_serialise_to_json(chinchilla):
    """to_dict() is plain JSON with {"value": ..., "ci95": [lo, hi]} per parameter."""
    d = json.loads(json.dumps(chinchilla.to_dict()))
    assert set(d["alpha"]) == {"value", "ci95"} and len(d["alpha"]["ci95"]) == 2
    assert d["n_runs"] == 25
    json.dumps(chinchilla.compute_optimal(1e20).to_dict())
    json.dumps(chinchilla.predict(1e8, 1e10).to_dict())


def test_compute_frontier_is_lower_envelope():
    """The frontier keeps a run only if no cheaper run reached a lower loss."""
    idx = compute_frontier([1, 2, 3, 4, 5], [5.0, 4.0, 4.5, 3.0, 3.5])
    assert idx.tolist() == [0, 1, 3]
