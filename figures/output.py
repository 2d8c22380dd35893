"""Writing figures to files."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt

__all__ = ["save_figures"]


def save_figures(figures: Mapping[str, plt.Figure], folder: str | Path, prefix: str = "", formats: Sequence[str] = ("png",),
                 dpi: int = 130) -> dict[str, Path]:
    """Write each figure to ``folder/<prefix><name>.<format>`` (``dpi`` for raster formats) and close it.

    Returns the file of the first format by figure name.
    """
    written = {}
    for name, figure in figures.items():
        paths = [Path(folder) / f"{prefix}{name}.{fmt}" for fmt in formats]  # a dot in the name is not a suffix
        for path in paths:
            figure.savefig(path, dpi=dpi, bbox_inches="tight")
        plt.close(figure)
        written[name] = paths[0]
    return written
