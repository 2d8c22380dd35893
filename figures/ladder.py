"""The ladder of surrogates: how much of the teacher each rung keeps, against k, per layer, and at other loop counts."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import xarray as xr

from figures.style import mark_phases, title

__all__ = ["SURROGATE_STYLES", "plot_ladder", "plot_ladder_layers", "plot_loop_count"]

SURROGATE_STYLES = {
    "identity": {"color": "0.55", "marker": "o"},
    "linear": {"color": "tab:blue", "marker": "s"},
    "dmd": {"color": "tab:cyan", "marker": "D"},
    "teacher-block": {"color": "tab:orange", "marker": "^"},
    "raptor": {"color": "tab:red", "marker": "v"},
    "linear-per-layer": {"color": "tab:blue", "linestyle": "--"},
}


def _style(name: str, ceiling: str | None) -> dict:
    style = {"linewidth": 1.6, "markersize": 5, **SURROGATE_STYLES.get(name, {})}
    if name == ceiling:
        style.update(marker=None, linestyle="--", linewidth=1.2)
    return style


def _label(name: str, ceiling: str | None) -> str:
    return f"{name} (one map per layer)" if name == ceiling else name


def plot_ladder(result: xr.Dataset, fig=None) -> plt.Figure:
    """Final-layer R², accuracy ratio and ε against k, one line per surrogate.

    ``result`` is a `dynamo.pipeline.ladder.ladder` result; its attr ``ceiling`` names the
    k-independent rung, drawn dashed without markers.
    """
    figure = fig or plt.figure(figsize=(12.0, 3.8), constrained_layout=True)
    axes = figure.subplots(1, 3)
    ceiling = result.attrs.get("ceiling")
    ks = result["k"].values
    r2_low = _view(result["r2_final"], lower=-0.25)
    epsilon_high = _view(result["epsilon_max_high"], upper=1.5)
    for name in result["surrogate"].values.tolist():
        row, style = result.sel(surrogate=name), _style(name, ceiling)
        _clipped(axes[0], ks, row["r2_final"].values, style, lower=r2_low, label=_label(name, ceiling))
        axes[1].plot(ks, row["accuracy_ratio"], **style)
        low, high = row["epsilon_max"] - row["epsilon_max_low"], row["epsilon_max_high"] - row["epsilon_max"]
        inside = row["epsilon_max"].values <= epsilon_high
        _clipped(axes[2], ks, row["epsilon_max"].values, style, upper=epsilon_high)
        axes[2].errorbar(ks[inside], row["epsilon_max"].values[inside], yerr=np.stack([low, high])[:, inside],
                         fmt="none", capsize=3, ecolor=style["color"])
        axes[2].plot(ks, np.minimum(row["epsilon_mean"], epsilon_high), color=style["color"], linestyle=":", linewidth=1.0)
    axes[2].plot([], [], color="0.3", linestyle=":", linewidth=1.0, label="mean over layers")
    axes[0].set_ylabel("R² of the last layer (all tokens)")
    axes[1].set_ylabel("accuracy ratio (surrogate / teacher)")
    axes[1].axhline(1.0, color="0.7", linewidth=0.8)
    axes[2].set_ylabel("ε: mean over images of the max over layers\nof ‖X̂ − X‖_F / ‖X‖_F (95% bootstrap)")
    axes[2].legend(fontsize=7, loc="upper right")
    for ax in axes:
        ax.set_xlabel("k (phases = shared maps)")
        ax.set_xticks(ks)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.suptitle(title(result, f"a ladder of surrogates on {result.attrs.get('n_images', '?')} held-out images"),
                    fontsize=10)
    return figure


def _view(values: xr.DataArray, lower: float | None = None, upper: float | None = None) -> float:
    """The axis limit that shows every value but those beyond ``lower``/``upper`` (drawn clipped)."""
    values = values.values[np.isfinite(values.values)]
    if lower is not None:
        return max(float(values.min(initial=lower)), lower)
    return min(float(values.max(initial=upper)), upper)


def _clipped(ax, x, y, style: dict, lower: float | None = None, upper: float | None = None, label=None) -> None:
    """A line with the points beyond ``lower``/``upper`` pinned to the limit as arrows, labelled with their value."""
    limit = lower if lower is not None else upper
    beyond = (y < lower) if lower is not None else (y > upper)
    ax.plot(x, np.where(beyond, limit, y), label=label, **style)
    for xi, yi in zip(x[beyond], y[beyond]):
        ax.plot([xi], [limit], marker="v" if lower is not None else "^", color=style["color"], markersize=9)
        ax.annotate(f"{yi:.3g}", (xi, limit), textcoords="offset points", xytext=(6, -9 if lower is None else 3),
                    fontsize=7, color=style["color"])


def plot_ladder_layers(result: xr.Dataset, fig=None) -> plt.Figure:
    """R² of each surrogate's rollout at every layer (all tokens), one panel per k, phase boundaries marked."""
    ks = result["k"].values
    figure = fig or plt.figure(figsize=(3.4 * len(ks) + 0.6, 3.6), constrained_layout=True)
    axes = np.atleast_1d(figure.subplots(1, len(ks), sharey=True))
    ceiling = result.attrs.get("ceiling")
    for ax, k in zip(axes, ks):
        panel = result.sel(k=k)
        for name in result["surrogate"].values.tolist():
            curve = panel["r2"].sel(surrogate=name, token_kind="all")
            ax.plot(curve["layer"], curve, label=_label(name, ceiling), **{**_style(name, ceiling), "markersize": 3})
        mark_phases(ax, panel["r2"], axis="layer")
        ax.set_title(f"k = {k}: {panel['partition'].item()}", fontsize=8)
        ax.set_xlabel("layer")
        ax.set_ylim(max(min(float(np.nanmin(result["r2"].sel(token_kind="all"))), 0.9), 0.0) - 0.05, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("R² of the rollout (all tokens)")
    axes[-1].legend(fontsize=6)
    figure.suptitle(title(result, "R² per layer of each surrogate"), fontsize=10)
    return figure


def plot_loop_count(result: xr.Dataset, surrogate: str = "raptor", fig=None) -> plt.Figure:
    """Final-layer R² and accuracy ratio of one rung run at other loop counts, one line per k."""
    figure = fig or plt.figure(figsize=(9.0, 3.6), constrained_layout=True)
    axes = figure.subplots(1, 2)
    rung = result.sel(surrogate=surrogate)
    colours = plt.get_cmap("viridis")(np.linspace(0.1, 0.85, rung.sizes["k"]))
    for colour, k in zip(colours, rung["k"].values):
        line = rung.sel(k=k)
        axes[0].plot(line["scale"], line["loop_r2_final"], marker="o", color=colour, label=f"k = {k}")
        axes[1].plot(line["scale"], line["loop_accuracy_ratio"], marker="o", color=colour)
    axes[0].set_ylabel("R² of the final state vs the last layer")
    axes[1].set_ylabel("accuracy ratio (surrogate / teacher)")
    for ax in axes:
        ax.axvline(1.0, color="0.5", linestyle=":", linewidth=1.0)
        ax.set_xlabel("loop scale: each phase's block run scale × n_j times")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.suptitle(title(result, f"{surrogate} at other loop counts"), fontsize=10)
    return figure
