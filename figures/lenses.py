"""Phases under several lenses side by side (`analyses.lenses`): matrices with their segmentations, the knee path, agreement."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import xarray as xr

from dynamo.partition import Partition, from_result
from figures.similarity import similarity_heatmap
from figures.style import mark_boundaries

__all__ = ["lens_panels"]

MATRIX_TITLES = {"cosine": "cosine similarity", "cka": "linear CKA", "jacobian": "Jacobian subspace overlap"}


def lens_panels(result: xr.Dataset, fig: plt.Figure | None = None) -> plt.Figure:
    """One row: each lens's matrix as a similarity (colours span its off-diagonal values) with its
    max-cut and contiguous boundaries, the knee lens's angular change and path, and the agreement
    matrix (boundary F1 above the diagonal, adjusted Rand index below); ``fig`` is cleared first.
    """
    lenses = [lens for lens in result.attrs.get("lenses", []) if f"{lens}_dissimilarity" in result]
    knee = "angular_change" in result
    n_panels = len(lenses) + knee + 1
    if fig is None:
        fig = plt.figure(figsize=(4.3 * n_panels, 4.6), layout="constrained")
    fig.clear()
    axes = fig.subplots(1, n_panels, squeeze=False)[0]
    partitions = _partitions(result)
    for ax, lens in zip(axes, lenses):
        dissimilarity = result[f"{lens}_dissimilarity"]
        similarity = (1.0 - dissimilarity).assign_attrs({**dissimilarity.attrs, "orientation": "similarity",
                                                         "description": MATRIX_TITLES[lens]})
        named = {method: partitions[f"{lens}/{method}"] for method in ("maxcut", "contiguous")}
        off_diagonal = similarity.values[~np.eye(similarity.shape[0], dtype=bool)]
        similarity_heatmap(similarity, named, ax=ax, as_similarity=False, annotate=False,
                           title=f"{MATRIX_TITLES[lens]} (colours: off-diagonal range)",
                           vmin=float(off_diagonal.min()), vmax=float(off_diagonal.max()))
    if knee:
        _knee_panel(axes[len(lenses)], result, partitions["knee"])
    _agreement_panel(axes[-1], result)
    fig.suptitle(f"{result.attrs.get('model', 'unknown model')}: phases under {len(lenses) + knee} lenses, "
                 f"k = {result.attrs.get('k')} each")
    return fig


def _partitions(result: xr.Dataset) -> dict[str, Partition]:
    return {
        str(name): from_result(result.assign_coords(phase=("layer", labels)))
        for name, labels in zip(result["segmentation"].values, result["phase_of"].values)
    }


def _knee_panel(ax: plt.Axes, result: xr.Dataset, partition: Partition) -> None:
    change = result["angular_change"]
    layers = change["layer"].values
    ax.bar(layers, change.values, color="0.75", label="angle between layers l-1 and l")
    ax.set_xticks(np.r_[layers[0] - 1, layers])
    ax.set_xlabel("layer (block output)")
    ax.set_ylabel("angular change per block (units of pi)")
    path = ax.twinx()
    start = layers[0] - 1
    path.plot(np.r_[start, layers], np.r_[0.0, np.cumsum(change.values)], "o-", color="tab:blue", markersize=3,
              label="cumulative angle")
    path.set_ylabel("cumulative angle (units of pi)", color="tab:blue")
    mark_boundaries(ax, partition.boundaries, axis="layer")
    ax.set_title("knee lens: angular path and its knees", fontsize=9)
    handles = [*ax.get_legend_handles_labels()[0], *path.get_legend_handles_labels()[0]]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize=7, frameon=False)


def _agreement_panel(ax: plt.Axes, result: xr.Dataset) -> None:
    f1, ari = result["boundary_f1"].values, result["adjusted_rand"].values
    n = len(f1)
    upper = np.triu(np.ones((n, n), dtype=bool), 1)
    shown = np.where(upper, f1, np.where(upper.T, ari, np.nan))
    image = ax.imshow(shown, cmap="viridis", vmin=min(0.0, float(np.nanmin(ari))), vmax=1.0)
    for i in range(n):
        for j in range(n):
            if i != j:
                ax.text(j, i, f"{shown[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="black" if shown[i, j] > 0.5 else "white")
    names = [str(name) for name in result["segmentation"].values]
    ax.set_xticks(range(n), names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(n), names, fontsize=7)
    ax.set_title(f"agreement: boundary F1 (±{result.attrs.get('tolerance', 1)}) above, ARI below", fontsize=9)
    plt.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
