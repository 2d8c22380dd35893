"""Figures of perturbation recovery (`analyses.perturbation`): gaps after injection, and recovery ratios."""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np
import xarray as xr

from figures.style import mark_phases, title

__all__ = ["plot_perturbation_recovery", "plot_recovery_comparison"]

BASIS_STYLES = {"random": "-", "principal": "--"}


def _default_kind(result: xr.Dataset) -> str:
    kinds = [str(k) for k in result["token_kind"].values]
    return "cls" if "cls" in kinds else kinds[0]


def plot_perturbation_recovery(result: xr.Dataset, fig: plt.Figure | None = None, token_kind: str | None = None,
                               alpha: float | None = None, basis: str = "random") -> plt.Figure:
    """Relative gap and angle after injection at every l0, and the recovery ratio against l0.

    ``token_kind`` defaults to cls where there is one, ``alpha`` to the largest; ``alpha`` and
    ``basis`` choose the two trajectory panels, the recovery panel shows every basis.
    """
    kind = token_kind or _default_kind(result)
    alpha = float(result["alpha"].max()) if alpha is None else alpha
    starts = result["start"].values
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(starts)))
    figure = plt.figure(figsize=(16, 4.4)) if fig is None else fig
    gaps, angles, recovery = figure.subplots(1, 3)
    selected = result.sel(token_kind=kind, basis=basis).sel(alpha=alpha, method="nearest")
    for start, colour in zip(starts, colours):
        trace = selected.sel(start=start)
        layers = trace["layer"].values[int(start) :]
        gaps.plot(layers, trace["distance"].median(["image", "direction"]).values[int(start) :], color=colour,
                  marker="o", markersize=2.5, label=f"l0={int(start)}")
        angles.plot(layers, trace["angle"].median(["image", "direction"]).values[int(start) :], color=colour,
                    marker="o", markersize=2.5)
    gaps.set(yscale="log", xlabel="layer l", ylabel="relative gap |x~ - x| / |x| (median)")
    gaps.set_title(f"{kind} tokens, {basis} directions, alpha={float(selected['alpha']):g}", fontsize=9)
    angles.set(xlabel="layer l", ylabel="angle to clean token (deg, median)")
    angles.set_title("angle between perturbed and clean trajectory", fontsize=9)
    gaps.legend(fontsize=6, ncol=2)
    alphas = result["alpha"].values[result["alpha"].values > 0]
    shades = plt.cm.plasma(np.linspace(0.1, 0.8, len(alphas)))
    for b in result["basis"].values:
        median = result["recovery"].sel(token_kind=kind, basis=b).median(["image", "direction"])
        for a, shade in zip(alphas, shades):
            recovery.plot(starts, median.sel(alpha=a).values, BASIS_STYLES.get(str(b), ":"), color=shade, marker="o",
                          markersize=3, label=f"{b}, alpha={a:g}")
    recovery.axhline(1, color="k", linewidth=0.8, alpha=0.6, label="no recovery (ratio 1)")
    recovery.set(yscale="log", xlabel="injection layer l0", ylabel="recovery ratio: gap at L / alpha (median)")
    recovery.set_title(f"{kind} tokens: below 1 the trajectory bends back", fontsize=9)
    recovery.legend(fontsize=6, ncol=2, loc="best")
    for ax in (gaps, angles, recovery):
        mark_phases(ax, result)
        ax.grid(alpha=0.3, which="both")
    figure.suptitle(title(result, f"perturbation recovery (through {result.attrs.get('propagator', '?')})"), fontsize=11)
    figure.tight_layout()
    return figure


def plot_recovery_comparison(results: Mapping[str, xr.Dataset], fig: plt.Figure | None = None, token_kind: str | None = None,
                             basis: str = "random") -> plt.Figure:
    """Recovery ratio against l0 for several propagators of the same store, e.g. ``{"ViT": live,
    "Raptor k=2": surrogate}``; the first one's phases are marked.
    """
    first = next(iter(results.values()))
    kind = token_kind or _default_kind(first)
    alphas = first["alpha"].values[first["alpha"].values > 0]
    figure = plt.figure(figsize=(4.2 * len(alphas), 3.8)) if fig is None else fig
    axes = figure.subplots(1, len(alphas), sharey=True, squeeze=False)
    styles = ["-", "--", ":", "-."]
    for ax, a in zip(axes[0], alphas):
        for (label, result), style in zip(results.items(), styles):
            recovery = result["recovery"].sel(token_kind=kind, basis=basis, alpha=a)
            median = recovery.median(["image", "direction"])
            low, high = recovery.quantile([0.25, 0.75], dim=["image", "direction"]).values
            ax.plot(result["start"].values, median.values, style, marker="o", markersize=3, label=label)
            ax.fill_between(result["start"].values, low, high, alpha=0.15)
        ax.axhline(1, color="k", linewidth=0.8, alpha=0.6)
        mark_phases(ax, first)
        ax.set(yscale="log", xlabel="injection layer l0", title=f"alpha={a:g}")
        ax.grid(alpha=0.3, which="both")
    axes[0, 0].set_ylabel(f"recovery ratio ({kind}, median, IQR)")
    axes[0, 0].legend(fontsize=8)
    figure.suptitle(title(first, f"perturbation recovery, {basis} directions: " + " vs ".join(results)), fontsize=11)
    figure.tight_layout()
    return figure
