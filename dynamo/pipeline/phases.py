"""``dynamo phases`` and the phases stage of ``dynamo profile``: the layer matrix, its phases, the heatmap."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from analyses import phases as phasing
from dynamo.partition import Partition, from_result
from dynamo.pipeline.summaries import format_value
from dynamo.store import jsonable, save_result
from figures.output import save_figures
from figures.similarity import similarity_heatmap

__all__ = ["phases"]


def phases(
    ds: xr.Dataset,
    *,
    method: str = "maxcut",
    eps: float = 0.1,
    k: int | None = None,
    measure: str = "cosine",
    tokens: str = "cls+patch_mean",
    layers=None,
    n_bootstrap: int = 200,
    seed: int = 0,
    out: str | Path | None = None,
    figure: str | Path | None = None,
    figure_formats: tuple[str, ...] | None = None,
    progress: bool = True,
) -> dict:
    """Layer dissimilarity, partition, scores and bootstrap stability of a store (`analyses.phases`).

    Parameters
    ----------
    ds : xarray.Dataset
        A trajectory dataset.
    method, eps, k, measure, tokens, layers, n_bootstrap, seed
        As `analyses.phases.phase_analysis`.
    out : str or Path, optional
        Write the result Dataset to this ``.zarr``.
    figure : str or Path, optional
        Write the heatmap with the phase boundaries to this file.
    figure_formats : tuple of str, optional
        Formats to write the heatmap in (default the suffix of ``figure``), e.g. ``("png", "svg")``.
    progress : bool

    Returns
    -------
    dict
        `analyses.phases.summarize` of the result, the matrix as nested lists (``similarity``),
        the paths written, and ``text``.
    """
    result = phasing.phase_analysis(ds, method, eps, k, measure=measure, tokens=tokens, layers=layers,
                                    n_bootstrap=n_bootstrap, seed=seed, progress=progress)
    result = result.assign_attrs(analysis="phases")
    summary = {"method": method, "measure": measure, "tokens": tokens, **phasing.summarize(result)}
    summary["similarity"] = np.round(result["dissimilarity"].values, 6).tolist()
    summary["layers"] = result["layer"].values.tolist()
    if out is not None:
        summary["out"] = str(save_result(result, out))
    if figure is not None:
        label = f"{method} phases, " + (f"k={k}" if k else f"f={eps}")
        heatmap = similarity_heatmap(result["dissimilarity"], {label: from_result(result)})
        figure = Path(figure)
        formats = figure_formats or (figure.suffix.lstrip(".") or "png",)
        summary["figures"] = [str(save_figures({figure.stem: heatmap}, figure.parent, formats=formats)[figure.stem])]
    summary = jsonable(summary)
    summary["text"] = _text(summary, result)
    return summary


def _text(summary: dict, result: xr.Dataset) -> str:
    partition = from_result(result)
    setting = f"k={summary['k']}" if summary.get("k") else f"f={summary['eps']}"
    lines = [
        f"{summary['model']}: {summary['n_images']} images, {summary['measure']} dissimilarity of {summary['tokens']}",
        f"{summary['method']} ({setting}): {len(partition)} phases {partition}",
        f"Raptor thresholds: {summary['thresholds']}" if summary["thresholds"] is not None
        else "Raptor thresholds: none (the phases are not contiguous in depth)",
        "scores: " + ", ".join(f"{name} {format_value(summary[name])}" for name in result["score"].values),
    ]
    if "boundary_frequency" in summary:
        lines.append(f"boundary stability over {summary['n_bootstrap']} bootstrap resamples of the images: "
                     + (", ".join(f"after {b}: {format_value(f)}" for b, f in zip(summary["boundaries"], summary["boundary_frequency"]))
                        or "no boundary"))
        lines.append(f"consensus: {Partition(summary['consensus'])} (exactly this partition in "
                     f"{summary['consensus_support']:.0%} of resamples)")
    lines += [f"written: {path}" for path in [summary.get("out"), *summary.get("figures", [])] if path]
    return "\n".join(lines)
