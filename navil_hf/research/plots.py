"""The PNGs of the scaling fits (`ScalingFit.plot`, `JointFit.plot` in `navil_hf.research.scaling`).
matplotlib is imported only when a plot is drawn."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ..errors import UsageError


def figure(width, height, ncols, layout="constrained"):
    """(figure, axes) of `ncols` side-by-side plots, drawn off-screen (Agg) without pyplot's global state;
    without matplotlib, a `UsageError` that says how to install it."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError("plotting needs matplotlib (pip install 'navil-hf[research]')") from None
    fig = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols)


def plot_fit(fit, path):
    """Write a PNG of a `ScalingFit`: loss against compute with iso-N fit curves and the compute-optimal
    frontier (and the frontier of the fit without the held-out runs), and N_opt / D_opt against compute
    (bootstrap 95% bands)."""
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import ScalarFormatter

    N, D, loss = fit.data["N"], fit.data["D"], fit.data["loss"]
    C = 6.0 * N * D
    fig, (ax, ax2) = figure(13, 5.2, 2)
    cmap = colormaps["viridis"]
    norm = LogNorm(vmin=N.min(), vmax=max(N.max(), N.min() * 1.0001))
    held = np.zeros(len(N), dtype=bool)
    if fit.holdout and "runs" in fit.holdout:
        held_c = fit.holdout["held_min_compute"]
        held = C >= held_c
    ax.scatter(C[~held], loss[~held], c=N[~held], cmap=cmap, norm=norm, s=18, edgecolors="k", linewidths=0.3)
    if held.any():
        ax.scatter(C[held], loss[held], c=N[held], cmap=cmap, norm=norm, s=40, marker="D", edgecolors="r")
    sizes = np.unique(N)
    pick = sizes[np.unique(np.linspace(0, len(sizes) - 1, min(len(sizes), 7)).round().astype(int))]
    d_line = np.geomspace(D.min(), D.max(), 200)
    for n in pick:
        ax.plot(6 * n * d_line, fit.predict(n, d_line), color=cmap(norm(n)), lw=1, alpha=0.8)
    c_line = np.geomspace(C.min() / 2, C.max() * 10, 200)
    ax.plot(c_line, fit.optimal_loss(c_line), "k--", lw=2, label="compute-optimal frontier")
    if fit.holdout and "parameters" in fit.holdout:
        sub = dataclasses.replace(fit, **fit.holdout["parameters"])  # the law fitted without the held-out runs
        ax.plot(c_line, sub.optimal_loss(c_line), ":", color="0.4", lw=1.5, label="frontier without held-out runs")
        ax.scatter([], [], marker="D", facecolors="none", edgecolors="r", label="held-out runs")
    ax.set(xscale="log", yscale="log", xlabel="compute C = 6ND (FLOP)", ylabel="loss")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.set_title(
        f"E={fit.E:.3g}  A={fit.A:.4g}  B={fit.B:.4g}  alpha={fit.alpha:.3f}  beta={fit.beta:.3f}", fontsize=10
    )
    ax.legend(fontsize=8, loc="upper right")
    cbar = fig.colorbar(ax.collections[0], ax=ax)
    cbar.set_label("model size N (lines: fit at iso-N)")

    n_opt, d_opt = fit.compute_optimal(c_line)
    ax2.plot(c_line, n_opt, "C0", lw=2, label=f"N_opt ~ C^{fit.a:.3f}")
    ax2.plot(c_line, d_opt, "C1", lw=2, label=f"D_opt ~ C^{fit.b:.3f}")
    nat = fit.bootstrap_samples
    bands = nat is not None and len(nat["E"]) > 2
    if bands:
        with np.errstate(all="ignore"):
            G = (nat["alpha"] * nat["A"] / (nat["beta"] * nat["B"])) ** (1 / (nat["alpha"] + nat["beta"]))
            Nb = G[:, None] * (c_line[None, :] / 6) ** nat["a"][:, None]
            Db = c_line[None, :] / (6 * Nb)
        for band, color in ((Nb, "C0"), (Db, "C1")):
            ax2.fill_between(c_line, *np.nanpercentile(band, [2.5, 97.5], axis=0), color=color, alpha=0.2, lw=0)
    ax2.scatter(C, N, s=8, color="C0", alpha=0.35, label="runs: N")
    ax2.scatter(C, D, s=8, color="C1", alpha=0.35, label="runs: D")
    ax2.set(xscale="log", yscale="log", xlabel="compute C (FLOP)", ylabel="parameters / tokens")
    ax2.set_title("compute-optimal allocation" + (" (bands: bootstrap 95%)" if bands else ""), fontsize=10)
    ax2.legend(fontsize=8)
    fig.savefig(path, format="png", dpi=110)


def plot_joint(fit, path):
    """Write a PNG of a `JointFit`: loss against ViT size per LLM size with the quadratics and their minima,
    and the log-log line of N_v* against N_l (bootstrap 95% band)."""
    from matplotlib import colormaps

    vit, loss = fit.data["vit"], fit.data["loss"]
    labels = fit.group_labels
    fig, (ax, ax2) = figure(12, 5, 2)
    cmap = colormaps["plasma"]
    n_groups = int(labels.max()) + 1
    for g, info in enumerate(fit.groups):
        sel = labels == g
        color = cmap(0.85 * g / max(1, n_groups - 1))
        ax.scatter(vit[sel], loss[sel], color=color, s=20, label=f"LLM {info['llm_params']:.3g}")
        curve = fit.loss_curve(g)
        if curve is not None:
            u = np.log(vit[sel])
            mu, coef = curve
            uu = np.linspace(u.min(), u.max(), 100) - mu
            ax.plot(np.exp(uu + mu), coef[0] + coef[1] * uu + coef[2] * uu * uu, color=color, lw=1)
            if info["bracketed"]:
                du = math.log(info["vit_opt"]) - mu
                ax.plot(info["vit_opt"], coef[0] + coef[1] * du + coef[2] * du * du, "*", color=color, ms=12, mec="k")
    ax.set(xscale="log", xlabel="ViT parameters N_v", ylabel="loss")
    ax.set_title("loss vs ViT size per LLM size (stars: minima)", fontsize=10)
    ax.legend(fontsize=7)
    bracketed = [g for g in fit.groups if g["bracketed"]]
    xl = np.array([g["llm_params"] for g in bracketed])
    yv = np.array([g["vit_opt"] for g in bracketed])
    ax2.scatter(xl, yv, color="k", zorder=3, label="N_v* per LLM size")
    x_line = np.geomspace(xl.min() / 1.5, xl.max() * 1.5, 100)
    ax2.plot(x_line, fit.optimal_vit(x_line), "C3", label=f"N_v* = {math.exp(fit.c):.3g} N_l^{fit.k:.3f}")
    samples = fit.bootstrap_samples
    if samples is not None and len(samples["k"]) > 2:
        band = np.exp(samples["c"][:, None]) * x_line[None, :] ** samples["k"][:, None]
        ax2.fill_between(x_line, *np.percentile(band, [2.5, 97.5], axis=0), color="C3", alpha=0.2, lw=0)
    ax2.set(xscale="log", yscale="log", xlabel="LLM parameters N_l", ylabel="optimal ViT parameters N_v*")
    ax2.set_title("optimal ViT size vs LLM size (band: bootstrap 95%)", fontsize=10)
    ax2.legend(fontsize=8)
    fig.savefig(path, format="png", dpi=110)
