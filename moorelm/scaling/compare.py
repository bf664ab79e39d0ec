"""Comparing two training recipes on a ladder's runs: the compute each needs to reach one
loss along its compute frontier, their ratio (our own algorithmic progress), a sentence and
a plot saying so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moorelm.errors import MoorelmError
from moorelm.plots import pyplot, save_figure


def compare_recipes(records: list[dict], recipe: str, baseline: str) -> dict:
    """Compute each recipe needs to reach one loss, and their ratio (the algorithmic-progress
    factor of ``recipe`` over ``baseline``).

    Each recipe's frontier is its best run per compute level (runs of one level share a budget,
    so their small differences in FLOPs are not progress), reduced to the lower envelope of loss
    against compute; log C is interpolated linearly in loss along it. The target is the lowest
    loss both frontiers reach. When one recipe's cheapest level is already below the target,
    its compute is an upper bound and the factor a bound too; ``factor_kind`` says which.
    """
    from moorelm.scaling.isoflop import compute_frontier

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
        idx = compute_frontier(C, L)
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
    plt = pyplot()
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
    return save_figure(fig, path)
