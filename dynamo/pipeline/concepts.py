"""``dynamo concepts`` and the concepts section of ``dynamo profile``: a dictionary across depth (resumable), its analysis and figures."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import timm
import xarray as xr

from analyses import concepts as concept_analysis
from analyses.phases import find_phases
from dynamo.dictionary import ConceptDictionary, require_hidden
from dynamo.images import image_set
from dynamo.partition import Partition, from_result
from dynamo.pipeline.summaries import format_value
from dynamo.serialize import jsonable
from dynamo.store import check_output, open_trajectories, save_result
from figures import concepts as concept_figures
from figures.output import save_figures

__all__ = ["CAPTIONS", "concepts", "example_images"]

CAPTIONS = {
    "concept_heatmap": "Every living concept's mean activation per layer relative to its peak (births and deaths are where "
                       "it crosses the alive fraction), concepts ordered by peak layer; dotted lines are the phase boundaries.",
    "concept_token_kinds": "Share of each token kind's tokens on which each concept is active (log scale), same order.",
    "concept_events": "Concepts born and dying between consecutive layers, against the phase boundaries, with the "
                      "permutation test of random boundaries.",
    "concept_quality": "Reconstruction R² and dead concepts per layer (dashed: one dictionary per phase); with "
                       "stability, the matched cosine between two seeds' atoms for TopK and RA-SAE.",
    "concept_examples": "The images that activate each phase's top concepts most, the concept's activation over the patch "
                        "grid at its peak layer drawn over the image as the model saw it.",
}


def concepts(
    store: str | Path,
    out: str | Path,
    *,
    kind: str = "topk",
    n_concepts: int | None = None,
    k: int | None = None,
    steps: int | None = None,
    per_phase: bool = False,
    stability: bool = False,
    partition=None,
    boundaries: list[int] | None = None,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """Fit a concept dictionary across depth on a store, analyse it against the phases, draw it.

    ``kind`` ("topk" or "rasae"), ``n_concepts``, ``k``, ``steps`` are `ConceptDictionary` parameters (None: its
    defaults); ``per_phase`` and ``stability`` as `analyses.concepts.compute`. Phases come from ``partition`` (any
    `Partition` form), ``boundaries`` or the store's max-cut. Returns `analyses.concepts.summarize` of the result,
    the paths written, ``seconds``, ``notes`` and ``text``.
    """
    started = time.perf_counter()
    out = check_output(out, inputs=[store])
    ds = open_trajectories(store)
    require_hidden(ds)
    out.mkdir(parents=True, exist_ok=True)
    if boundaries is not None:
        partition = Partition.from_thresholds(boundaries, int(ds.attrs["num_blocks"]))
    partition = Partition(find_phases(ds) if partition is None else partition)
    params = {name: value for name, value in (("concepts", n_concepts), ("k", k), ("steps", steps)) if value is not None}
    small = [f"{name}={value}" for name, value in params.items() if value < 1]
    if small:
        raise ValueError(f"{', '.join(small)}: the number of concepts, active concepts and steps must each be at least 1")
    dictionary = ConceptDictionary(kind=kind, seed=seed, device=device, progress=progress,
                                   checkpoint_dir=out / "dictionary" / "checkpoint", **params)
    result = concept_analysis.compute(ds, dictionary, partition=partition, per_phase=per_phase, stability=stability,
                                      seed=seed, progress=progress)
    dictionary.save(out / "dictionary")
    save_result(result, out / "concepts.zarr", inputs=[store])
    figures = draw(result, example_images(ds, result))
    written = save_figures(figures, out)
    summary = {
        "store": str(store), "out": str(out), "partition": partition, **concept_analysis.summarize(result),
        "notes": list(result.attrs["notes"]), "result": str(out / "concepts.zarr"),
        "figures": [str(path) for path in written.values()], "captions": [CAPTIONS[name] for name in written],
        "seconds": round(time.perf_counter() - started, 2),
    }
    summary = jsonable(summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    summary["text"] = _text(summary, result)
    return summary


def draw(result: xr.Dataset, images: dict | None = None) -> dict:
    """Every figure of a concepts result, by file name (examples only when there are some)."""
    figures = {
        "concept_heatmap": concept_figures.plot_concept_heatmap(result),
        "concept_token_kinds": concept_figures.plot_token_kind_panels(result),
        "concept_events": concept_figures.plot_concept_events(result),
        "concept_quality": concept_figures.plot_concept_quality(result),
    }
    if result.sizes["example"]:
        figures["concept_examples"] = concept_figures.plot_concept_examples(result, images)
    return figures


def example_images(ds: xr.Dataset, result: xr.Dataset) -> dict[str, np.ndarray]:
    """The example images as the model saw them (store's data config, normalisation undone): ``image_id`` -> (H, W, 3) in [0, 1].

    Images that are not files or can no longer be read are left out.
    """
    ids = sorted({str(i) for i in np.asarray(result["top_image_id"].values).ravel() if i and Path(str(i)).is_file()})
    if not ids:
        return {}
    config = {key: tuple(value) if isinstance(value, list) else value for key, value in ds.attrs["preprocessing"].items()}
    transform = timm.data.create_transform(**config)
    pixels, readable = image_set(ids).load_batch(range(len(ids)), transform)
    mean, std = np.asarray(config["mean"])[:, None, None], np.asarray(config["std"])[:, None, None]
    shown = np.clip(pixels.numpy() * std + mean, 0, 1).transpose(0, 2, 3, 1)
    return {image_id: picture for image_id, picture, ok in zip(ids, shown, readable) if ok}


def _text(summary: dict, result: xr.Dataset) -> str:
    lines = [
        f"{result.attrs.get('model')}: {summary['dictionary_kind']} dictionary of {summary['concepts']} concepts "
        f"(k = {summary['k']}) across {result.sizes['layer']} layers, phases {from_result(result)}",
        f"R² per layer: {format_value(summary['r2_per_layer'])}",
        f"dead concepts: {format_value(summary['dead_fraction'])} overall; per layer {format_value(summary['dead_fraction_per_layer'])}",
        f"births per layer {summary['births_per_layer']}, deaths per layer {summary['deaths_per_layer']}",
        f"at phase boundaries: {format_value(summary['boundary_fraction_both'])} of births and deaths "
        f"(random boundaries {format_value(summary['boundary_null_fraction_both'])}, p = {format_value(summary['boundary_p_value_both'])})",
    ]
    if "stability_topk" in summary:
        lines.append(f"stability across seeds (matched cosine): topk {format_value(summary['stability_topk'])}, "
                     f"rasae {format_value(summary['stability_rasae'])}")
    if "per_phase_match" in summary:
        lines.append(f"one dictionary per phase: R² per layer {format_value(summary['per_phase_r2_per_layer'])}; "
                     f"matched cosine to the shared dictionary {format_value(summary['per_phase_match'])}")
    lines += [f"note: {note}" for note in summary["notes"]]
    lines.append(f"written to {summary['out']} in {summary['seconds']} s")
    return "\n".join(lines)
