"""The scaling report's PNG figures: loss against compute, IsoFLOP curves, compute-optimal
allocation and the verification check. matplotlib (Agg) is imported only when one is drawn.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moorelm.plots import pyplot, save_figure


def _finish(fig, ax, path: Path) -> Path:
    """The single-panel figures' common last touches: grid, legend, margins, then save."""
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8)
    # Fixed margins rather than tight_layout: tight_layout measures every label in an extra
    # pass, which doubled the plotting time.
    fig.subplots_adjust(left=0.1, right=0.97, top=0.92, bottom=0.11)
    return save_figure(fig, path, dpi=100)


def _plot_loss_vs_compute(path: Path, fits: dict, verification: dict | None, k: float) -> Path:
    plt = pyplot()
    a = fits["_arrays"]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    sc = ax.scatter(a["C"], a["L"], c=np.log10(a["N"]), cmap="viridis", s=28, zorder=3)
    fig.colorbar(sc, ax=ax, label="log10 parameters")
    fr = a["frontier"]
    ax.scatter(a["C"][fr], a["L"][fr], s=90, facecolors="none", edgecolors="tab:red", zorder=2,
               label="compute frontier")
    hi_c = a["C"].max() * 10 if verification is None else max(a["C"].max(), verification["flops"]) * 2
    grid = np.logspace(np.log10(a["C"].min()), np.log10(hi_c), 80)
    if "loss_vs_compute" in fits:
        f = fits["loss_vs_compute"]
        p = f.predict(grid)
        ax.plot(grid, p.value, color="tab:red",
                label=f"L(C) frontier fit, alpha = {f.alpha.value:.3f}")
        if np.all(np.isfinite(p.lo)):
            ax.fill_between(grid, p.lo, p.hi, color="tab:red", alpha=0.12, label="95% prediction band")
    if "chinchilla" in fits:
        o = fits["chinchilla"].optimal_loss(grid, flops_per_token=k)
        ax.plot(grid, o.value, color="tab:purple", linestyle="--",
                label="compute-optimal loss from L(N, D)")
        if np.all(np.isfinite(o.lo)):
            ax.fill_between(grid, o.lo, o.hi, color="tab:purple", alpha=0.10)
    if verification is not None and verification.get("actual") is not None:
        ax.scatter([verification["flops"]], [verification["actual"]], marker="*", s=220,
                   color="gold", edgecolors="black", zorder=4, label="verification run")
    ax.set_xscale("log")
    ax.set_yscale("log")
    _plain_log_y(ax)
    ax.set_xlabel("Training compute C (FLOPs)")
    ax.set_ylabel("Validation loss")
    ax.set_title("Loss against compute")
    return _finish(fig, ax, path)


def _plot_isoflop(path: Path, fits: dict) -> Path:
    plt = pyplot()
    a, iso, budgets = fits["_arrays"], fits["isoflop"], fits["_budgets"]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    cmap = plt.get_cmap("plasma")
    levels = iso.levels
    for j, lv in enumerate(levels):
        color = cmap(0.1 + 0.8 * j / max(1, len(levels) - 1))
        sel = budgets == lv.compute
        ax.scatter(a["N"][sel], a["L"][sel], color=color, s=26, zorder=3,
                   label=f"C = {lv.compute:.2g}" + ("" if lv.used else " (not used)"))
        if lv.coeffs is not None:
            u = np.linspace(np.log(a["N"][sel].min()), np.log(a["N"][sel].max()), 60)
            c2, c1, c0 = lv.coeffs
            ax.plot(np.exp(u), c2 * u**2 + c1 * u + c0, color=color, linewidth=1.2)
        if lv.used:
            ax.scatter([lv.n_opt], [lv.loss_min], marker="D", s=50, color=color,
                       edgecolors="black", zorder=4)
    ax.set_xscale("log")
    ax.set_xlabel("Parameters N")
    ax.set_ylabel("Validation loss")
    ax.set_title(f"IsoFLOP curves (diamonds: fitted minima; N_opt ~ C^{iso.a.value:.2f})")
    return _finish(fig, ax, path)


def _plot_allocation(path: Path, fits: dict, k: float) -> Path:
    plt = pyplot()
    a = fits["_arrays"]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    grid = np.logspace(np.log10(a["C"].min()), np.log10(a["C"].max() * 100), 80)
    if "chinchilla" in fits:
        co = fits["chinchilla"].compute_optimal(grid, flops_per_token=k)
        for pred, color, name, exp in ((co.n_opt, "tab:blue", "N_opt", co.a),
                                       (co.d_opt, "tab:green", "D_opt", co.b)):
            ax.plot(grid, pred.value, color=color, label=f"{name} from L(N, D) ~ C^{exp.value:.2f}")
            if np.all(np.isfinite(pred.lo)):
                ax.fill_between(grid, pred.lo, pred.hi, color=color, alpha=0.15)
    if "isoflop" in fits:
        iso = fits["isoflop"]
        used = [lv for lv in iso.levels if lv.used]
        cs = np.array([lv.compute for lv in used])
        ns = np.array([lv.n_opt for lv in used])
        ax.scatter(cs, ns, marker="D", color="tab:blue", edgecolors="black", zorder=4,
                   label="IsoFLOP minima N_opt")
        ax.scatter(cs, cs / (k * ns), marker="D", color="tab:green", edgecolors="black", zorder=4,
                   label="IsoFLOP D_opt = C / (k N_opt)")
        ax.plot(grid, iso.n_opt(grid), color="tab:blue", linestyle=":",
                label=f"IsoFLOP fit N_opt ~ C^{iso.a.value:.2f}")
        ax.plot(grid, iso.d_opt(grid), color="tab:green", linestyle=":")
    ax.scatter(a["C"], a["N"], s=10, color="tab:blue", alpha=0.3, label="runs: N")
    ax.scatter(a["C"], a["D"], s=10, color="tab:green", alpha=0.3, label="runs: D")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"Training compute C (FLOPs), C = {k:g}·N·D")
    ax.set_ylabel("Parameters / tokens")
    ax.set_title("Compute-optimal model size and data")
    return _finish(fig, ax, path)


def _plot_prediction(path: Path, fits: dict, v: dict) -> Path:
    plt = pyplot()
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(10, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    if "_arrays" in fits:
        a = fits["_arrays"]
        ax.scatter(a["C"], a["L"], s=18, color="0.6", label="fitted runs")
    yerr = None
    if v["lo"] is not None and v["hi"] is not None:
        yerr = [[v["predicted"] - v["lo"]], [v["hi"] - v["predicted"]]]
    for axis, x in ((ax, v["flops"]), (zoom, 0.0)):
        axis.errorbar([x], [v["predicted"]], yerr=yerr, fmt="o", color="tab:blue", capsize=6,
                      markersize=7, zorder=5, label="predicted (95% interval)")
    if v["actual"] is not None:
        ax.scatter([v["flops"]], [v["actual"]], marker="*", s=160, color="gold",
                   edgecolors="black", zorder=4, label="measured")
        zoom.scatter([1.0], [v["actual"]], marker="*", s=240, color="gold", edgecolors="black",
                     zorder=4)
    ax.set_xscale("log")
    ax.set_yscale("log")
    _plain_log_y(ax)
    ax.set_xlabel("Training compute C (FLOPs)")
    ax.set_ylabel("Validation loss")
    ax.set_title(f"Verification run {v['name']!r} among the fitted runs")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8)
    zoom.set_xlim(-0.7, 1.7)
    zoom.set_xticks([0.0, 1.0], ["predicted", "measured"])
    zoom.set_title("Close-up")
    zoom.grid(True, axis="y", alpha=0.25)
    fig.subplots_adjust(left=0.08, right=0.98, top=0.9, bottom=0.12, wspace=0.25)
    return save_figure(fig, path, dpi=100)


def _plain_log_y(ax) -> None:
    """Plain numbers on a log loss axis: losses span less than a decade, where matplotlib's
    default labels read like 6x10^0. Minor ticks are labelled only when few decades show."""
    from matplotlib.ticker import LogFormatter

    ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
