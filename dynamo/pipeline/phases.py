"""``dynamo phases`` and the phases stage of ``dynamo profile``: the layer matrix, its phases, the heatmap;
with ``--lens``, the phases under several lenses and their agreement (`lenses`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from analyses import lenses as lensing
from analyses import phases as phasing
from dynamo.partition import Partition, from_result
from dynamo.pipeline.analyze import live_model
from dynamo.pipeline.summaries import format_value
from dynamo.serialize import jsonable
from dynamo.store import check_output, save_result
from figures.lenses import lens_panels
from figures.output import save_figures
from figures.similarity import similarity_heatmap

__all__ = ["lenses", "phases"]


def phases(ds: xr.Dataset, *, out: str | Path | None = None, figure: str | Path | None = None,
           figure_formats: tuple[str, ...] | None = None, progress: bool = True, **settings) -> dict:
    """Layer dissimilarity, partition, scores and bootstrap stability of a store (`analyses.phases`).

    Parameters
    ----------
    ds : xarray.Dataset
        A trajectory dataset.
    out : str or Path, optional
        Write the result Dataset to this ``.zarr``.
    figure : str or Path, optional
        Write the heatmap with the phase boundaries to this file.
    figure_formats : tuple of str, optional
        Formats to write the heatmap in (default the suffix of ``figure``), e.g. ``("png", "svg")``.
    **settings
        `analyses.phases.phase_analysis`'s (``method``, ``eps``, ``k``, ``measure``, ``tokens``,
        ``layers``, ``n_bootstrap``, ``null_permutations``, ``null_bootstrap``, ``seed``), its
        defaults (the paper's, and the gradient null on) where not given.

    Returns
    -------
    dict
        `analyses.phases.summarize` of the result, the matrix as nested lists (``similarity``),
        the paths written, and ``text``.
    """
    _check_outputs(ds, out, figure)
    result = phasing.phase_analysis(ds, progress=progress, **settings).assign_attrs(analysis="phases")
    summary = phasing.summarize(result)
    summary["similarity"] = np.round(result["dissimilarity"].values, 6).tolist()
    summary["layers"] = result["layer"].values.tolist()
    label = f"{summary['method']} phases, " + (f"k={summary['k']}" if summary.get("k") else f"f={summary['eps']}")
    summary = _write(summary, result, out, figure, figure_formats, lambda: similarity_heatmap(result, {label: from_result(result)}))
    summary["text"] = _text(summary, result)
    return summary


def _check_outputs(ds: xr.Dataset, *paths) -> None:
    """Refuse to write into a store (the input's own, or any other)."""
    for path in paths:
        if path is not None:
            check_output(path, inputs=[ds.encoding["source"]] if "source" in ds.encoding else [])


def _write(summary: dict, result: xr.Dataset, out, figure, figure_formats, draw) -> dict:
    """Save ``result`` to ``out`` and ``draw()`` to ``figure`` (in ``figure_formats``, default its suffix); JSON-ready."""
    if out is not None:
        summary["out"] = str(save_result(result, out))
    if figure is not None:
        figure = Path(figure)
        formats = figure_formats or (figure.suffix.lstrip(".") or "png",)
        summary["figures"] = [str(save_figures({figure.stem: draw()}, figure.parent, formats=formats)[figure.stem])]
    return jsonable(summary)


def _text(summary: dict, result: xr.Dataset) -> str:
    partition = from_result(result)
    setting = f"k={summary['k']}" if summary.get("k") else f"f={summary['eps']}"
    lines = [
        f"{summary['model']}: {summary['n_images']} images, {summary['measure']} dissimilarity of {summary['tokens']}",
        f"{summary['method']} ({setting}): {len(partition)} phases {partition}"
        + ("  (heuristic: too many layers for the exact max-cut)" if summary.get("maxcut_exact") is False else ""),
        f"Raptor thresholds: {summary['thresholds']}" if summary["thresholds"] is not None
        else "Raptor thresholds: none (the phases are not contiguous in depth)",
        "scores: " + ", ".join(f"{name} {format_value(summary[name])}" for name in result["score"].values),
    ]
    if "gradient_null_conclusion" in summary:
        lines.append("against a smooth gradient: " + summary["gradient_null_conclusion"]
                     + (f" ({summary['gradient_null_n_permutations']} sign-flip draws over images, "
                        f"{summary['gradient_null_n_bootstrap']} bootstrap resamples)" if "gradient_null_p_value" in summary else ""))
    if "boundary_frequency" in summary:
        lines.append(f"boundary stability over {summary['n_bootstrap']} bootstrap resamples of the images: "
                     + (", ".join(f"after {b}: {format_value(f)}" for b, f in zip(summary["boundaries"], summary["boundary_frequency"]))
                        or "no boundary"))
        lines.append(f"consensus: {Partition(summary['consensus'])} (exactly this partition in "
                     f"{summary['consensus_support']:.0%} of resamples)")
    lines += [f"written: {path}" for path in [summary.get("out"), *summary.get("figures", [])] if path]
    return "\n".join(lines)


def lenses(ds: xr.Dataset, lenses: list[str], *, model=None, checkpoint: str | Path | None = None, device: str = "cpu",
           out: str | Path | None = None, figure: str | Path | None = None, figure_formats: tuple[str, ...] | None = None,
           progress: bool = True, **settings) -> dict:
    """Phases of a store under several lenses and how well they agree (`analyses.lenses`).

    Parameters
    ----------
    lenses : list of str
        Of ``cosine``, ``cka``, ``jacobian``, ``knee``.
    model : str or LoadedModel, optional
        For the jacobian lens: the live model, by default the one the store was recorded with
        (as ``dynamo analyze``), with ``checkpoint`` and on ``device``.
    out, figure, figure_formats, progress
        As `phases`; the figure is `figures.lenses.lens_panels`.
    **settings
        `analyses.lenses.lens_agreement`'s (``k``, ``eps``, ``tokens``, ``layers``, ``rank``,
        ``side``, ``images``, ``tolerance``, ``seed``).

    Returns
    -------
    dict
        `analyses.lenses.summarize` of the result, the paths written, and ``text``.
    """
    _check_outputs(ds, out, figure)
    loaded = live_model(ds, model, checkpoint, None, device) if "jacobian" in lenses else None
    result = lensing.compute(ds, loaded, lenses, progress=progress, **settings)
    summary = _write(lensing.summarize(result), result, out, figure, figure_formats, lambda: lens_panels(result))
    summary["text"] = _lens_text(summary)
    return summary


def _lens_text(summary: dict) -> str:
    names = summary["segmentations"]
    lines = [
        f"{summary['model']}: {summary['n_images']} images; lenses {', '.join(summary['lenses'])}, each segmented "
        f"into k={summary['k']} phases (max-cut and contiguous; knee: corners of the cumulative angle)",
    ]
    if "jacobian_images" in summary:
        lines.append(f"jacobian lens: top-{summary['rank']} singular subspaces of every block Jacobian at "
                     f"{summary['jacobian_images']} images")
    width = max(len(name) for name in names)
    spans = [str(Partition(partition)) for partition in summary["partitions"]]
    span_width = max(len(span) for span in spans)
    lines.append(f"  #  {'segmentation':<{width}}  {'phases':<{span_width}}  boundaries")
    for number, (name, span, bounds) in enumerate(zip(names, spans, summary["boundaries"]), 1):
        lines.append(f"{number:>3}  {name:<{width}}  {span:<{span_width}}  {', '.join(map(str, bounds)) or 'none'}")
    for title, key in ((f"boundary F1 (matched within +-{summary['tolerance']} layer)", "boundary_f1"),
                       ("adjusted Rand index", "adjusted_rand")):
        lines.append(title + ":")
        lines.append("     " + "".join(f"{number:>6}" for number in range(1, len(names) + 1)))
        lines += [f"{i:>3}  " + "".join(f"{_two(value):>6}" for value in row) for i, row in enumerate(summary[key], 1)]
    lines.append(
        f"mean over pairs of different lenses: F1 {_two(summary['mean_f1_between_lenses'])}, "
        f"ARI {_two(summary['mean_ari_between_lenses'])}; max-cut vs contiguous within a lens: "
        f"F1 {_two(summary['mean_f1_between_methods'])}, ARI {_two(summary['mean_ari_between_methods'])}"
    )
    lines += [f"written: {path}" for path in [summary.get("out"), *summary.get("figures", [])] if path]
    return "\n".join(lines)


def _two(value) -> str:
    return "–" if value is None else f"{value:.2f}"
