"""Figures of the live-model analyses: perturbation recovery, block Jacobian spectra, layer swaps.

Each function draws one figure kind from a result Dataset (`analyses.perturbation`,
`analyses.jacobian`, `analyses.swap`), marks phase boundaries (layers after which a new phase
begins) and names the model in its title. None runs a model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import xarray as xr

from figures.dynamics import mark_boundaries

__all__ = ["plot_jacobian_spectrum", "plot_layer_swap", "plot_perturbation_recovery", "plot_recovery_comparison"]

BASIS_STYLES = {"random": "-", "principal": "--"}


def _title(result: xr.Dataset, what: str) -> str:
    return f"{result.attrs.get('model', 'unknown model')}: {what}"


def _default_kind(result: xr.Dataset) -> str:
    kinds = [str(k) for k in result["token_kind"].values]
    return "cls" if "cls" in kinds else kinds[0]


def plot_perturbation_recovery(
    result: xr.Dataset,
    boundaries: Sequence[int] | None = None,
    token_kind: str | None = None,
    alpha: float | None = None,
    basis: str = "random",
) -> plt.Figure:
    """Relative gap and angle after injection at every l0, and the recovery ratio against l0.

    Parameters
    ----------
    result : xarray.Dataset
        From `analyses.perturbation.perturbation_recovery`.
    boundaries : sequence of int, optional
        Layers after which a new phase begins.
    token_kind : str, optional
        Whose gaps to draw (default cls where there is one).
    alpha : float, optional
        Perturbation size of the two trajectory panels (default the largest).
    basis : {"random", "principal"}
        Direction family of the two trajectory panels; the recovery panel shows every basis.
    """
    kind = token_kind or _default_kind(result)
    alpha = float(result["alpha"].max()) if alpha is None else alpha
    starts = result["start"].values
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(starts)))
    figure, (gaps, angles, recovery) = plt.subplots(1, 3, figsize=(16, 4.4))
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
    recovery.set(yscale="log", xlabel="injection layer l0",
                 ylabel=f"recovery ratio: gap at L / alpha (median)")
    recovery.set_title(f"{kind} tokens: below 1 the trajectory bends back", fontsize=9)
    recovery.legend(fontsize=6, ncol=2, loc="best")
    for ax in (gaps, angles, recovery):
        mark_boundaries(ax, boundaries)
        ax.grid(alpha=0.3, which="both")
    figure.suptitle(_title(result, f"perturbation recovery (through {result.attrs.get('propagator', '?')})"),
                    fontsize=11)
    figure.tight_layout()
    return figure


def plot_recovery_comparison(
    results: Mapping[str, xr.Dataset],
    boundaries: Sequence[int] | None = None,
    token_kind: str | None = None,
    basis: str = "random",
) -> plt.Figure:
    """Recovery ratio against l0 for several propagators of the same store (a ViT and its Raptor).

    Parameters
    ----------
    results : mapping of label to Dataset
        `perturbation_recovery` results with the same starts and alphas, e.g.
        ``{"ViT": live, "Raptor k=2": surrogate}``.
    """
    first = next(iter(results.values()))
    kind = token_kind or _default_kind(first)
    alphas = first["alpha"].values[first["alpha"].values > 0]
    figure, axes = plt.subplots(1, len(alphas), figsize=(4.2 * len(alphas), 3.8), sharey=True, squeeze=False)
    styles = ["-", "--", ":", "-."]
    for ax, a in zip(axes[0], alphas):
        for (label, result), style in zip(results.items(), styles):
            recovery = result["recovery"].sel(token_kind=kind, basis=basis, alpha=a)
            median = recovery.median(["image", "direction"])
            low, high = recovery.quantile([0.25, 0.75], dim=["image", "direction"]).values
            ax.plot(result["start"].values, median.values, style, marker="o", markersize=3, label=label)
            ax.fill_between(result["start"].values, low, high, alpha=0.15)
        ax.axhline(1, color="k", linewidth=0.8, alpha=0.6)
        mark_boundaries(ax, boundaries)
        ax.set(yscale="log", xlabel="injection layer l0", title=f"alpha={a:g}")
        ax.grid(alpha=0.3, which="both")
    axes[0, 0].set_ylabel(f"recovery ratio ({kind}, median, IQR)")
    axes[0, 0].legend(fontsize=8)
    figure.suptitle(_title(first, f"perturbation recovery, {basis} directions: " + " vs ".join(results)), fontsize=11)
    figure.tight_layout()
    return figure


def plot_jacobian_spectrum(result: xr.Dataset, boundaries: Sequence[int] | None = None) -> plt.Figure:
    """Top singular values of each block's Jacobian, expansion rates, and (if computed) the
    composed map to the last layer, against depth."""
    composed = "singular_value_to_end" in result
    figure, axes = plt.subplots(1, 3 if composed else 2, figsize=(15 if composed else 10.5, 4.2))
    spectrum, rates = axes[0], axes[1]
    layers = result["layer"].values
    ranks = result["rank"].values
    shades = plt.cm.Blues(np.linspace(0.95, 0.4, len(ranks)))
    for rank, shade in zip(ranks, shades):
        values = result["singular_value"].sel(rank=rank)
        spectrum.plot(layers, values.median("image").values, color=shade, marker="o", markersize=3,
                      label=f"sigma_{int(rank)}")
    low, high = result["singular_value"].sel(rank=1).quantile([0.1, 0.9], dim="image").values
    spectrum.fill_between(layers, low, high, color=shades[0], alpha=0.15, linewidth=0, label="sigma_1, 10-90%")
    spectrum.axhline(1, color="k", linewidth=0.8, alpha=0.6)
    spectrum.set(yscale="log", xlabel="block (layer l-1 → l)", ylabel="singular value of dX_l / dX_(l-1) (median)")
    spectrum.set_title("block Jacobian spectrum along real trajectories", fontsize=9)
    for name, colour, label in (("expansion_rate", "tab:blue", "log sigma_1 (absolute)"),
                                ("relative_expansion", "tab:red", "log sigma_1 - log norm growth (relative)")):
        values = result[name]
        rates.plot(layers, values.median("image").values, color=colour, marker="o", markersize=3, label=label)
        low, high = values.quantile([0.1, 0.9], dim="image").values
        rates.fill_between(layers, low, high, color=colour, alpha=0.15, linewidth=0)
    rates.axhline(0, color="k", linewidth=0.8, alpha=0.6)
    rates.set(xlabel="block (layer l-1 → l)", ylabel="expansion rate per block (nats)")
    rates.set_title("Lyapunov-like rates: above 0 a block expands perturbations", fontsize=9)
    for ax in (spectrum, rates):
        mark_boundaries(ax, boundaries, axis="block")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    if composed:
        to_end = axes[2]
        starts = result["start"].values
        values = result["singular_value_to_end"].sel(rank=1)
        to_end.plot(starts, values.median("image").values, color="tab:purple", marker="o", markersize=3,
                    label="sigma_1 of dX_L / dX_l0")
        low, high = values.quantile([0.1, 0.9], dim="image").values
        to_end.fill_between(starts, low, high, color="tab:purple", alpha=0.15, linewidth=0)
        to_end.axhline(1, color="k", linewidth=0.8, alpha=0.6)
        to_end.set(yscale="log", xlabel="injection layer l0", ylabel="top singular value to the last layer")
        to_end.set_title("most a small perturbation at l0 can grow by layer L", fontsize=9)
        mark_boundaries(to_end, boundaries)
        to_end.grid(alpha=0.3, which="both")
        to_end.legend(fontsize=7)
    figure.suptitle(_title(result, f"local linearisation ({result.sizes['image']} images)"), fontsize=11)
    figure.tight_layout()
    return figure


def plot_layer_swap(result: xr.Dataset, boundaries: Sequence[int] | None = None) -> plt.Figure:
    """Accuracy (or agreement) and last-layer R² for every swap, and within- vs across-phase swaps."""
    measure = "accuracy" if "accuracy" in result else "agreement"
    figure, (score, r2, spread) = plt.subplots(1, 3, figsize=(16, 4.8))
    targets, sources = result["target"].values, result["source"].values
    extent = (sources[0] - 0.5, sources[-1] + 0.5, targets[-1] + 0.5, targets[0] - 0.5)
    width = int(result.attrs.get("width", 1))
    for ax, values, label, cmap in ((score, result[measure], measure, "viridis"),
                                    (r2, result["r2"].sel(group="all"), "R² of layer L vs clean", "magma")):
        image = ax.imshow(values.values, extent=extent, cmap=cmap, aspect="auto",
                          vmin=float(np.nanmin(values)), vmax=float(np.nanmax(values)))
        figure.colorbar(image, ax=ax, label=label)
        for boundary in boundaries or []:
            ax.axvline(boundary + 0.5, color="w", linestyle=":", linewidth=1.2)
            ax.axhline(boundary + 0.5, color="w", linestyle=":", linewidth=1.2)
        ax.set(xlabel="block j run in its place", ylabel=f"first replaced layer i (width {width})")
        ax.set_title(f"{label} after the swap (dotted: phase boundaries)", fontsize=9)
    relations = [r for r in ("within", "across") if (result["relation"] == r).any()]
    for position, relation in enumerate(relations):
        values = result[measure].where(result["relation"] == relation).values.ravel()
        values = values[np.isfinite(values)]
        jitter = np.random.default_rng(0).uniform(-0.12, 0.12, values.size)
        spread.scatter(position + jitter, values, s=12, alpha=0.6, color=("tab:green", "tab:red")[position])
        spread.plot([position - 0.25, position + 0.25], [values.mean()] * 2, color="k", linewidth=2)
    clean = result.attrs.get("clean_accuracy") if measure == "accuracy" else 1.0
    if clean is not None and np.isfinite(clean):
        spread.axhline(clean, color="tab:blue", linewidth=1, label=f"clean run ({clean:.3f})")
        spread.legend(fontsize=8)
    spread.set_xticks(range(len(relations)), [f"{r} phase\n({int((result['relation'] == r).sum())} swaps)"
                                              for r in relations])
    spread.set(ylabel=measure, xlim=(-0.6, len(relations) - 0.4))
    spread.set_title(f"{measure} of swaps within vs across phases (bar: mean)", fontsize=9)
    spread.grid(alpha=0.3)
    figure.suptitle(_title(result, f"causal layer swap, phases {result.attrs.get('partition', '?')}"), fontsize=11)
    figure.tight_layout()
    return figure
