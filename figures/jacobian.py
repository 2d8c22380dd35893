"""Figure of block Jacobian spectra (`analyses.jacobian`): singular values, expansion rates, composed maps."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import xarray as xr

from figures.style import mark_phases, title

__all__ = ["plot_jacobian_spectrum"]


def plot_jacobian_spectrum(result: xr.Dataset, fig: plt.Figure | None = None) -> plt.Figure:
    """Top singular values of each block's Jacobian, expansion rates, and any composed map to the last layer, against depth."""
    composed = "singular_value_to_end" in result
    figure = plt.figure(figsize=(15 if composed else 10.5, 4.2)) if fig is None else fig
    axes = figure.subplots(1, 3 if composed else 2)
    spectrum, rates = axes[0], axes[1]
    blocks = result["block"].values
    components = result["component"].values
    shades = plt.cm.Blues(np.linspace(0.95, 0.4, len(components)))
    for component, shade in zip(components, shades):
        values = result["singular_value"].sel(component=component)
        spectrum.plot(blocks, values.median("image").values, color=shade, marker="o", markersize=3,
                      label=f"sigma_{int(component)}")
    low, high = result["singular_value"].sel(component=1).quantile([0.1, 0.9], dim="image").values
    spectrum.fill_between(blocks, low, high, color=shades[0], alpha=0.15, linewidth=0, label="sigma_1, 10-90%")
    spectrum.axhline(1, color="k", linewidth=0.8, alpha=0.6)
    spectrum.set(yscale="log", xlabel="block (layer l-1 → l)", ylabel="singular value of dX_l / dX_(l-1) (median)")
    spectrum.set_title("block Jacobian spectrum along real trajectories", fontsize=9)
    for name, colour, label in (("expansion_rate", "tab:blue", "log sigma_1 (absolute)"),
                                ("relative_expansion", "tab:red", "log sigma_1 - log norm growth (relative)")):
        values = result[name]
        rates.plot(blocks, values.median("image").values, color=colour, marker="o", markersize=3, label=label)
        low, high = values.quantile([0.1, 0.9], dim="image").values
        rates.fill_between(blocks, low, high, color=colour, alpha=0.15, linewidth=0)
    rates.axhline(0, color="k", linewidth=0.8, alpha=0.6)
    rates.set(xlabel="block (layer l-1 → l)", ylabel="expansion rate per block (nats)")
    rates.set_title("Lyapunov-like rates: above 0 a block expands perturbations", fontsize=9)
    for ax in (spectrum, rates):
        mark_phases(ax, result, axis="block")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    if composed:
        to_end = axes[2]
        starts = result["start"].values
        values = result["singular_value_to_end"].sel(component=1)
        to_end.plot(starts, values.median("image").values, color="tab:purple", marker="o", markersize=3,
                    label="sigma_1 of dX_L / dX_l0")
        low, high = values.quantile([0.1, 0.9], dim="image").values
        to_end.fill_between(starts, low, high, color="tab:purple", alpha=0.15, linewidth=0)
        to_end.axhline(1, color="k", linewidth=0.8, alpha=0.6)
        to_end.set(yscale="log", xlabel="injection layer l0", ylabel="top singular value to the last layer")
        to_end.set_title("most a small perturbation at l0 can grow by layer L", fontsize=9)
        mark_phases(to_end, result)
        to_end.grid(alpha=0.3, which="both")
        to_end.legend(fontsize=7)
    figure.suptitle(title(result, f"local linearisation ({result.sizes['image']} images)"), fontsize=11)
    figure.tight_layout()
    return figure
