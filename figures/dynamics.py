"""Figures of the dynamics analyses: one function per figure kind, each drawn from a result Dataset.

Every depth plot takes ``boundaries`` (layers after which a new phase begins, e.g. from
`analyses.phases.boundaries`) and marks them: at layer b on a layer axis, and between blocks b
and b+1 on a block axis (block b maps layer b-1 to layer b). Every figure's title names the
model the result was computed from. The functions return a matplotlib Figure and never run a
model.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import xarray as xr

KIND_COLOURS = {"cls": "tab:red", "dist": "tab:purple", "register": "tab:green", "patch": "tab:blue"}
MEASURE_LABELS = {
    "stable_rank": "stable rank",
    "effective_rank": "effective rank",
    "participation_ratio": "participation ratio",
    "n_directions": "directions for {variance:.0%} variance",
}


def mark_boundaries(ax, boundaries: Sequence[int] | None, axis: str = "layer") -> None:
    """Draw phase boundaries as dotted vertical lines.

    Parameters
    ----------
    ax : matplotlib Axes
    boundaries : layers after which a new phase begins (None or empty: nothing drawn).
    axis : {"layer", "block"}
        What the x axis counts: a boundary after layer b sits at x = b on a layer axis and at
        x = b + 0.5 on a block axis.
    """
    for i, boundary in enumerate(boundaries or []):
        ax.axvline(
            boundary + (0.5 if axis == "block" else 0.0),
            color="0.35",
            linestyle=":",
            linewidth=1.2,
            label="phase boundary" if i == 0 else None,
        )


def _title(result: xr.Dataset, what: str) -> str:
    return f"{result.attrs.get('model', 'unknown model')}: {what}"


def _band(ax, x, samples: xr.DataArray, dim: str, colour, label):
    """Mean line with a 10-90% band of ``samples`` over ``dim``."""
    ax.plot(x, samples.mean(dim).values, color=colour, marker="o", markersize=3, label=label)
    low, high = samples.quantile([0.1, 0.9], dim=dim).values
    ax.fill_between(x, low, high, color=colour, alpha=0.18, linewidth=0)


def plot_convergence(result: xr.Dataset, boundaries: Sequence[int] | None = None) -> plt.Figure:
    """γ_ℓ (cosine to own final direction) against layer, per token kind, with 10-90% bands over images."""
    figure, ax = plt.subplots(figsize=(6.4, 4.2))
    layers = result["layer"].values
    for kind in result["kind"].values:
        _band(ax, layers, result["gamma"].sel(kind=kind), "image", KIND_COLOURS.get(str(kind)), str(kind))
    mark_boundaries(ax, boundaries)
    ax.set(xlabel="layer ℓ", ylabel="γ_ℓ = cos(x̂_ℓ, x̂_L)", ylim=(min(-0.05, ax.get_ylim()[0]), 1.05))
    ax.set_title(_title(result, "directional convergence (mean, 10-90% of images)"), fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return figure


def plot_class_structure(result: xr.Dataset, boundaries: Sequence[int] | None = None) -> plt.Figure:
    """Within- vs between-class angle, and nearest-centroid accuracy, against layer."""
    if "within_class_angle" not in result:
        raise ValueError("the result has no class structure (the store has no labels)")
    figure, (angles, accuracy) = plt.subplots(1, 2, figsize=(11, 4.2))
    layers = result["layer"].values
    styles = {"cls": "-", "patch_mean": "--"}
    for view in result["view"].values:
        style = styles.get(str(view), "-.")
        angles.plot(layers, result["within_class_angle"].sel(view=view), style, color="tab:blue", marker="o",
                    markersize=3, label=f"within class ({view})")
        angles.plot(layers, result["between_class_angle"].sel(view=view), style, color="tab:orange", marker="o",
                    markersize=3, label=f"between classes ({view})")
        accuracy.plot(layers, result["final_centroid_accuracy"].sel(view=view), style, color="tab:red", marker="o",
                      markersize=3, label=f"nearest final-class centroid ({view})")
        accuracy.plot(layers, result["layer_centroid_accuracy"].sel(view=view), style, color="tab:gray", marker="o",
                      markersize=3, label=f"nearest same-layer centroid ({view})")
    n_classes = len(np.unique(result["label"].values))
    accuracy.axhline(1 / n_classes, color="k", linewidth=0.8, alpha=0.5, label="chance")
    if "model_accuracy" in result.attrs:
        accuracy.axhline(result.attrs["model_accuracy"], color="tab:green", linewidth=0.8,
                         label=f"model's own accuracy ({result.attrs['model_accuracy']:.3f})")
    for ax in (angles, accuracy):
        mark_boundaries(ax, boundaries)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    angles.set(xlabel="layer ℓ", ylabel="angle (deg, arccos of mean pair cosine)")
    angles.set_title(_title(result, "angular basins: class angles"), fontsize=10)
    accuracy.set(xlabel="layer ℓ", ylabel="accuracy (leave-one-out)", ylim=(0, 1.02))
    accuracy.set_title(_title(result, "basin accuracy by direction"), fontsize=10)
    figure.tight_layout()
    return figure


def plot_cls_projection(
    result: xr.Dataset, boundaries: Sequence[int] | None = None, per_class: int = 5, seed: int = 0
) -> plt.Figure:
    """cls unit trajectories on their first two principal components, coloured by class.

    Left: each class's mean path through depth (thick; circle: layer 0, large dot: last layer,
    squares: the layers at phase boundaries) over the paths of ``per_class`` of its images
    (thin, drawn with ``seed``). Right: every image's last-layer position, the basins.
    """
    if "projection" not in result:
        raise ValueError("the result has no cls projection (the model has no cls token)")
    figure, (paths, basins) = plt.subplots(1, 2, figsize=(12, 5.4))
    labels = result["label"].values if "label" in result.coords else np.zeros(result.sizes["image"], int)
    names = result["label_name"].values if "label_name" in result.coords else labels.astype(str)
    rng = np.random.default_rng(seed)
    colours = plt.get_cmap("tab10" if len(np.unique(labels)) <= 10 else "tab20")
    layers = [int(layer) for layer in result["layer"].values]
    marked = [layers.index(b) for b in (boundaries or []) if b in layers]
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
    figure.suptitle(_title(result, f"unit cls directions on 2 PCs (fitted on {fitted} layers)"), fontsize=11)
    paths.legend(fontsize=7, ncol=2, title="class", title_fontsize=8)
    basins.legend(fontsize=7, ncol=2, title="class", title_fontsize=8, markerscale=2)
    figure.tight_layout()
    return figure


def plot_angular_speed(result: xr.Dataset, boundaries: Sequence[int] | None = None) -> plt.Figure:
    """Angular speed per token kind against block (10-90% bands over images), and token norms."""
    figure, (speed, norms) = plt.subplots(1, 2, figsize=(11, 4.2))
    blocks, layers = result["block"].values, result["layer"].values
    for kind in result["kind"].values:
        colour = KIND_COLOURS.get(str(kind))
        _band(speed, blocks, result["speed"].sel(kind=kind), "image", colour, str(kind))
        norms.plot(layers, result["norm"].sel(kind=kind).mean("image"), color=colour, marker="o", markersize=3,
                   label=str(kind))
    mark_boundaries(speed, boundaries, axis="block")
    mark_boundaries(norms, boundaries)
    speed.set(xlabel="block (layer b-1 → b)", ylabel="angular speed arccos(x̂_ℓ+1 · x̂_ℓ) (deg)")
    speed.set_title(_title(result, "angular speed per token kind"), fontsize=10)
    norms.set(xlabel="layer ℓ", ylabel="mean token norm ‖x_ℓ‖", yscale="log")
    norms.set_title(_title(result, "norm growth (why angles)"), fontsize=10)
    for ax in (speed, norms):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.tight_layout()
    return figure


def plot_coherence(result: xr.Dataset, boundaries: Sequence[int] | None = None) -> plt.Figure:
    """Patch coherence κ of states (per layer) and of updates (per block)."""
    if "coherence" not in result:
        raise ValueError("the result has no patch coherence (the store has no patch tokens)")
    figure, (states, updates) = plt.subplots(1, 2, figsize=(11, 4.2))
    _band(states, result["layer"].values, result["coherence"], "image", "tab:blue", "patch states")
    _band(updates, result["block"].values, result["update_coherence"], "image", "tab:purple", "patch updates")
    mark_boundaries(states, boundaries)
    mark_boundaries(updates, boundaries, axis="block")
    states.set(xlabel="layer ℓ", ylabel="κ_ℓ = mean_p cos(x_ℓ,p, mean_p x_ℓ,p)")
    states.set_title(_title(result, "patch coherence of states"), fontsize=10)
    updates.set(xlabel="block (layer b-1 → b)", ylabel="κ of updates Δx_p")
    updates.set_title(_title(result, "patch coherence of updates"), fontsize=10)
    for ax in (states, updates):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.tight_layout()
    return figure


def plot_update_rank(result: xr.Dataset, boundaries: Sequence[int] | None = None, level: float = 0.95) -> plt.Figure:
    """Rank measures of the updates per block: one row per space (raw, sphere), one column per measure.

    Error bars are percentile bootstrap intervals over images at ``level``.
    """
    spaces, measures = result["space"].values, result["measure"].values
    figure, axes = plt.subplots(len(spaces), len(measures), figsize=(4 * len(measures), 3.4 * len(spaces)),
                                squeeze=False)
    blocks = result["block"].values
    has_bootstrap = "rank_bootstrap" in result
    if has_bootstrap:
        tail = (1 - level) / 2
        bounds = result["rank_bootstrap"].quantile([tail, 1 - tail], dim="replicate", skipna=True)
    offsets = np.linspace(-0.15, 0.15, result.sizes["kind"])
    for r, space in enumerate(spaces):
        for c, measure in enumerate(measures):
            ax = axes[r, c]
            for kind, offset in zip(result["kind"].values, offsets):
                value = result["rank"].sel(measure=measure, kind=kind, space=space).values
                error = None
                if has_bootstrap:
                    low, high = bounds.sel(measure=measure, kind=kind, space=space).values
                    error = np.clip([value - low, high - value], 0, None)
                ax.errorbar(blocks + offset, value, yerr=error, color=KIND_COLOURS.get(str(kind)), marker="o",
                            markersize=3, capsize=2, linewidth=1, label=str(kind))
            mark_boundaries(ax, boundaries, axis="block")
            label = MEASURE_LABELS.get(str(measure), str(measure)).format(variance=result.attrs.get("variance", 0.9))
            ax.set(xlabel="block (layer b-1 → b)", ylabel=label)
            ax.set_title(f"{space} updates: {label}", fontsize=9)
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    error_note = f", {level:.0%} bootstrap intervals over images" if has_bootstrap else ""
    figure.suptitle(_title(result, f"rank of per-block updates{error_note}"), fontsize=11)
    figure.tight_layout()
    return figure
