"""Comparison figures: several profiled models side by side, depth normalised to [0, 1], each with its own phases."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import xarray as xr

from dynamo.partition import boundaries_of, from_result
from figures.similarity import similarity_grid

__all__ = ["plot_overlaid", "plot_similarity_grid"]


def plot_similarity_grid(study: xr.Dataset) -> plt.Figure:
    """Every model's layer dissimilarity (shown as similarity) with its phase boundaries, on one scale."""
    partitions = {str(model): from_result(_phase(study, model)) for model in study["model"].values}
    matrices = {}
    for model in study["model"].values:
        matrix = study["similarity"].sel(model=model).dropna("layer_i", how="all").dropna("layer_j", how="all")
        matrices[str(model)] = matrix.assign_attrs(measure="cosine", tokens="cls+patch_mean", model=str(model),
                                                   description="cosine similarity")
    return similarity_grid(matrices, partitions, ncols=min(4, len(matrices)))


def plot_overlaid(study: xr.Dataset, variable: str, selection: dict, ylabel: str) -> plt.Figure:
    """One curve per model of ``variable`` (after ``selection``) against normalised depth, each model's
    phase boundaries dashed.
    """
    data = study[variable].sel(selection)
    depth_dim = "layer" if "layer" in data.dims else "block"
    depth_name = "depth" if depth_dim == "layer" else "block_depth"
    extra = [dim for dim in data.dims if dim not in ("model", depth_dim)]
    if extra:
        raise ValueError(f"{variable} with {selection} still has dims {extra}; select them too")
    figure, ax = plt.subplots(figsize=(6.4, 4.0))
    for index, model in enumerate(study["model"].values):
        color = plt.cm.tab10(index % 10)
        curve = data.sel(model=model)
        depth = study[depth_name].sel(model=model)
        keep = np.isfinite(curve.values) & np.isfinite(depth.values)
        ax.plot(depth.values[keep], curve.values[keep], marker="o", markersize=3, color=color, label=str(model))
        n_layers = float(study["n_layers"].sel(model=model))
        for boundary in boundaries_of(_phase(study, model)):
            ax.axvline(boundary / n_layers, color=color, linestyle="--", linewidth=0.8, alpha=0.7)
    ax.set_xlabel("depth (layer / L)")
    ax.set_ylabel(ylabel)
    ax.set_xlim(0, 1)
    ax.set_title(f"{ylabel}, by model (dashed: phase boundaries)", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return figure


def _phase(study: xr.Dataset, model) -> xr.DataArray:
    """One model's ``phase`` coordinate over the layers it has."""
    return study["phase"].sel(model=model).dropna("layer")
