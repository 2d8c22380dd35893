"""Layer × layer similarity heatmaps with phase boundaries (the paper's Figures 1, 2 and 4A kind)."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import xarray as xr

from dynamo.partition import Partition, from_result

__all__ = ["similarity_grid", "similarity_heatmap", "to_similarity"]

BOUNDARY_COLORS = ("magenta", "lime", "orange", "cyan", "red")  # as the paper: 2-phase magenta, 3-phase green
SIMILARITIES = {"cosine": "cosine similarity", "angular": "1 - angle/pi", "cka": "linear CKA"}


def to_similarity(dissimilarity: xr.DataArray) -> xr.DataArray:
    """The similarity matching a bounded dissimilarity, for display: 1 − D (mean cos, CKA, 1 − angle/π); not for mse."""
    measure = dissimilarity.attrs.get("measure")
    if measure not in SIMILARITIES:
        raise ValueError(f"{measure!r} has no bounded similarity; use the dissimilarity itself")
    similarity = 1.0 - dissimilarity
    similarity.attrs = {**dissimilarity.attrs, "orientation": "similarity", "description": SIMILARITIES[measure]}
    similarity.name = f"{measure}_similarity"
    return similarity


def similarity_heatmap(dissimilarity: xr.DataArray | xr.Dataset, partitions=None, ax: plt.Axes | None = None, *,
                       title: str | None = None, as_similarity: bool = True, annotate: bool | None = None,
                       vmin: float | None = None, vmax: float | None = None, colorbar: bool = True,
                       note: str | None = None) -> plt.Figure:
    """Draw a layer × layer matrix with dashed lines at phase boundaries.

    Parameters
    ----------
    dissimilarity : xarray.DataArray (layer_i, layer_j), or xarray.Dataset
        A `analyses.similarity.layer_similarity` matrix, or a `analyses.phases.phase_analysis` result.
    partitions : Partition, list of list of int, or mapping of str to partition, optional
        One partition, or several by name (as the paper's Figure 2), each in its own colour with a legend;
        default the partition the result carries; ``{}`` draws none.
    as_similarity : bool
        Show 1 − D as the paper's figures do; ignored for MSE.
    annotate : bool, optional
        Print the values in the cells; default for matrices of at most 16 layers.
    note : str, optional
        A line of text under the matrix; default a phase-analysis result's ``gradient_null_conclusion``.
    """
    partitions = from_result(dissimilarity) if partitions is None else partitions
    if note is None and isinstance(dissimilarity, xr.Dataset):
        note = dissimilarity.attrs.get("gradient_null_conclusion")
    matrix = dissimilarity["dissimilarity"] if isinstance(dissimilarity, xr.Dataset) else dissimilarity
    if matrix.dims != ("layer_i", "layer_j"):
        raise ValueError(f"expected a (layer_i, layer_j) matrix, got dims {matrix.dims}")
    shown = to_similarity(matrix) if as_similarity and matrix.attrs.get("measure") != "mse" else matrix
    if ax is None:
        _, ax = plt.subplots(figsize=(6.4, 5.4))
    layers = matrix["layer_i"].values
    n = len(layers)
    image = ax.imshow(shown.values, cmap="viridis", vmin=vmin, vmax=vmax, origin="upper")
    ax.set_xticks(range(n), [str(layer) for layer in layers])
    ax.set_yticks(range(n), [str(layer) for layer in layers])
    ax.set_xlabel("layer (block output)")
    ax.set_ylabel("layer (block output)")
    if annotate if annotate is not None else n <= 16:
        middle = np.nanmean([image.norm.vmin, image.norm.vmax])
        for i in range(n):
            for j in range(n):
                value = shown.values[i, j]
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6,
                        color="black" if value > middle else "white")
    named = _named_partitions(partitions)
    drawn = False  # a partition of one phase draws no line, so has no legend entry
    for order, ((name, partition), color) in enumerate(zip(named.items(), BOUNDARY_COLORS)):
        width = 1.6 + 1.6 * (len(named) - 1 - order)  # earlier partitions wider, so shared lines show both
        positions = np.searchsorted(layers, Partition(partition).boundaries) + 0.5
        for number, position in enumerate(positions):
            ax.axvline(position, color=color, linestyle="--", linewidth=width, label=name if number == 0 else None)
            ax.axhline(position, color=color, linestyle="--", linewidth=width)
            drawn = True
    if drawn and (len(named) > 1 or (named and next(iter(named)) != "")):
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=len(named), fontsize=8, frameon=False)
    description = shown.attrs.get("description", shown.name)
    if title is None:
        title = f"{matrix.attrs.get('model', '')}\n{description}, tokens {matrix.attrs.get('tokens', '?')}".strip()
    ax.set_title(title, fontsize=9)
    if colorbar:
        plt.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label=description)
    if note:
        ax.annotate(textwrap.fill(note[0].upper() + note[1:] + ".", 95), (0.5, -0.2 if named else -0.12),
                    xycoords="axes fraction", ha="center", va="top", fontsize=7)
    return ax.figure


def similarity_grid(matrices: Mapping[str, xr.DataArray | xr.Dataset] | Sequence[xr.DataArray | xr.Dataset],
                    partitions: Mapping[str, object] | Sequence | None = None, *, ncols: int = 3, as_similarity: bool = True,
                    suptitle: str | None = None) -> plt.Figure:
    """Several models' matrices side by side, on one colour scale, each with its boundaries.

    Parameters
    ----------
    matrices : mapping of panel title to matrix, or sequence of matrices
        Matrices or phase-analysis results, as `similarity_heatmap`; a sequence is titled by model name.
    partitions : mapping or sequence, optional
        One partition per panel (same keys or order as ``matrices``); default each result's own.
    """
    if not isinstance(matrices, Mapping):
        names = [matrix.attrs.get("model", "matrix") for matrix in matrices]
        if len(set(names)) < len(names):
            names = [f"{name} ({index + 1})" for index, name in enumerate(names)]
        matrices = dict(zip(names, matrices))
    if not matrices:
        raise ValueError("no matrices to draw")
    if partitions is None:
        partitions = {name: from_result(matrix) for name, matrix in matrices.items()}
    elif not isinstance(partitions, Mapping):
        partitions = dict(zip(matrices, partitions))
    matrices = {name: m["dissimilarity"] if isinstance(m, xr.Dataset) else m for name, m in matrices.items()}
    measures = {matrix.attrs.get("measure") for matrix in matrices.values()}
    if len(measures) > 1:
        raise ValueError(f"panels of one grid must share a measure, got {sorted(map(str, measures))}")
    similar = as_similarity and measures != {"mse"}
    shown = [to_similarity(m) if similar else m for m in matrices.values()]
    vmin = min(float(np.nanmin(m.values)) for m in shown)
    vmax = max(float(np.nanmax(m.values)) for m in shown)
    ncols = min(ncols, len(matrices))
    nrows = -(-len(matrices) // ncols)
    figure, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 4.1 * nrows), squeeze=False, layout="constrained")
    for ax, (name, matrix) in zip(axes.flat, matrices.items()):
        similarity_heatmap(matrix, partitions.get(name), ax=ax, title=name, as_similarity=as_similarity,
                           vmin=vmin, vmax=vmax, colorbar=False, annotate=False)
    for ax in axes.flat[len(matrices):]:
        ax.set_visible(False)
    first = next(iter(matrices.values()))
    description = shown[0].attrs.get("description", "")
    figure.colorbar(axes.flat[0].images[0], ax=axes, shrink=0.8, label=description)
    figure.suptitle(suptitle or f"{description} ({first.attrs.get('tokens', '')}), dashed: phase boundaries")
    return figure


def _named_partitions(partitions) -> dict[str, list[list[int]]]:
    if partitions is None:
        return {}
    return dict(partitions) if isinstance(partitions, Mapping) else {"": partitions}
