"""Historical trend fits: synthetic recovery, the bundled landmarks table, and the plot."""

import math

import numpy as np
import pytest

from moorelm.errors import MoorelmError
from moorelm.scaling import trend as T


def test_fit_trend_recovers_doubling_time():
    """A series doubling every 6 months with noise gives a doubling time near 6 months whose
    95% interval contains 6."""
    rng = np.random.default_rng(0)
    years = np.linspace(2016, 2024, 40)
    values = 1e20 * 2.0 ** ((years - 2016) * 2) * 10 ** rng.normal(0, 0.1, years.size)
    fit = T.fit_trend(years, values)
    assert fit.doubling_months == pytest.approx(6.0, abs=0.5)
    lo, hi = fit.doubling_ci95
    assert lo <= 6.0 <= hi
    assert fit.growth_per_year == pytest.approx(4.0, rel=0.15)
    assert fit.predict(2016.0) == pytest.approx(1e20, rel=0.3)


def test_fit_trend_rejects_too_few_points():
    """Two points cannot give a trend with an interval."""
    with pytest.raises(MoorelmError, match="at least 3 points"):
        T.fit_trend([2020, 2021], [1.0, 2.0])


def test_bundled_table_is_sound():
    """The bundled table loads, every row has a source and a parseable date, and every number
    is positive; compute is flagged estimated exactly where the table leaves it empty."""
    lms = T.load_landmarks()
    assert len(lms) >= 25
    names = {lm.name for lm in lms}
    for must in ("GPT-3", "Chinchilla", "PaLM 540B", "Llama 3.1 405B"):
        assert must in names
    for lm in lms:
        assert lm.source
        assert 2018 <= lm.year < 2026
        for q in ("parameters", "active_parameters", "training_tokens", "training_flops"):
            v = getattr(lm, q)
            assert v is None or (math.isfinite(v) and v > 0)
        if lm.flops_estimated:
            used = lm.active_parameters or lm.parameters
            assert lm.training_flops == pytest.approx(6 * used * lm.training_tokens)
    gpt3 = next(lm for lm in lms if lm.name == "GPT-3")
    assert (gpt3.parameters, gpt3.training_tokens, gpt3.training_flops) == (1.75e11, 3e11, 3.14e23)
    assert not gpt3.flops_estimated


def test_compute_doubling_time_is_plausible():
    """Landmark training compute doubles every 4-12 months, far faster than Moore's law."""
    rows = {r.quantity: r for r in T.trend_table()}
    comp = rows["training_flops"]
    assert 4.0 <= comp.doubling_months <= 12.0
    assert comp.n_points >= 20
    assert comp.doubling_months < T.reference_rate("moore").doubling_months


def test_reference_rates_and_table_text():
    """Reference rates convert consistently and appear, with sources, in the text table."""
    moore = T.reference_rate("moore")
    assert moore.central_doubling_months == 24.0
    assert moore.central_growth_per_year == pytest.approx(2 ** 0.5)
    lo, hi = T.reference_rate("frontier_compute").doubling_range
    assert lo == pytest.approx(12 * math.log(2) / math.log(5))
    assert hi == pytest.approx(12 * math.log(2) / math.log(4))
    text = T.format_trend_table()
    assert "training_flops" in text and "Moore's law" in text and "arXiv:2403.05812" in text


def test_frontier_mask_is_running_top_k():
    """With top_k=1 only record-setters count; with top_k=2 the runner-up at release does too."""
    years = [2018, 2019, 2020, 2021]
    values = [10.0, 5.0, 20.0, 15.0]
    assert T.frontier_mask(years, values, top_k=1).tolist() == [True, False, True, False]
    assert T.frontier_mask(years, values, top_k=2).tolist() == [True, True, True, True]


def test_bad_table_raises(tmp_path):
    """A user table with a missing source or a bad date is rejected, naming the line."""
    header = "name,organisation,date,parameters,training_tokens,training_flops,source,notes\n"
    p = tmp_path / "t.csv"
    p.write_text(header + "M,Org,2020-05,1e9,,,,\n")
    with pytest.raises(MoorelmError, match="line 2 .*source"):
        T.load_landmarks(p)
    p.write_text(header + "M,Org,May 2020,1e9,,,paper,\n")
    with pytest.raises(MoorelmError, match="YYYY-MM"):
        T.load_landmarks(p)


def test_plot_trends_writes_png(tmp_path):
    """plot_trends saves a PNG file."""
    out = T.plot_trends(tmp_path / "sub" / "trends.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
