"""The scaling ladder: planning under a budget, recipe comparison, verification choice, and a
tiny ladder run end to end through the CLI (report, resume, bad input)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moorelm.cli import main
from moorelm.errors import MoorelmError
from moorelm.scaling import compare as CMP
from moorelm.scaling import ladder as LD
from moorelm.scaling import ladder_plan as LP
from tests.conftest import SMALL_TEXT

TINY = LP.LadderSpec(shapes=((1, 8), (1, 16), (2, 16)), head_dim=8, seq_len=16, batch_size=2,
                     levels=3, sizes_per_level=2, level_ratio=3.0, min_steps=3, eval_iters=2,
                     threads=1, device="cpu")
TINY_FLAGS = ["--shapes", "1x8,1x16,2x16", "--head-dim", "8", "--seq-len", "16",
              "--batch-size", "2", "--levels", "3", "--sizes-per-level", "2", "--level-ratio", "3",
              "--min-steps", "3", "--eval-iters", "2", "--bootstrap", "5", "--threads", "1",
              "--device", "cpu", "--quiet", "--no-trends"]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_parse_budget_and_shapes():
    """Durations accept s/m/h and plain seconds; shapes parse and sort by size; bad text fails
    with the offending value named."""
    assert LP.parse_duration("30m") == 1800 and LP.parse_duration("90") == 90
    assert LP.parse_duration("1.5h") == 5400
    assert LP.parse_shapes("2x64, 1x32") == ((1, 32), (2, 64))
    with pytest.raises(MoorelmError, match="'half an hour'"):
        LP.parse_duration("half an hour")
    with pytest.raises(MoorelmError, match="'2-64'"):
        LP.parse_shapes("2-64")
    with pytest.raises(MoorelmError, match="multiple of the head size"):
        LP.LadderSpec(shapes=((2, 20),), head_dim=16)


def test_flops_plan_fills_the_budget_with_sliding_isoflop_windows():
    """A FLOPs budget is spent (within a factor 2 of bisection slack, never over); levels are a
    geometric series; each level trains a window of sizes that slides to larger models; every
    rung gets at least min_steps steps; the 10x verification run is costed."""
    stats = LP.shape_stats(TINY, vocab_size=40)
    plan = LP.make_plan(TINY, stats, flops=2e9)
    assert 1e9 < plan.est_flops <= 2e9
    assert np.allclose(np.diff(np.log(plan.levels)), np.log(3.0))
    by_level = {j: sorted(tuple(r["shape"]) for r in plan.rungs if r["level"] == j) for j in range(3)}
    assert by_level == {0: [(1, 8), (1, 16)], 1: [(1, 8), (1, 16)], 2: [(1, 16), (2, 16)]}
    assert all(r["steps"] >= TINY.min_steps for r in plan.rungs)
    assert plan.verify_compute == pytest.approx(10 * plan.levels[-1])


def test_wall_clock_plan_and_too_small_budget():
    """With probed step times the estimated wall time stays under the safety fraction of the
    budget; a budget that cannot buy one rung of min_steps fails with a clear message."""
    stats = LP.shape_stats(TINY, vocab_size=40)
    rates = {f"{TINY.recipe}/{LP.shape_name(s)}": {"step_s": 0.01 * (i + 1), "overhead_s": 0.5}
             for i, s in enumerate(TINY.shapes)}
    plan = LP.make_plan(TINY, stats, seconds=120, rates=rates, spent_s=5)
    assert plan.est_seconds <= LP.SAFETY * 120 - 5
    assert plan.est_seconds > 0.4 * (LP.SAFETY * 120 - 5)
    with pytest.raises(MoorelmError, match="too small for even one rung"):
        LP.make_plan(TINY, stats, seconds=1, rates=rates)
    with pytest.raises(MoorelmError, match="exactly one budget"):
        LP.make_plan(TINY, stats, seconds=60, flops=1e9, rates=rates)


def _frontier_records(recipe: str, shift: float) -> list[dict]:
    # loss on the frontier L(C) = 1 + 30 * (C / shift)^-0.2: a recipe that needs `shift` times
    # the compute for every loss
    out = []
    for c in np.geomspace(1e9, 1e12, 7):
        out.append({"name": f"{recipe}-{c:.0e}", "recipe": recipe, "flops": float(c),
                    "val_loss": 1 + 30 * (c / shift) ** -0.2})
        out.append({"name": f"{recipe}-{c:.0e}-worse", "recipe": recipe, "flops": float(c),
                    "val_loss": 1.2 + 30 * (c / shift) ** -0.2})  # off the frontier
    return out


def test_compare_recipes_recovers_a_known_compute_factor():
    """When the baseline needs 2.5x the compute for every loss, the measured factor is 2.5
    (up to interpolation along the frontier) and it is exact, not a bound."""
    recs = _frontier_records("moorelm", 1.0) + _frontier_records("gpt2-baseline", 2.5)
    cmp = CMP.compare_recipes(recs, "moorelm", "gpt2-baseline")
    assert cmp["factor"] == pytest.approx(2.5, rel=0.05)
    assert cmp["factor_kind"] == "exact"
    assert f"{cmp['factor']:.2f}x" in CMP.comparison_sentence(cmp)
    with pytest.raises(MoorelmError, match="recipe 'gpt2-baseline'"):
        CMP.compare_recipes(_frontier_records("moorelm", 1.0), "moorelm", "gpt2-baseline")


def test_compare_recipes_reports_a_bound_when_one_recipe_is_better_everywhere():
    """When the new recipe's cheapest compute level already beats the baseline's best loss, the
    compute it needs is only an upper bound, so the factor is reported as 'at least' the ratio
    of the levels, not as an exact figure."""
    recs = []
    for j, level in enumerate((1e9, 4e9, 1.6e10)):
        for k, (flops, extra) in enumerate(((0.99, 0.3), (1.0, 0.0))):
            recs.append({"name": f"new-{j}-{k}", "recipe": "moorelm", "compute_level": level,
                         "flops": level * flops, "val_loss": 2.0 - 0.2 * j + extra})
            recs.append({"name": f"old-{j}-{k}", "recipe": "gpt2-baseline", "compute_level": level,
                         "flops": level * flops, "val_loss": 3.0 - 0.2 * j + extra})
    cmp = CMP.compare_recipes(recs, "moorelm", "gpt2-baseline")
    assert cmp["factor_kind"] == "at least"
    assert cmp["factor"] == pytest.approx(16.0)
    assert "at least 16.00x" in CMP.comparison_sentence(cmp)


def test_verification_is_predicted_by_the_fitted_law():
    """Rungs drawn from a known L(N, D) (1% noise) give a verification prediction within 3% of
    the true law at the chosen shape and budget, and the shape chosen is the one the true law
    makes best among the family."""
    spec = LP.LadderSpec()
    stats = LP.shape_stats(spec, vocab_size=65)
    E, A, alpha, B, beta = 1.2, 40.0, 0.35, 300.0, 0.33

    def law(n, d):
        return E + A * n**-alpha + B * d**-beta

    rng = np.random.default_rng(0)
    recs = []
    for c in (1e10, 4e10, 1.6e11):
        for shape in spec.shapes:
            s = stats[LP.shape_name(shape)]
            d = c / s["flops_per_token"]
            recs.append({"n_params_nonembed": s["n_params_nonembed"], "tokens": d, "flops": c,
                         "val_loss": law(s["n_params_nonembed"], d) * (1 + 0.01 * rng.standard_normal()),
                         "n_layer": shape[0], "n_embd": shape[1]})
    pred = LD.choose_verification(spec, stats, recs, 1.6e12, n_bootstrap=20)
    assert pred["law"] == "L(N, D)"
    s = stats[LP.shape_name(tuple(pred["shape"]))]
    truth = law(s["n_params_nonembed"], pred["steps"] * spec.tokens_per_step)
    assert pred["val_loss"] == pytest.approx(truth, rel=0.03)
    assert pred["ci95"][0] < pred["val_loss"] < pred["ci95"][1]

    def true_best(shape):
        st = stats[LP.shape_name(shape)]
        return law(st["n_params_nonembed"], 1.6e12 / st["flops_per_token"])

    assert tuple(pred["shape"]) == min(spec.shapes, key=true_best)


def test_scale_and_trend_bad_input(capsys, tmp_path):
    """No budget, two budgets, a budget too small for one rung, and --report-only on a folder
    without runs each give one line and exit status 2."""
    corpus = tmp_path / "c.txt"
    corpus.write_text(SMALL_TEXT, encoding="utf-8")
    code, _, err = run_cli(capsys, "scale", "--out", str(tmp_path / "a"), "--corpus", str(corpus))
    assert code == 2 and "give one budget" in err
    code, _, err = run_cli(capsys, "scale", "--out", str(tmp_path / "a"), "--budget", "1m",
                           "--budget-flops", "1e9")
    assert code == 2 and "give one budget" in err
    code, _, err = run_cli(capsys, "scale", "--out", str(tmp_path / "a"), "--budget-flops", "1e3",
                           "--corpus", str(corpus), *TINY_FLAGS)
    assert code == 2 and "too small for even one rung" in err and err.count("\n") == 1
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "scale", "--report-only", str(tmp_path / "empty"))
    assert code == 2 and "has no finished runs" in err
    code, _, err = run_cli(capsys, "trend", "--top-k", "0")
    assert code == 2 and "--top-k" in err
    # numbers that are not finite, or too large to plan with (a traceback before: int(inf),
    # NaN levels, max() of no rungs once float rounding left a level without one)
    for flags, needle in [
        (["--budget", "1m", "--level-ratio", "nan"], "--level-ratio must be a finite number > 1"),
        (["--budget", "1m", "--level-ratio", "inf"], "--level-ratio must be a finite number > 1"),
        (["--budget", "1m", "--level-ratio", "1e150"], "spans 1e300 in compute; at most 1e+12"),
        (["--budget", "1m", "--levels", "40"], "4 over 40 levels spans 1e23"),
        (["--budget-flops", "inf"], "--budget-flops must be a positive number of at most 1e+30"),
        (["--budget-flops", "nan"], "--budget-flops must be a positive number"),
        (["--budget-flops", "1e300"], "at most 1e+30, got 1e+300"),
        (["--budget", "1e400"], "is more than a year"),
    ]:
        code, _, err = run_cli(capsys, "scale", "--out", str(tmp_path / "b"), "--corpus",
                               str(corpus), *flags)
        assert code == 2 and needle in err and err.count("\n") == 1, (flags, err)
        assert not (tmp_path / "b").exists()


def test_trend_prints_doubling_times_and_writes_the_plot(capsys, tmp_path):
    """`moorelm trend` prints the fitted doubling times beside Moore's law and writes
    trends.png into --out."""
    code, out, _ = run_cli(capsys, "trend", "--out", str(tmp_path))
    assert code == 0
    assert "training_flops" in out and "Moore" in out
    assert (tmp_path / "trends.png").stat().st_size > 1000


@pytest.mark.slow
def test_tiny_ladder_end_to_end_resumes_and_rebuilds(capsys, tmp_path):
    """A tiny ladder trains every rung as a run folder, predicts and trains the 10x run, and
    writes the report; a second invocation retrains nothing; a rung whose result was lost is
    resumed from its final checkpoint; --report-only rebuilds the report from the runs."""
    corpus = tmp_path / "c.txt"
    corpus.write_text(SMALL_TEXT, encoding="utf-8")
    out = tmp_path / "ladder"
    code, log, err = run_cli(capsys, "scale", "--out", str(out), "--budget-flops", "8e8",
                             "--corpus", str(corpus), *TINY_FLAGS)
    assert code == 0, err
    doc = json.loads((out / "ladder.json").read_text())
    plan = doc["plan"]["rungs"]
    assert len(plan) == 6
    for name in (r["name"] for r in plan):
        rec = doc["results"][name]
        assert (out / "runs" / name / "config.json").exists()
        assert rec["val_loss"] > 0 and rec["flops"] == pytest.approx(rec["tokens"] * rec["flops_per_token"])
        assert rec["n_params"] > rec["n_params_nonembed"] > 0
    for f in ("report.html", "runs.csv", "fits.json", "loss_vs_compute.png"):
        assert (out / f).exists(), f
    if "prediction" in doc:  # a fit was possible: the verification run was trained and judged
        v = doc["results"][doc["prediction"]["name"]]
        assert v["verification"] and v["flops"] == pytest.approx(10 * plan[-1]["compute_level"], rel=0.1)
        assert json.loads((out / "fits.json").read_text())["verification"]["actual"] == v["val_loss"]
    else:
        assert "no verification run" in log

    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("model.safetensors")}
    lost = plan[0]["name"]
    del doc["results"][lost]
    (out / "ladder.json").write_text(json.dumps(doc))
    code, log, err = run_cli(capsys, "scale", "--out", str(out), "--corpus", str(corpus), "--quiet",
                             "--no-trends", "--bootstrap", "5")
    assert code == 0, err
    assert log.count("done, skipped") == 5
    again = json.loads((out / "ladder.json").read_text())["results"][lost]
    assert again["resumed"] and again["steps"] == plan[0]["steps"]
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("model.safetensors")} == stamps

    (out / "report.html").unlink()
    code, log, err = run_cli(capsys, "scale", "--report-only", str(out), "--bootstrap", "5",
                            "--no-trends")
    assert code == 0, err
    assert (out / "report.html").exists() and "report:" in log


@pytest.mark.slow
def test_compare_recipes_end_to_end(capsys, tmp_path):
    """--compare-recipes trains the baseline recipe on the same rungs, writes its own report
    under baseline/, and puts the algorithmic-progress factor in ladder.json and report.html."""
    corpus = tmp_path / "c.txt"
    corpus.write_text(SMALL_TEXT, encoding="utf-8")
    out = tmp_path / "cmp"
    flags = list(TINY_FLAGS)
    flags[flags.index("--levels") + 1] = "2"
    flags[flags.index("--sizes-per-level") + 1] = "1"
    code, log, err = run_cli(capsys, "scale", "--out", str(out), "--budget-flops", "1e8",
                             "--compare-recipes", "--no-verify", "--corpus", str(corpus), *flags)
    assert code == 0, err
    doc = json.loads((out / "ladder.json").read_text())
    recipes = sorted(r["recipe"] for r in doc["results"].values())
    assert recipes == ["gpt2-baseline"] * 2 + ["moorelm"] * 2
    cmp = doc["comparison"]
    assert cmp["factor"] > 0 and set(cmp["compute"]) == {"moorelm", "gpt2-baseline"}
    assert "algorithmic-progress factor" in log
    assert "Our own algorithmic progress" in (out / "report.html").read_text()
    assert (out / "baseline" / "report.html").exists() and (out / "compare_recipes.png").exists()
