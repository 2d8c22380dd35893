"""How well a Raptor surrogate reproduces its teacher, layer by layer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import xarray as xr

__all__ = ["plot_r2_per_layer"]

GROUP_STYLES = {"all": "-", "cls": "--", "register": ":", "patch": "-."}


def plot_r2_per_layer(
    reports: xr.Dataset | Mapping[str, xr.Dataset],
    boundaries: Sequence[int] | None = None,
    groups: Sequence[str] = ("all", "cls", "patch"),
    title: str | None = None,
) -> plt.Figure:
    """R² of the surrogate's rollout against the teacher at every layer, per token group.

    Parameters
    ----------
    reports : xarray.Dataset or mapping of str to Dataset
        From `dynamo.raptor.evaluate` (``r2`` (layer, group)); several by name are overlaid, one
        colour each (e.g. one per drop rate, or the fitted partition against baselines).
    boundaries : sequence of int, optional
        Layers after which a new phase begins (drawn dashed).
    groups : sequence of str
        Token groups to draw (line style per group), where present.
    title : str, optional
        Default: the teacher's name and k.
    """
    named = {"": reports} if isinstance(reports, xr.Dataset) else dict(reports)
    figure, ax = plt.subplots(figsize=(6.6, 4.2))
    for index, (name, report) in enumerate(named.items()):
        color = plt.cm.tab10(index % 10)
        for group in groups:
            if group not in report["group"].values:
                continue
            curve = report["r2"].sel(group=group)
            label = f"{name} {group}".strip()
            ax.plot(curve["layer"], curve, GROUP_STYLES.get(group, "-"), marker="o", markersize=3,
                    color=color, label=label)
    for boundary in boundaries or ():
        ax.axvline(boundary + 0.5, color="grey", linestyle="--", linewidth=0.9)
    first = next(iter(named.values()))
    ax.set_xlabel("layer (0 = embedding, l = output of block l)")
    ax.set_ylabel("R² of surrogate vs teacher")
    ax.set_ylim(top=1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, handlelength=3.5)
    ax.set_title(title or f"{first.attrs.get('teacher', '')}: Raptor k = {first.attrs.get('k', '?')}, "
                 f"R² per layer (dashed: phase boundaries)", fontsize=9)
    return figure
