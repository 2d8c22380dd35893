"""How well a Raptor surrogate reproduces its teacher, layer by layer."""

from __future__ import annotations

import matplotlib.pyplot as plt
import xarray as xr

from figures.style import KIND_COLOURS, axes, mark_phases, title

__all__ = ["plot_r2_per_layer"]


def plot_r2_per_layer(result: xr.Dataset, ax=None) -> plt.Figure:
    """R² of a surrogate's rollout (``r2`` (layer, token_kind)) against the teacher at every layer, one line per token kind."""
    figure, ax = axes(ax)
    for kind in result["token_kind"].values.tolist():
        curve = result["r2"].sel(token_kind=kind)
        ax.plot(curve["layer"], curve, marker="o", markersize=3, color=KIND_COLOURS.get(kind),
                linewidth=2.0 if kind == "all" else 1.2, label=kind)
    mark_phases(ax, result, axis="layer")
    ax.set_xlabel("layer (0 = embedding, l = output of block l)")
    ax.set_ylabel("R² of surrogate vs teacher")
    ax.set_ylim(top=1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title(result, f"Raptor k = {result.attrs.get('k', '?')}, R² per layer"), fontsize=9)
    return figure
