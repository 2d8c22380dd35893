"""Figures of the stochastic-depth study (``examples/stochastic_depth_study.py``): one per claim of the paper.

Every function takes the study Dataset (dims ``model``, ``k``, ``layer``, ``token_kind``, ``fit``;
per model the coordinates ``role`` ("family", "series", "untrained"), ``drop_rate``, ``seed``,
``epoch``, ``partition_test``; each fit's partition as the coordinate ``phase`` (model, k, fit,
layer); the correlations as the JSON attribute ``correlations``; see the script's ``study_model``
and ``correlations``) and returns a matplotlib Figure; none runs a model or fits anything.
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
    "plot_overtraining",
    "plot_partition_baselines",
    "plot_r2_per_drop_rate",
    "plot_raptor_vs_drop_rate",
    "plot_score_vs_r2",
    "plot_similarity_row",
]

SEED_MARKERS = "os^D"


def model_name(study: xr.Dataset, label) -> str:
    """A panel/legend name: drop rate (and seed when the study has several), epoch for the series, or the label."""
    row = study.sel(model=label)
    role = str(row["role"].values) if "role" in study.coords else "family"
    if role == "untrained" or not np.isfinite(float(row["drop_rate"])):
        return str(label)
    if role == "series":
        return f"epoch {float(row['epoch']):g}"
    seeds = np.unique(study["seed"].values[np.isfinite(study["seed"].values)]) if "seed" in study.coords else []
    seed = f", seed {int(row['seed'])}" if len(seeds) > 1 else ""
    return f"p {float(row['drop_rate']):g}{seed}"


def _family(study: xr.Dataset) -> xr.Dataset:
    """The stochastic-depth models (every model of a study without roles)."""
    return study if "role" not in study.coords else study.sel(model=study["role"].values == "family")


def _untrained(study: xr.Dataset) -> list:
    return [] if "role" not in study.coords else study["model"].values[study["role"].values == "untrained"].tolist()


def _correlation_text(study: xr.Dataset, key: str, which: str = "mean") -> str:
    """ρ, its interval (or "interval undefined"), the permutation p with how it was computed, and n with its unit."""
    entry = json.loads(study.attrs.get("correlations", "{}")).get(key)
    if entry is None:
        return ""
    entry = entry.get(which, entry)
    if entry.get("rho") is None or not np.isfinite(entry["rho"]):
        return f"ρ undefined (n = {entry.get('n', 0)})"
    low, high = entry.get("low"), entry.get("high")
    interval = f"[{low:.2f}, {high:.2f}]" if low is not None and np.isfinite(low) else "(interval undefined)"
    how = "exact" if str(entry.get("p_method", "")).startswith("exact") else "perm."
    unit = entry.get("unit", "models")
    unit = "checkpoints of ONE run" if unit.startswith("checkpoint") else f"{unit}s"
    return f"Spearman ρ = {entry['rho']:.2f} {interval}, {how} p = {entry['p_value']:.2g}, n = {entry['n']} {unit}"


def _colors(study: xr.Dataset) -> dict:
    labels = study["model"].values.tolist()
    return {label: plt.cm.viridis(index / max(1, len(labels) - 1)) for index, label in enumerate(labels)}


def plot_similarity_row(study: xr.Dataset, k: int | None = None) -> plt.Figure:
    """Layer similarity of every model (a new figure, up to 8 panels a row), dashed at the Raptor partition with ``k`` phases (default the first k)."""
    k = int(study["k"].values[0]) if k is None else k
    matrices, partitions = {}, {}
    for label in study["model"].values.tolist():
        name = model_name(study, label)
        matrices[name] = study["similarity"].sel(model=label)
        partitions[name] = from_result(study.sel(model=label, k=k, fit="fitted"))
    attrs = study["similarity"].attrs
    return similarity_grid(matrices, partitions, ncols=min(8, len(matrices)), suptitle=f"Layer similarity per model "
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
    grid[0, 0].legend(fontsize=6, ncol=2)
    figure.suptitle(f"Raptor rollout R² per layer per model (held-out images, n = {int(study['n_heldout'].max())})")
    return figure


def _seed_note(family: xr.Dataset) -> str:
    """How `_per_seed` marks the seeds, for an axis label (nothing with one seed)."""
    return " (filled: seed 0, open: seed 1)" if len(np.unique(family["seed"].values)) > 1 else ""


def _per_seed(ax, family: xr.Dataset, values: xr.DataArray, color, label: str) -> None:
    """Each seed's points against the drop rate, and a line through the mean at each rate."""
    rates, seeds = family["drop_rate"].values, family["seed"].values
    for index, seed in enumerate(np.unique(seeds)):
        mine = seeds == seed
        ax.scatter(rates[mine], values.values[mine], marker=SEED_MARKERS[index % len(SEED_MARKERS)], color=color, s=28,
                   facecolors="none" if index else color)
    grid = np.unique(rates)
    ax.plot(grid, [values.values[rates == rate].mean() for rate in grid], "-", color=color, label=label)


def plot_raptor_vs_drop_rate(study: xr.Dataset) -> plt.Figure:
    """Raptor's final-layer R² and accuracy ratio against the drop rate, per k; seeds as markers, lines through their mean."""
    family = _family(study)
    figure = plt.figure(figsize=(11, 4.2), layout="constrained")
    panels = figure.subplots(1, 2)
    for ax, variable, name, key in ((panels[0], "raptor_r2_final", "Raptor R² at the last layer (all tokens)", "p_vs_r2"),
                                    (panels[1], "raptor_accuracy_ratio", "Raptor accuracy / ViT accuracy", "p_vs_accuracy_ratio")):
        for index, k in enumerate(study["k"].values.tolist()):
            _per_seed(ax, family, family[variable].sel(k=k), plt.cm.tab10(index), f"k = {k}")
        k1 = "raptor_k1_r2_final" if variable == "raptor_r2_final" else "raptor_k1_accuracy_ratio"
        if k1 in family:
            _per_seed(ax, family, family[k1], "0.4", "k = 1")
        for label in _untrained(study):
            ax.axhline(float(study[variable].sel(model=label).mean("k")), color="k", linestyle=":",
                       label=f"{label} (mean over k)")
        ax.set(xlabel=f"stochastic-depth rate p{_seed_note(family)}", ylabel=name)
        ax.set_title(f"{name.split(' (')[0]} vs p (each run's mean over k)\n{_correlation_text(study, key)}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    figure.suptitle(f"Does stochastic depth make the ViT easier to fold into Raptor? ({family.sizes['model']} models, "
                    f"{int(study['n_heldout'].max())} held-out images each)")
    return figure


def plot_accuracy_vs_drop_rate(study: xr.Dataset, ax=None) -> plt.Figure:
    """ViT accuracy and Raptor accuracy (per k) against drop rate; the untrained model as a legend entry."""
    family = _family(study)
    figure, ax = axes(ax, figsize=(6.4, 4.2))
    _per_seed(ax, family, family["vit_accuracy"], "k", f"ViT (all {int(study['n_images'].max())} images)")
    for index, k in enumerate(study["k"].values.tolist()):
        _per_seed(ax, family, family["raptor_accuracy_surrogate"].sel(k=k), plt.cm.tab10(index), f"Raptor k = {k} (held-out)")
    for label in _untrained(study):
        raptor = ", ".join(f"k = {k} {float(study['raptor_accuracy_surrogate'].sel(model=label, k=k)):.2f}"
                           for k in study["k"].values.tolist())
        ax.plot([], [], " ", label=f"{label}: ViT {float(study['vit_accuracy'].sel(model=label)):.2f}, Raptor {raptor}")
    ax.set_xlabel(f"stochastic-depth rate p{_seed_note(family)}")
    ax.set_ylabel("accuracy on the held-out images")
    lowest = min(float(family["raptor_accuracy_surrogate"].min()), float(family["vit_accuracy"].min()))
    ax.set_ylim(max(0.0, lowest - 0.3), 1.01)  # room below the curves for the legend
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    correlation = _correlation_text(study, "p_vs_vit_accuracy")
    ax.set_title("Accuracy vs drop rate: the ViT and its Raptor surrogates" + (f"\nViT accuracy vs p: {correlation}" if correlation else ""),
                 fontsize=9)
    return figure


def plot_score_vs_r2(study: xr.Dataset, score: str = "contrast", ax=None) -> plt.Figure:
    """A phase-structure score of each model's Raptor partition against Raptor's final-layer R², one colour per k, with Spearman ρ per k."""
    figure, ax = axes(ax, figsize=(6.8, 4.8))
    key = f"{score}_vs_r2"
    if score == "relative_contrast" and "partition_relative_contrast" not in study:
        study = study.assign(partition_relative_contrast=study["partition_contrast"] / study["partition_mean_dissimilarity"])
    lines = []
    roles = study["role"].values if "role" in study.coords else np.full(study.sizes["model"], "family")
    for index, k in enumerate(study["k"].values.tolist()):
        for role, marker in (("family", "o"), ("series", "^"), ("untrained", "x")):  # the correlation uses the family runs only
            mine = roles == role
            if mine.any():
                ax.scatter(study[f"partition_{score}"].sel(k=k)[mine], study["raptor_r2_final"].sel(k=k)[mine], color=plt.cm.tab10(index),
                           marker=marker, s=30, label=f"k = {k}" + ("" if role == "family" else f" ({role})"))
    lines.append(f"family runs, each model's mean over k: {_correlation_text(study, key)}")
    if f"{key}_given_accuracy" in json.loads(study.attrs.get("correlations", "{}")):
        lines.append(f"ViT accuracy partialled out: {_correlation_text(study, key + '_given_accuracy')}")
    ax.set_xlabel(f"phase-structure score: {score.replace('_', ' ')} of the Raptor partition")
    ax.set_ylabel("Raptor R² at the last layer (all tokens)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Does block structure predict Raptor's fit? (one point per model and k)\n" + "\n".join(lines), fontsize=7)
    return figure


def plot_partition_baselines(study: xr.Dataset, fig: plt.Figure | None = None) -> plt.Figure:
    """Raptor on the max-cut partition against uniform, random contiguous, random shuffled and k = 1 (the paper's Fig. 3).

    One column per k, rows: accuracy ratio and final-layer R² (held-out images); one group of
    points per model of the partition test (every model when none was marked).
    """
    tested = study.sel(model=study["partition_test"].values.astype(bool)) if "partition_test" in study.coords else study
    ks = study["k"].values.tolist()
    labels = tested["model"].values.tolist()
    rows = [(variable, ylabel) for variable, ylabel in (("baseline_accuracy_ratio", "Raptor accuracy / ViT accuracy"),
                                                       ("baseline_r2_final", "R² at the last layer (all tokens)")) if variable in study]
    figure = fig or plt.figure(figsize=(max(5.6, 1.2 * len(labels) + 2.5) * len(ks), 3.8 * len(rows) + 0.4), layout="constrained")
    panels = figure.subplots(len(rows), len(ks), squeeze=False, sharey="row")
    styles = {"fitted": ("*", "crimson", 160, 0.0), "uniform": ("s", "tab:blue", 70, 0.0), "k=1": ("x", "black", 50, 0.0),
              "random": ("o", "tab:grey", 22, -0.18), "shuffled": ("^", "tab:orange", 22, 0.18)}
    names = {"fitted": "max-cut phases", "random": "random contiguous", "shuffled": "random shuffled"}
    for row, (variable, ylabel) in enumerate(rows):
        for ax, k in zip(panels[row], ks):
            shown = set()
            for position, label in enumerate(labels):
                for fit in study["fit"].values.tolist():
                    value = float(tested[variable].sel(model=label, k=k, fit=fit))
                    if not np.isfinite(value):
                        continue
                    kind = fit.split(" ")[0] if fit.split(" ")[0] in styles else fit
                    marker, color, size, offset = styles[kind]
                    ax.scatter(position + offset, value, marker=marker, s=size, color=color, alpha=0.8 if size < 30 else 1,
                               label=None if kind in shown else names.get(kind, kind), zorder=3 if kind == "fitted" else 2)
                    shown.add(kind)
            ax.set_xticks(range(len(labels)), [model_name(study, label) for label in labels], rotation=30, ha="right", fontsize=8)
            ax.set_title(f"k = {k}: {ylabel.split(' (')[0]}", fontsize=9)
            ax.grid(alpha=0.3)
        panels[row, 0].set_ylabel(f"{ylabel}, held-out")
    panels[0, 0].legend(fontsize=7)
    figure.suptitle("Raptor on max-cut phases vs random partitions with the same recipe (the paper's Fig. 3 protocol; "
                    "a baseline equal to the max-cut partition sits on its star)", fontsize=10)
    return figure


def plot_overtraining(study: xr.Dataset) -> plt.Figure:
    """The over-training series: phase contrast, accuracies and Raptor's R² against the training epoch; the untrained model for reference."""
    series = study.sel(model=study["role"].values == "series").sortby("epoch")
    epochs = series["epoch"].values
    figure = plt.figure(figsize=(11, 4.2), layout="constrained")
    left, right = figure.subplots(1, 2)
    left.plot(epochs, series["phase_contrast"], "o-", color="tab:purple", label="max-cut contrast (f = 0.1)")
    if "phase_relative_contrast" in series:
        left.plot(epochs, series["phase_relative_contrast"], "D-", color="tab:red", label="relative contrast (contrast / mean dissimilarity)")
    left.set(xlabel="training epoch (log)", ylabel="phase score", xscale="log")
    twin = left.twinx()
    twin.plot(epochs, series["vit_accuracy"], "s--", color="tab:blue", label="ViT accuracy, held-out test images")
    if "train_accuracy" in series:
        twin.plot(epochs, series["train_accuracy"] / 100, "^:", color="tab:green", label="ViT accuracy, its training images")
    twin.set(ylabel="accuracy", ylim=(0, 1.02))
    handles = [*left.get_legend_handles_labels()[0], *twin.get_legend_handles_labels()[0]]
    left.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="lower right")
    score = "phase_relative_contrast" if "phase_relative_contrast" in series else "phase_contrast"
    left.set_title(f"Block structure over training\n{score.removeprefix('phase_').replace('_', ' ')} vs epoch: "
                   f"{_correlation_text(study, 'epoch_vs_' + score)}", fontsize=8)
    for index, k in enumerate(study["k"].values.tolist()):
        right.plot(epochs, series["raptor_r2_final"].sel(k=k), "o-", color=plt.cm.tab10(index), label=f"Raptor k = {k}")
    right.plot(epochs, series["raptor_k1_r2_final"], "x-", color="0.4", label="Raptor k = 1")
    for label in _untrained(study):
        right.axhline(float(study["raptor_r2_final"].sel(model=label).mean("k")), color="k", linestyle=":",
                      label=f"{label} (mean over k)")
    right.set(xlabel="training epoch (log)", ylabel="Raptor R² at the last layer (all tokens)", xscale="log")
    for ax in (left, right):
        ax.set_xticks(epochs, [f"{epoch:g}" for epoch in epochs])
        ax.minorticks_off()
    right.set_title(f"Raptor's fit over training (mean over k)\nR² vs epoch: {_correlation_text(study, 'epoch_vs_r2')}", fontsize=8)
    right.grid(alpha=0.3)
    right.legend(fontsize=7)
    figure.suptitle(f"Over-training series: {series.sizes['model']} checkpoints of ONE training run ({series['model'].values[0]} ... "
                    f"{series['model'].values[-1]}; {int(study['n_heldout'].max())} held-out images)", fontsize=10)
    return figure
