"""Figures of the stochastic-depth study (``examples/stochastic_depth_study.py``), the paper's kinds.

Every function takes the study Dataset (dims ``model``, ``k``, ``layer``, ``token_kind``, ``fit``;
each fit's partition as the coordinate ``phase`` (model, k, fit, layer); see the script's
``study_model``) and returns a matplotlib Figure; none runs a model or fits anything.
"""

from __future__ import annotations

import json

import matplotlib.pyplot as plt
import numpy as np
import xarray as xr

from dynamo.partition import from_result
from figures.similarity import similarity_grid
from figures.style import axes

__all__ = [
    "plot_accuracy_vs_drop_rate",
    "plot_partition_baselines",
    "plot_r2_per_drop_rate",
    "plot_score_vs_r2",
    "plot_similarity_row",
]


def model_name(study: xr.Dataset, label) -> str:
    """A panel/legend name: the drop rate, or the label for the untrained model."""
    rate = float(study["drop_rate"].sel(model=label))
    return str(label) if np.isnan(rate) else f"drop rate {rate:g}"


def _colors(study: xr.Dataset) -> dict:
    labels = study["model"].values.tolist()
    return {label: plt.cm.viridis(index / max(1, len(labels) - 1)) for index, label in enumerate(labels)}


def plot_similarity_row(study: xr.Dataset, k: int | None = None) -> plt.Figure:
    """Layer similarity of every model in one row (a new figure), dashed at the Raptor partition with ``k`` phases (default the first k)."""
    k = int(study["k"].values[0]) if k is None else k
    matrices, partitions = {}, {}
    for label in study["model"].values.tolist():
        name = model_name(study, label)
        matrices[name] = study["similarity"].sel(model=label)
        partitions[name] = from_result(study.sel(model=label, k=k, fit="fitted"))
    attrs = study["similarity"].attrs
    return similarity_grid(matrices, partitions, ncols=len(matrices), suptitle=f"Layer similarity per drop rate "
                           f"({attrs['measure']}, tokens {attrs['tokens']}); dashed: k = {k} Raptor phases")


def plot_r2_per_drop_rate(study: xr.Dataset, fig: plt.Figure | None = None) -> plt.Figure:
    """Raptor R² per layer, cls and patch tokens (columns), one row per k, one line per model."""
    ks = study["k"].values.tolist()
    colors = _colors(study)
    figure = fig or plt.figure(figsize=(11, 3.6 * len(ks)), layout="constrained")
    grid = figure.subplots(len(ks), 2, squeeze=False, sharex=True)
    for row, k in enumerate(ks):
        for column, kind in enumerate(("cls", "patch")):
            ax = grid[row, column]
            for label in study["model"].values.tolist():
                curve = study["raptor_r2"].sel(model=label, k=k, token_kind=kind)
                ax.plot(curve["layer"], curve, marker="o", markersize=3, color=colors[label], label=model_name(study, label))
            ax.set_title(f"Raptor k = {k}: R², {kind} tokens", fontsize=10)
            ax.set_ylabel("R² of rollout vs ViT")
            ax.set_ylim(max(-1.0, float(study["raptor_r2"].sel(k=k, token_kind=kind).min()) - 0.05), 1.02)
            ax.grid(alpha=0.3)
    for ax in grid[-1]:
        ax.set_xlabel("layer (0 = embedding, l = output of block l)")
    grid[0, 0].legend(fontsize=7)
    figure.suptitle(f"Raptor rollout R² per layer per drop rate (held-out images, n = {int(study['n_heldout'].max())})")
    return figure


def plot_accuracy_vs_drop_rate(study: xr.Dataset, ax=None) -> plt.Figure:
    """ViT accuracy and Raptor accuracy (per k) against drop rate; the untrained model as a separate marker."""
    rates = study["drop_rate"].values
    trained = np.isfinite(rates)
    order = np.argsort(rates[trained])
    figure, ax = axes(ax, figsize=(6.4, 4.2))
    x = rates[trained][order]
    ax.plot(x, study["vit_accuracy"].values[trained][order], "k-o", label=f"ViT (all {int(study['n_images'].max())} images)")
    for index, k in enumerate(study["k"].values.tolist()):
        raptor = study["raptor_accuracy_surrogate"].sel(k=k).values[trained][order]
        ax.plot(x, raptor, "-s", color=plt.cm.tab10(index), label=f"Raptor k = {k} (held-out)")
    for label in study["model"].values[~trained]:
        raptor = ", ".join(f"Raptor k = {k} {float(study['raptor_accuracy_surrogate'].sel(model=label, k=k)):.2f}"
                           for k in study["k"].values.tolist())
        ax.plot([], [], " ", label=f"{label} (no drop rate): ViT {float(study['vit_accuracy'].sel(model=label)):.2f}, {raptor}")
    ax.set_xlabel("stochastic-depth drop rate")
    ax.set_ylabel("accuracy on held-out digits")
    lowest = min(float(study["raptor_accuracy_surrogate"].values[trained].min()), float(study["vit_accuracy"].values[trained].min()))
    ax.set_ylim(max(0.0, lowest - 0.3), 1.01)  # room below the curves for the legend
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower center")
    ax.set_title("Accuracy vs drop rate: the ViT and its Raptor surrogates", fontsize=10)
    return figure


def plot_score_vs_r2(study: xr.Dataset, score: str = "contrast", ax=None) -> plt.Figure:
    """A phase-structure score of each Raptor partition against Raptor's final-layer R², with Spearman rho."""
    correlations = json.loads(study.attrs["correlations"])[score]
    colors = _colors(study)
    markers = "os^Dv"
    figure, ax = axes(ax, figsize=(6.4, 4.4))
    for index, k in enumerate(study["k"].values.tolist()):
        for label in study["model"].values.tolist():
            ax.scatter(float(study[f"partition_{score}"].sel(model=label, k=k)), float(study["raptor_r2_final"].sel(model=label, k=k)),
                       color=colors[label], marker=markers[index % len(markers)], s=45,
                       label=f"{model_name(study, label)}, k = {k}")
    lines = []
    for subset, entry in correlations.items():
        per_k = ", ".join(f"k = {k}: ρ = {v['rho']:.2f} (n = {v['n']})" for k, v in entry.items() if k != "pooled")
        pooled = entry["pooled"]
        lines.append(f"{subset} models, pooled over k: Spearman ρ = {pooled['rho']:.2f}, p = {pooled['p']:.3g}, n = {pooled['n']}; {per_k}")
    ax.set_xlabel(f"phase-structure score: {score.replace('_', ' ')} of the Raptor partition")
    ax.set_ylabel("Raptor R² at the last layer (all tokens)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    ax.set_title("\n".join(lines), fontsize=7)
    return figure


def plot_partition_baselines(study: xr.Dataset, fig: plt.Figure | None = None) -> plt.Figure:
    """Final R² of Raptor on the max-cut (fitted) partition against uniform, random and k = 1, per model, one panel per k."""
    ks = study["k"].values.tolist()
    labels = study["model"].values.tolist()
    figure = fig or plt.figure(figsize=(5.6 * len(ks), 4.2), layout="constrained")
    panels = figure.subplots(1, len(ks), squeeze=False, sharey=True)
    styles = {"fitted": ("*", "crimson", 140), "uniform": ("s", "tab:blue", 90), "k=1": ("x", "black", 40)}
    for ax, k in zip(panels[0], ks):
        shown = set()
        for position, label in enumerate(labels):
            for fit in study["fit"].values.tolist():
                value = float(study["baseline_r2_final"].sel(model=label, k=k, fit=fit))
                kind = fit if fit in styles else "random"
                marker, color, size = styles.get(kind, ("o", "tab:grey", 30))
                ax.scatter(position + (0.12 if kind == "random" else 0), value, marker=marker, s=size,
                           facecolors="none" if kind == "uniform" else color, edgecolors=None if marker == "x" else color,
                           label=None if kind in shown else {"fitted": "max-cut phases"}.get(kind, kind), zorder=3 if kind == "fitted" else 2)
                shown.add(kind)
        ax.set_xticks(range(len(labels)), [model_name(study, label) for label in labels], rotation=30, ha="right", fontsize=8)
        ax.set_title(f"k = {k}: Raptor final R², max-cut vs baseline partitions\n(a baseline equal to the max-cut partition sits on its star)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    panels[0, 0].set_ylabel("R² at the last layer (all tokens, held-out)")
    return figure
