"""What every figure shares: token-kind colours, titles that name the model, phase boundaries read from the result."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import xarray as xr

from dynamo.partition import boundaries_of

KIND_COLOURS = {"all": "0.2", "cls": "tab:red", "dist": "tab:purple", "register": "tab:green", "patch": "tab:blue"}


def mark_boundaries(ax, boundaries: Sequence[int] | None, axis: str = "layer") -> None:
    """Draw phase boundaries (blocks after which a new phase begins) as dotted vertical lines.

    On a ``"block"`` axis (block b maps layer b-1 to b) a boundary after block b sits at b + 0.5.
    """
    for i, boundary in enumerate(boundaries or []):
        ax.axvline(boundary + (0.5 if axis == "block" else 0.0), color="0.35", linestyle=":", linewidth=1.2,
                   label="phase boundary" if i == 0 else None)


def mark_phases(ax, result: xr.Dataset | xr.DataArray, axis: str = "layer") -> None:
    """`mark_boundaries` with the boundaries the result carries (nothing when it carries none)."""
    mark_boundaries(ax, boundaries_of(result), axis)


def title(result: xr.Dataset | xr.DataArray, what: str) -> str:
    """``"<model>: <what>"``, the model read from the result's attrs."""
    return f"{result.attrs.get('model', 'unknown model')}: {what}"


def axes(ax=None, figsize=(6.4, 4.0)):
    """``(figure, ax)``: the given Axes and its Figure, or a new single-panel Figure."""
    if ax is None:
        figure, ax = plt.subplots(figsize=figsize, constrained_layout=True)
        return figure, ax
    return ax.figure, ax
