"""Figure of the causal layer swap (`analyses.swap`): every swap's score, and within- vs across-phase swaps."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import xarray as xr

from dynamo.partition import boundaries_of, from_result
from figures.style import title

__all__ = ["plot_layer_swap"]


def plot_layer_swap(result: xr.Dataset, fig: plt.Figure | None = None) -> plt.Figure:
    """Accuracy (or agreement) and last-layer R² for every swap, and within- vs across-phase swaps."""
    measure = next((name for name in ("accuracy", "agreement") if name in result), None)
    if measure is None:  # a model without a head: last-layer R² is the only score
        measure = "last-layer R²"
        result = result.assign({measure: result["r2"].sel(token_kind="all", drop=True)})
    figure = plt.figure(figsize=(16, 4.8)) if fig is None else fig
    score, r2, spread = figure.subplots(1, 3)
    targets, sources = result["target"].values, result["block"].values
    extent = (sources[0] - 0.5, sources[-1] + 0.5, targets[-1] + 0.5, targets[0] - 0.5)
    width = int(result.attrs.get("width", 1))
    head = result.attrs.get("accuracy_head")
    named = f"{measure} ({head} head)" if head and measure != "last-layer R²" else measure
    for ax, values, label, cmap in ((score, result[measure], named, "viridis"),
                                    (r2, result["r2"].sel(token_kind="all"), "R² of layer L vs clean", "magma")):
        image = ax.imshow(values.values, extent=extent, cmap=cmap, aspect="auto",
                          vmin=float(np.nanmin(values)), vmax=float(np.nanmax(values)))
        figure.colorbar(image, ax=ax, label=label)
        for boundary in boundaries_of(result):
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
    figure.suptitle(title(result, f"causal layer swap, phases {from_result(result)}"), fontsize=11)
    figure.tight_layout()
    return figure
