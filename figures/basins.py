"""Figures of `analyses.basins`: directional convergence, class structure, cls paths in 2-D."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import xarray as xr

from dynamo.partition import boundaries_of
from figures.style import KIND_COLOURS, axes, mark_phases, title


def band(ax, x, samples: xr.DataArray, dim: str, colour, label) -> None:
    """Mean line with a 10-90% band of ``samples`` over ``dim``."""
    ax.plot(x, samples.mean(dim).values, color=colour, marker="o", markersize=3, label=label)
    low, high = samples.quantile([0.1, 0.9], dim=dim).values
    ax.fill_between(x, low, high, color=colour, alpha=0.18, linewidth=0)


def plot_convergence(result: xr.Dataset, ax=None) -> plt.Figure:
    """γ_ℓ (cosine to own final direction) against layer, per token kind, with 10-90% bands over images."""
    figure, ax = axes(ax, figsize=(6.4, 4.2))
    layers = result["layer"].values
    for kind in result["token_kind"].values:
        band(ax, layers, result["gamma"].sel(token_kind=kind), "image", KIND_COLOURS.get(str(kind)), str(kind))
    mark_phases(ax, result)
    ax.set(xlabel="layer ℓ", ylabel="γ_ℓ = cos(x̂_ℓ, x̂_L)", ylim=(min(-0.05, ax.get_ylim()[0]), 1.05))
    ax.set_title(title(result, "directional convergence (mean, 10-90% of images)"), fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return figure


def plot_class_structure(result: xr.Dataset, fig=None) -> plt.Figure:
    """Within- vs between-class angle, and nearest-centroid accuracy, against layer."""
    if "within_class_angle" not in result:
        raise ValueError("the result has no class structure (the store has no labels)")
    figure = fig or plt.figure(figsize=(11, 4.2), layout="constrained")
    angles, accuracy = figure.subplots(1, 2)
    layers = result["layer"].values
    styles = {"cls": "-", "patch_mean": "--"}
    for view in result["view"].values:
        style = styles.get(str(view), "-.")
        for ax, name, colour, label in (
            (angles, "within_class_angle", "tab:blue", "within class"),
            (angles, "between_class_angle", "tab:orange", "between classes"),
            (accuracy, "final_centroid_accuracy", "tab:red", "nearest final-class centroid"),
            (accuracy, "layer_centroid_accuracy", "tab:gray", "nearest same-layer centroid"),
        ):
            ax.plot(layers, result[name].sel(view=view), style, color=colour, marker="o", markersize=3,
                    label=f"{label} ({view})")
    n_classes = len(np.unique(result["label"].values))
    accuracy.axhline(1 / n_classes, color="k", linewidth=0.8, alpha=0.5, label="chance")
    if "model_accuracy" in result.attrs:
        accuracy.axhline(result.attrs["model_accuracy"], color="tab:green", linewidth=0.8,
                         label=f"model accuracy, {result.attrs.get('accuracy_head', 'model')} head ({result.attrs['model_accuracy']:.3f})")
    for ax in (angles, accuracy):
        mark_phases(ax, result)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    angles.set(xlabel="layer ℓ", ylabel="angle (deg, arccos of mean pair cosine)")
    angles.set_title(title(result, "angular basins: class angles"), fontsize=10)
    accuracy.set(xlabel="layer ℓ", ylabel="accuracy (leave-one-out)", ylim=(0, 1.02))
    accuracy.set_title(title(result, "basin accuracy by direction"), fontsize=10)
    return figure


def plot_cls_projection(result: xr.Dataset, fig=None, per_class: int = 5, seed: int = 0) -> plt.Figure:
    """cls unit trajectories on their first two principal components, coloured by class.

    Left: each class's mean path (squares: the layers at phase boundaries) over ``per_class`` of its
    images' paths; right: every image's last-layer position, the basins.
    """
    if "projection" not in result:
        raise ValueError("the result has no cls projection (the model has no cls token)")
    figure = fig or plt.figure(figsize=(12, 5.4), layout="constrained")
    paths, basins = figure.subplots(1, 2)
    labels = result["label"].values if "label" in result.coords else np.zeros(result.sizes["image"], int)
    names = result["label_name"].values if "label_name" in result.coords else labels.astype(str)
    rng = np.random.default_rng(seed)
    colours = plt.get_cmap("tab10" if len(np.unique(labels)) <= 10 else "tab20")
    layers = [int(layer) for layer in result["layer"].values]
    marked = [layers.index(b) for b in boundaries_of(result) if b in layers]
    projection = result["projection"].values  # (image, layer, component)
    for c, label in enumerate(np.unique(labels)):
        members = np.flatnonzero(labels == label)
        colour = colours(c % colours.N)
        for i in rng.choice(members, size=min(per_class, len(members)), replace=False):
            paths.plot(projection[i, :, 0], projection[i, :, 1], color=colour, alpha=0.25, linewidth=0.7)
        mean_path = projection[members].mean(axis=0)
        paths.plot(mean_path[:, 0], mean_path[:, 1], color=colour, linewidth=2.2, label=str(names[members[0]]))
        paths.scatter(*mean_path[-1, :2], color=colour, s=45, zorder=4, edgecolor="k", linewidth=0.5)
        if marked:
            paths.scatter(mean_path[marked, 0], mean_path[marked, 1], color=colour, marker="s", s=22, zorder=3,
                          edgecolor="k", linewidth=0.4)
        basins.scatter(projection[members, -1, 0], projection[members, -1, 1], color=colour, s=10, alpha=0.7,
                       label=str(names[members[0]]))
    start = projection[:, 0].mean(axis=0)
    paths.scatter(*start[:2], facecolor="none", edgecolor="k", s=70, zorder=5, label="layer 0")
    if marked:
        paths.scatter([], [], color="0.5", marker="s", s=22, edgecolor="k", linewidth=0.4,
                      label=f"layers {[layers[m] for m in marked]} (phase boundaries)")
    ratio = result["explained_variance_ratio"].values
    fitted = result["projection"].attrs.get("fit_layers", "all")
    for ax in (paths, basins):
        ax.set(xlabel=f"PC 1 ({ratio[0]:.0%} of variance)", ylabel=f"PC 2 ({ratio[1]:.0%} of variance)")
        ax.grid(alpha=0.3)
    paths.set_title(f"class-mean paths through depth ({per_class} image paths per class, thin)", fontsize=10)
    basins.set_title(f"last layer ({layers[-1]}), every image", fontsize=10)
    figure.suptitle(title(result, f"unit cls directions on 2 PCs (fitted on {fitted} layers)"), fontsize=11)
    paths.legend(fontsize=7, ncol=2, title="class", title_fontsize=8)
    basins.legend(fontsize=7, ncol=2, title="class", title_fontsize=8, markerscale=2)
    return figure
