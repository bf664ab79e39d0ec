"""build_report writes its files from run records, and runs.csv reads back unchanged."""

import json
import math

import numpy as np
import pytest

from moorelm.errors import MoorelmError
from moorelm.scaling import report as R
from moorelm.scaling.records import load_records

E, A, ALPHA, B, BETA = 1.7, 400.0, 0.34, 410.0, 0.28


def _records():
    """Three IsoFLOP levels of four sizes each, plus one held-out verification run."""
    rng = np.random.default_rng(0)
    g = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
    recs = []
    for c in (1e13, 1e14, 1e15):
        n_star = g * (c / 6) ** (BETA / (ALPHA + BETA))
        for m in (-1.0, -0.3, 0.3, 1.0):
            n = int(n_star * math.exp(m))
            d = int(c / (6 * n))
            loss = (E + A * n**-ALPHA + B * d**-BETA) * math.exp(rng.normal(0, 0.003))
            recs.append({"name": f"c{c:.0e}-n{n}", "n_params": n, "n_params_nonembed": int(0.8 * n),
                         "tokens": d, "flops": 6.0 * n * d, "val_loss": loss, "wall_s": 1.5,
                         "compute_level": c, "recipe": "base"})
    n, d = 2_000_000, 80_000_000
    recs.append({"name": "verify", "n_params": n, "n_params_nonembed": int(0.8 * n), "tokens": d,
                 "flops": 6.0 * n * d, "val_loss": E + A * n**-ALPHA + B * d**-BETA,
                 "wall_s": 3.0, "verification": True, "seed_note": "extra column"})
    return recs


def test_build_report_writes_everything(tmp_path):
    """The report folder gets runs.csv, fits.json, every plot and an HTML page that embeds
    the plots as data URIs and states the answer; runs.csv round-trips through load_records."""
    recs = _records()
    page = R.build_report(tmp_path, recs, n_bootstrap=5)
    assert page == tmp_path / "report.html"
    for name in ("runs.csv", "fits.json", "loss_vs_compute.png", "isoflop.png",
                 "optimal_allocation.png", "trends.png", "prediction.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    html = page.read_text()
    assert html.count("src='data:image/png;base64,") == 5
    assert ".png'" not in html  # nothing refers to a file beside the page
    assert "Moore's law" in html and "tokens per parameter" in html

    fits = json.loads((tmp_path / "fits.json").read_text())
    assert fits["chinchilla"]["n_runs"] == 12  # the verification run is held out
    assert set(fits["chinchilla"]["alpha"]) == {"value", "ci95"}
    assert fits["isoflop"]["n_levels_used"] == 3
    assert fits["verification"]["name"] == "verify"
    assert fits["verification"]["actual"] == pytest.approx(recs[-1]["val_loss"])

    back = load_records(tmp_path)
    assert len(back) == len(recs)
    for orig, got in zip(recs, back):
        for key, value in orig.items():
            assert got[key] == value, (key, got[key], value)
    assert back[0]["verification"] is False and back[0]["seed_note"] is None


def test_build_report_with_given_prediction(tmp_path):
    """A prediction passed in is the one compared with the verification run."""
    recs = _records()[:3] + _records()[-1:]  # too few to fit: the given prediction must be used
    pred = {"name": "verify", "val_loss": 9.0, "ci95": [8.9, 9.1]}
    R.build_report(tmp_path, recs, prediction=pred, n_bootstrap=0, trends=False)
    v = json.loads((tmp_path / "fits.json").read_text())["verification"]
    assert v["predicted"] == 9.0 and v["source"] == "given"
    assert v["within_interval"] is False


def test_too_few_runs_are_noted_not_fatal(tmp_path):
    """With three runs nothing can be fitted, and the report says so instead of failing."""
    recs = _records()[:3]
    page = R.build_report(tmp_path, recs, n_bootstrap=0, trends=False)
    html = page.read_text()
    assert "L(N, D) not fitted: need at least 6 runs" in html
    assert json.loads((tmp_path / "fits.json").read_text())["chinchilla"] is None
    assert load_records(tmp_path)[0]["name"] == recs[0]["name"]


def test_bad_records_raise(tmp_path):
    """Records missing a required field, or an absent runs.csv, raise MoorelmError."""
    with pytest.raises(MoorelmError, match="missing val_loss"):
        R.build_report(tmp_path, [{"name": "a", "n_params": 1, "tokens": 1, "flops": 6}])
    with pytest.raises(MoorelmError, match="non-empty list"):
        R.build_report(tmp_path, [])
    with pytest.raises(MoorelmError, match="does not exist"):
        load_records(tmp_path / "nowhere")
