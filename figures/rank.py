"""Figures of `analyses.rank`: rank measures of the per-block updates, with bootstrap intervals."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import xarray as xr

from figures.style import KIND_COLOURS, mark_phases, title

MEASURE_LABELS = {
    "stable_rank": "stable rank",
    "effective_rank": "effective rank",
    "participation_ratio": "participation ratio",
    "n_directions": "directions for {variance:.0%} variance",
}


def plot_update_rank(result: xr.Dataset, fig=None, level: float = 0.95) -> plt.Figure:
    """Rank measures of the updates per block, one row per space, one column per measure, with bootstrap intervals at ``level``."""
    spaces, measures = result["space"].values, result["measure"].values
    figure = fig or plt.figure(figsize=(4 * len(measures), 3.4 * len(spaces)), layout="constrained")
    grid = figure.subplots(len(spaces), len(measures), squeeze=False)
    blocks = result["block"].values
    has_bootstrap = "rank_bootstrap" in result
    if has_bootstrap:
        tail = (1 - level) / 2
        bounds = result["rank_bootstrap"].quantile([tail, 1 - tail], dim="replicate", skipna=True)
    offsets = np.linspace(-0.15, 0.15, result.sizes["token_kind"])
    for r, space in enumerate(spaces):
        for c, measure in enumerate(measures):
            ax = grid[r, c]
            for kind, offset in zip(result["token_kind"].values, offsets):
                where = dict(measure=measure, token_kind=kind, space=space)
                value = result["rank"].sel(where).values
                error = None
                if has_bootstrap:
                    low, high = bounds.sel(where).values
                    error = np.clip([value - low, high - value], 0, None)
                ax.errorbar(blocks + offset, value, yerr=error, color=KIND_COLOURS.get(str(kind)), marker="o",
                            markersize=3, capsize=2, linewidth=1, label=str(kind))
            mark_phases(ax, result, axis="block")
            label = MEASURE_LABELS.get(str(measure), str(measure)).format(variance=result.attrs.get("variance", 0.9))
            ax.set(xlabel="block (layer b-1 → b)", ylabel=label)
            ax.set_title(f"{space} updates: {label}", fontsize=9)
            ax.grid(alpha=0.3)
    grid[0, 0].legend(fontsize=7)
    error_note = f", {level:.0%} bootstrap intervals over images" if has_bootstrap else ""
    figure.suptitle(title(result, f"rank of per-block updates{error_note}"), fontsize=11)
    return figure
