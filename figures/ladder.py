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
    """Final-layer R², accuracy ratio, ε and its skill over the identity against k (top), ε per token kind (bottom).

    ``result`` is a `dynamo.pipeline.ladder.ladder` result; its attr ``ceiling`` names the
    k-independent rung, drawn dashed without markers.
    """
    kinds = [kind for kind in result["token_kind"].values.tolist() if kind != "all"]
    figure = fig or plt.figure(figsize=(15.0, 7.4), constrained_layout=True)
    top, bottom = figure.subfigures(2, 1)
    axes = top.subplots(1, 4)
    kind_axes = np.atleast_1d(bottom.subplots(1, max(len(kinds), 1), sharey=True))
    ceiling = result.attrs.get("ceiling")
    ks = result["k"].values
    r2_low = _view(result["r2_final"], lower=-0.25)
    everything = result.sel(token_kind="all")
    epsilon_high = _view(result["epsilon_high"], upper=1.5)
    skill_low = _view(everything["skill_low"], lower=-1.0)
    for name in result["surrogate"].values.tolist():
        row, style = result.sel(surrogate=name), _style(name, ceiling)
        _clipped(axes[0], ks, row["r2_final"].values, style, lower=r2_low, label=_label(name, ceiling))
        axes[1].plot(ks, row["accuracy_ratio"], **style)
        _with_interval(axes[2], ks, row.sel(token_kind="all"), "epsilon", style, upper=epsilon_high)
        axes[2].plot(ks, np.minimum(row["epsilon_strict"].sel(token_kind="all"), epsilon_high), color=style["color"],
                     linestyle=":", linewidth=1.0)
        _with_interval(axes[3], ks, row.sel(token_kind="all"), "skill", style, lower=skill_low)
        for ax, kind in zip(kind_axes, kinds):
            _with_interval(ax, ks, row.sel(token_kind=kind), "epsilon", style, upper=epsilon_high)
    axes[2].plot([], [], color="0.3", linestyle=":", linewidth=1.0, label="strict: mean over images of the max over layers")
    axes[0].set_ylabel("R² of the last layer (all tokens)")
    axes[1].set_ylabel("accuracy ratio (surrogate / teacher)")
    axes[1].axhline(1.0, color="0.7", linewidth=0.8)
    axes[2].set_ylabel("ε: max over layers of the mean over images\nof ‖X̂ − X‖_F / ‖X‖_F (all tokens)")
    axes[2].legend(fontsize=7, loc="upper right")
    axes[3].set_ylabel("skill over the identity: 1 − ε / ε(x_l = x_0)")
    axes[3].axhline(0.0, color="0.7", linewidth=0.8)
    axes[3].axhline(1.0, color="0.7", linewidth=0.8, linestyle=":")
    for ax, kind in zip(kind_axes, kinds):
        ax.set_title(f"ε of the {kind} tokens' rows alone", fontsize=9)
    kind_axes[0].set_ylabel("ε (95% bootstrap over images)")
    for ax in (*axes, *kind_axes):
        ax.set_xlabel("k (phases = shared maps)")
        ax.set_xticks(ks)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    top.suptitle(title(result, f"a ladder of surrogates on {result.attrs.get('n_images', '?')} held-out images "
                               "(bars: 95% bootstrap over images)"), fontsize=10)
    return figure


def _with_interval(ax, ks, row: xr.Dataset, name: str, style: dict, lower: float | None = None,
                   upper: float | None = None) -> None:
    """``row[name]`` against k with its ``_low``/``_high`` bars, points beyond the view clipped (`_clipped`)."""
    values = row[name].values
    _clipped(ax, ks, values, style, lower=lower, upper=upper)
    inside = np.isfinite(values) & ((values >= lower) if lower is not None else (values <= upper))
    bars = np.stack([values - row[f"{name}_low"].values, row[f"{name}_high"].values - values])
    ax.errorbar(ks[inside], values[inside], yerr=np.where(np.isfinite(bars), bars, 0)[:, inside], fmt="none", capsize=3,
                ecolor=style["color"])


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
    """Final-layer R² and accuracy ratio of one rung run at other loop counts, one colour per k, one line style per depth signal."""
    figure = fig or plt.figure(figsize=(9.0, 3.8), constrained_layout=True)
    axes = figure.subplots(1, 2)
    rung = result.sel(surrogate=surrogate)
    colours = plt.get_cmap("viridis")(np.linspace(0.1, 0.85, rung.sizes["k"]))
    signals = rung["depth_signal"].values.tolist()
    styles = dict(zip(signals, ("-", "--", ":")))
    for colour, k in zip(colours, rung["k"].values):
        for signal in signals:
            line = rung.sel(k=k, depth_signal=signal)
            label = f"k = {k}" if signal == signals[0] else None
            axes[0].plot(line["scale"], line["loop_r2_final"], marker="o", color=colour, linestyle=styles[signal], label=label)
            axes[1].plot(line["scale"], line["loop_accuracy_ratio"], marker="o", color=colour, linestyle=styles[signal])
    for signal in signals:
        axes[1].plot([], [], color="0.3", linestyle=styles[signal], label=f"depth signal: {signal}")
    axes[0].set_ylabel("R² of the final state vs the last layer")
    axes[1].set_ylabel("accuracy ratio (surrogate / teacher)")
    for ax in axes:
        ax.axvline(1.0, color="0.5", linestyle=":", linewidth=1.0)
        ax.set_xlabel("loop scale: each phase's block run scale × n_j times")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    figure.suptitle(title(result, f"{surrogate} at other loop counts (trained: each step takes a layer of its phase; "
                                  "interpolated: signals unseen in training)"), fontsize=9)
    return figure
