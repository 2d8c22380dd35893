"""Figures of `analyses.concepts`: concepts through depth, their births and deaths, quality, examples."""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np
import xarray as xr
from matplotlib.colors import LogNorm

from figures.style import KIND_COLOURS, axes, mark_phases, title

MIN_FREQUENCY = 1e-3  # floor of the log colour scale of frequencies


def concept_order(result: xr.Dataset) -> np.ndarray:
    """Indices of the living concepts ordered by peak layer, then birth, then death."""
    alive = np.flatnonzero(result["peak"].values >= 0)
    keys = [result[name].values[alive] for name in ("death", "birth", "peak")]  # lexsort: last key first
    return alive[np.lexsort(keys)]


def plot_concept_heatmap(result: xr.Dataset, ax=None) -> plt.Figure:
    """Each living concept's mean activation per layer over its peak's (all tokens), ordered by peak layer."""
    figure, ax = axes(ax, figsize=(6.4, 6.0))
    order = concept_order(result)
    activation = result["mean_activation"].sel(token_kind="all").values[order]
    layers = result["layer"].values
    image = ax.imshow(activation / activation.max(axis=1, keepdims=True), aspect="auto", interpolation="nearest",
                      cmap="magma", extent=(layers[0] - 0.5, layers[-1] + 0.5, len(order) - 0.5, -0.5), vmin=0, vmax=1)
    mark_phases(ax, result, axis="block")
    alive = result.attrs.get("alive_fraction")
    label = "mean activation / the concept's peak" + (f" (alive ≥ {alive:g})" if alive is not None else "")
    figure.colorbar(image, ax=ax, label=label)
    ax.set(xlabel="layer ℓ", ylabel=f"concept ({len(order)} living, ordered by peak layer)", xticks=layers)
    ax.set_title(title(result, f"{result.attrs.get('dictionary_kind', '')} concepts through depth"), fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower left")
    return figure


def plot_token_kind_panels(result: xr.Dataset, fig=None) -> plt.Figure:
    """Frequency of each living concept per layer, one panel per token kind (log scale, same order)."""
    kinds = [str(kind) for kind in result["token_kind"].values if kind != "all"]
    figure = fig or plt.figure(figsize=(3.2 * len(kinds) + 1, 5.6), layout="constrained")
    panels = figure.subplots(1, len(kinds), sharey=True, squeeze=False)[0]
    order = concept_order(result)
    layers = result["layer"].values
    norm = LogNorm(MIN_FREQUENCY, 1)
    for ax, kind in zip(panels, kinds):
        frequency = np.clip(result["frequency"].sel(token_kind=kind).values[order], MIN_FREQUENCY, 1)
        image = ax.imshow(frequency, aspect="auto", interpolation="nearest", cmap="viridis", norm=norm,
                          extent=(layers[0] - 0.5, layers[-1] + 0.5, len(order) - 0.5, -0.5))
        mark_phases(ax, result, axis="block")
        ax.set_xticks(layers[:: max(1, len(layers) // 7)])
        ax.set_xlabel("layer ℓ")
        ax.set_title(kind, color=KIND_COLOURS.get(kind), fontsize=10)
    panels[0].set_ylabel("concept (ordered by peak layer, all tokens)")
    figure.colorbar(image, ax=list(panels), label="share of the kind's tokens on which the concept is active")
    figure.suptitle(title(result, "concept frequency per token kind"), fontsize=11)
    return figure


def plot_concept_events(result: xr.Dataset, ax=None) -> plt.Figure:
    """Births and deaths of concepts between consecutive layers, phase boundaries, and the boundary test."""
    figure, ax = axes(ax, figsize=(6.4, 3.8))
    layers = result["layer"].values
    births, deaths = result["births"].values, result["deaths"].values
    # a birth at layer l happens in the gap (l-1, l), drawn at l - 0.5; a death at l in (l, l+1)
    ax.bar(layers[1:] - 0.5, births[1:], width=0.4, color="tab:green", label="births")
    ax.bar(layers[:-1] + 0.5, -deaths[:-1], width=0.4, color="tab:red", label="deaths")
    ax.axhline(0, color="0.3", linewidth=0.8)
    mark_phases(ax, result, axis="block")
    test = result.sel(event="both")
    fraction, null, p = (float(test[name]) for name in ("boundary_fraction", "boundary_null_fraction", "boundary_p_value"))
    ax.set(xlabel="between layers ℓ and ℓ+1", ylabel="concepts born (up) / dying (down)", xticks=layers)
    ax.set_title(title(result, f"births and deaths: {fraction:.0%} at phase boundaries "
                               f"(random boundaries {null:.0%}, p = {p:.3g})"), fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return figure


def plot_concept_quality(result: xr.Dataset, fig=None) -> plt.Figure:
    """Reconstruction R² and dead-concept fraction per layer (and per-phase dictionaries', seed stability)."""
    panels = 3 if "stability_cosine" in result else 2
    figure = fig or plt.figure(figsize=(4.4 * panels, 3.8), layout="constrained")
    grid = figure.subplots(1, panels)
    r2, dead = grid[0], grid[1]
    layers = result["layer"].values
    for kind in result["token_kind"].values:
        r2.plot(layers, result["r2"].sel(token_kind=kind), marker="o", markersize=3, color=KIND_COLOURS.get(str(kind)),
                label=str(kind))
    dead.plot(layers, result["dead_fraction"], marker="o", markersize=3, color="0.2", label="shared dictionary")
    if "per_phase_r2" in result:
        r2.plot(layers, result["per_phase_r2"].sel(token_kind="all"), linestyle="--", color="0.2",
                label="all, one dictionary per phase")
        dead.plot(layers, result["per_phase_dead_fraction"], linestyle="--", color="0.2", label="one dictionary per phase")
    for ax in (r2, dead):
        mark_phases(ax, result)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    r2.set(xlabel="layer ℓ", ylabel="reconstruction R²")
    r2.set_title(title(result, "reconstruction per layer"), fontsize=9)
    dead.set(xlabel="layer ℓ", ylabel="share of concepts never active", ylim=(0, 1))
    dead.set_title("dead concepts per layer", fontsize=9)
    if panels == 3:
        stability = grid[2]
        for kind in result["dictionary_kind"].values:
            cosine = result["stability_cosine"].sel(dictionary_kind=kind).values
            stability.plot(np.arange(1, len(cosine) + 1) / len(cosine), cosine,
                           label=f"{kind}: mean {cosine.mean():.3f}, R² {float(result['stability_r2'].sel(dictionary_kind=kind)):.3f}")
        stability.set(xlabel="matched atom pairs (fraction, best first)", ylabel="cosine between two seeds' atoms",
                      ylim=(min(0, stability.get_ylim()[0]), 1.02))
        stability.set_title("stability across seeds (Hungarian-matched)", fontsize=9)
        stability.grid(alpha=0.3)
        stability.legend(fontsize=7)
    return figure


def plot_concept_examples(result: xr.Dataset, images: Mapping[str, np.ndarray] | None = None, fig=None) -> plt.Figure:
    """The top images of each example concept, with the concept's activation over the patch grid.

    ``images`` maps ``image_id`` to an (H, W, 3) or (H, W) image in [0, 1] as the model saw it;
    without one the activation map is drawn alone.
    """
    n_examples, n_top = result.sizes["example"], result.sizes["rank"]
    if n_examples == 0:
        raise ValueError("the result has no example concepts (no concept peaks on patch tokens)")
    images = images or {}
    figure = fig or plt.figure(figsize=(1.3 * n_top + 1.4, 1.35 * n_examples + 0.6), layout="constrained")
    grid = figure.subplots(n_examples, n_top, squeeze=False)
    for row in range(n_examples):
        example = result.isel(example=row)
        scale = np.nanmax(example["top_map"].values) or 1.0
        for column in range(n_top):
            ax = grid[row, column]
            ax.set_xticks([])
            ax.set_yticks([])
            cell = example.isel(rank=column)
            picture = images.get(str(cell["top_image_id"].values))
            heat = cell["top_map"].values
            extent = (0, heat.shape[1], heat.shape[0], 0)
            if picture is not None:  # the activation over the image; patches where it is 0 left clear
                ax.imshow(picture, cmap="gray", extent=extent, vmin=0, vmax=1)
                ax.imshow(np.ma.masked_less_equal(np.nan_to_num(heat / scale), 0), cmap="inferno", alpha=0.6,
                          extent=extent, vmin=0, vmax=1, interpolation="nearest")
            else:
                ax.imshow(heat / scale, cmap="inferno", extent=extent, vmin=0, vmax=1, interpolation="nearest")
            label = str(cell["top_label"].values) if "top_label" in cell.coords else ""
            ax.set_title(f"{label + ': ' if label else ''}{float(cell['top_activation']):.2g}", fontsize=7, pad=2)
        grid[row, 0].set_ylabel(f"phase {int(example['example_phase']) + 1}\nconcept {int(example['example_concept'])}\n"
                                f"layer {int(example['example_layer'])}", fontsize=7)
    figure.suptitle(title(result, "top images of each phase's top concepts (activation over patches at the peak layer)"),
                    fontsize=9)
    return figure
