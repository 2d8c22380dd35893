"""Figures of `analyses.tokens`: angular speed per token kind, norms, and patch coherence."""

from __future__ import annotations

import matplotlib.pyplot as plt
import xarray as xr

from figures.basins import band
from figures.style import KIND_COLOURS, mark_phases, title


def plot_angular_speed(result: xr.Dataset, fig=None) -> plt.Figure:
    """Angular speed per token kind against block (10-90% bands over images), and token norms."""
    figure = fig or plt.figure(figsize=(11, 4.2), layout="constrained")
    speed, norms = figure.subplots(1, 2)
    blocks, layers = result["block"].values, result["layer"].values
    for kind in result["token_kind"].values:
        colour = KIND_COLOURS.get(str(kind))
        band(speed, blocks, result["speed"].sel(token_kind=kind), "image", colour, str(kind))
        norms.plot(layers, result["norm"].sel(token_kind=kind).mean("image"), color=colour, marker="o", markersize=3,
                   label=str(kind))
    mark_phases(speed, result, axis="block")
    mark_phases(norms, result)
    speed.set(xlabel="block (layer b-1 → b)", ylabel="angular speed arccos(x̂_ℓ+1 · x̂_ℓ) (deg)")
    speed.set_title(title(result, "angular speed per token kind"), fontsize=10)
    norms.set(xlabel="layer ℓ", ylabel="mean token norm ‖x_ℓ‖", yscale="log")
    norms.set_title(title(result, "norm growth (why angles)"), fontsize=10)
    for ax in (speed, norms):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return figure


def plot_coherence(result: xr.Dataset, fig=None) -> plt.Figure:
    """Patch coherence κ of states (per layer) and of updates (per block)."""
    if "coherence" not in result:
        raise ValueError("the result has no patch coherence (the store has no patch tokens)")
    figure = fig or plt.figure(figsize=(11, 4.2), layout="constrained")
    states, updates = figure.subplots(1, 2)
    band(states, result["layer"].values, result["coherence"], "image", "tab:blue", "patch states")
    band(updates, result["block"].values, result["update_coherence"], "image", "tab:purple", "patch updates")
    mark_phases(states, result)
    mark_phases(updates, result, axis="block")
    states.set(xlabel="layer ℓ", ylabel="κ_ℓ = mean_p cos(x_ℓ,p, mean_p x_ℓ,p)")
    states.set_title(title(result, "patch coherence of states"), fontsize=10)
    updates.set(xlabel="block (layer b-1 → b)", ylabel="κ of updates Δx_p")
    updates.set_title(title(result, "patch coherence of updates"), fontsize=10)
    for ax in (states, updates):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return figure
