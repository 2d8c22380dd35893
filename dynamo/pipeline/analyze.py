"""``dynamo analyze``: run the registered analyses over a trajectory store and write their results.

`analyze` writes, under ``out``: ``<name>.zarr`` per analysis (an xarray Dataset carrying its
phases as a ``phase`` coordinate: ``xr.open_zarr(path)``), ``<name>_<figure>.png`` per figure,
``summary.json`` (each analysis' headline numbers, the phase boundaries, the paths written), and,
with ``export``, trials x time x features arrays for other dynamics tools (`analyses.export`).
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import xarray as xr

from analyses import export as exporting
from analyses.phases import find_phases
from analyses.streaming import stream
from dynamo.heads import resolve_head, store_labels
from dynamo.layout import REDUCED_VIEWS
from dynamo.models import LoadedModel, ModelLoadError, load_model, load_recorded_model
from dynamo.partition import Partition, assign_phases
from dynamo.pipeline.registry import ANALYSES, options_for, summarize
from dynamo.pipeline.summaries import headline_lines
from dynamo.serialize import jsonable
from dynamo.store import check_output, open_trajectories, save_result
from figures.output import save_figures

__all__ = ["analyze", "store_partition"]


def store_partition(ds: xr.Dataset, boundaries: Sequence[int] | None = None, method: str = "maxcut") -> Partition:
    """The phases drawn on every depth plot: contiguous phases ending at ``boundaries`` if given,
    else `analyses.phases.find_phases` on the store with ``method``."""
    num_blocks = int(ds.attrs.get("num_blocks", ds["layer"].values.max()))
    if boundaries is not None:
        return Partition.from_thresholds(boundaries, num_blocks)
    return Partition(find_phases(ds, method=method))


def analyze(
    store: str | Path,
    out: str | Path,
    *,
    only: Sequence[str] | None = None,
    model: str | LoadedModel | None = None,
    checkpoint: str | Path | None = None,
    img_size: int | tuple[int, int] | None = None,
    head: str | Path | None = None,
    boundaries: Sequence[int] | None = None,
    phase_method: str = "maxcut",
    export: Sequence[str] = (),
    export_components: int | None = None,
    export_sphere: bool = False,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    **options,
) -> dict:
    """Run analyses over a trajectory store and write results, figures and a JSON summary.

    Parameters
    ----------
    store : str or Path
        A trajectory store written by `dynamo.record`.
    out : str or Path
        Output folder (created).
    only : sequence of str, optional
        Names from `dynamo.pipeline.registry.ANALYSES` to run; default all.
    model, checkpoint
        The live model for analyses that need one (a name, as in `dynamo.load_model`, or a
        `LoadedModel`); default the model the store was recorded with (its checkpoint, image
        size and, for random weights, their seed: `dynamo.models.load_recorded_model`).
    img_size : int or (int, int), optional
        Input size to build ``model`` (a name) for; default the store's image size.
    head : str or Path, optional
        A linear head file (`dynamo.heads.LinearHead.load`) the accuracies use; default the
        model's own classifier, or for a model without one a probe fitted on the store's labels
        (`dynamo.heads.resolve_head`; no labels: no accuracy, with a note).
    boundaries : sequence of int, optional
        Blocks after which a new phase begins, drawn on every depth plot; default found by
        `analyses.phases.find_phases` with ``phase_method`` (pass ``[]`` for none).
    export : sequence of str
        Views to export as trials x time x features arrays (see `analyses.export.VIEWS`).
    export_components : int, optional
        Project exported features onto this many principal directions.
    export_sphere : bool
        Export unit-normalised states.
    seed : int
        Seed of every random draw.
    device : str
        Torch device of the live model.
    progress : bool
        Show progress bars.
    **options
        The analyses' own options (`dynamo.pipeline.registry.Option` names); missing ones take
        their defaults.

    Returns
    -------
    dict
        The summary written to ``out/summary.json``, plus ``text`` (a human summary).
    """
    names = list(ANALYSES) if only is None else list(only)
    unknown = [name for name in names if name not in ANALYSES]
    if unknown:
        raise ValueError(f"unknown analyses {unknown}; choose from {', '.join(ANALYSES)}")
    if set(export) - set(exporting.VIEWS):
        raise ValueError(f"unknown export views {sorted(set(export) - set(exporting.VIEWS))}; choose from {', '.join(exporting.VIEWS)}")
    ds = open_trajectories(store)
    if ds.sizes["image"] == 0:
        raise ValueError(f"store {store} has no recorded images; record some with `dynamo record`")
    if "hidden" not in ds:
        raise ValueError(
            f"store {store} holds only reduced views ({', '.join(v for v in REDUCED_VIEWS if v in ds)}; recorded "
            "with --summaries-only); the dynamics analyses follow every token, so record again without "
            "--summaries-only. `dynamo phases` works on this store."
        )
    out = check_output(out, inputs=[store])
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    partition = store_partition(ds, boundaries, phase_method)
    loaded = live_model(ds, model, checkpoint, img_size, device) if any(ANALYSES[name].needs_model for name in names) else None
    linear_head = _accuracy_head(ds, model, checkpoint, img_size, device, loaded, head, seed, progress)
    settings = {**options_for(names, options), "seed": seed, "device": device, "progress": progress, "head": linear_head}
    summary = {
        "store": str(store),
        "model": ds.attrs.get("model"),
        "weights_sha256": ds.attrs.get("weights_sha256"),
        "n_images": int(ds.sizes["image"]),
        "partition": partition,
        "boundaries": partition.boundaries,
        "boundary_source": "given" if boundaries is not None else f"analyses.phases.find_phases(method={phase_method!r})",
        "analyses": {},
    }
    swap_partition = Partition.from_thresholds(partition.boundaries, max(partition.blocks))
    # every analysis (and token-view export) that reads `hidden` shares one pass over it: each chunk is read once
    streamed = {name: ANALYSES[name].accumulate(ds, settings) for name in names if ANALYSES[name].accumulate}
    streamed.update({f"export {view}": exporting.Export(ds, out, view, sphere=export_sphere)
                     for view in export if exporting.in_one_pass(view, export_components)})
    passed = stream(ds, streamed, description=f"one pass: {', '.join(streamed)}", progress=progress) if streamed else {}
    for name in names:
        entry = ANALYSES[name]
        result = passed.pop(name) if name in passed else entry.run(ds, loaded, swap_partition, settings)
        result = assign_phases(result, partition).assign_attrs(
            analysis=name, store=str(store), model=str(ds.attrs.get("model")),
            weights_sha256=str(ds.attrs.get("weights_sha256")),
        )
        path = save_result(result, out / f"{name}.zarr")
        drawn = {key: (figure, spec.caption) for spec in entry.figures for key, figure in spec.draw(result).items()}
        figures = save_figures({key: figure for key, (figure, _) in drawn.items()}, out, prefix=f"{name}_")
        summary["analyses"][name] = {"result": str(path), "figures": [str(p) for p in figures.values()],
                                     "captions": [caption for _, caption in drawn.values()], **summarize(name, result)}
    if export:
        summary["exports"] = [
            str(p) for view in export
            for p in passed.pop(f"export {view}", None) or exporting.export_trajectories(
                ds, out, view=view, sphere=export_sphere, n_components=export_components, progress=progress)
        ]
    summary["seconds"] = round(time.perf_counter() - started, 2)
    summary = jsonable(summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    summary["text"] = _text(summary, out)
    return summary


def _accuracy_head(ds: xr.Dataset, model, checkpoint, img_size, device: str, loaded, head, seed: int, progress: bool):
    """The linear head of the accuracies (`dynamo.heads.resolve_head`), or None for the model's own classifier.

    Only a head file, or a store of a model without a classifier (no ``logits``) that has labels,
    needs one; the live model (for its final norm) is loaded then if it is not already. A probe
    whose model cannot be loaded, or is not the recorded one, is left out with a warning (its
    accuracies then carry the note); a head file then is an error.
    """
    if head is None and ("logits" in ds.data_vars or store_labels(ds) is None):
        return None
    try:
        loaded = loaded or live_model(ds, model, checkpoint, img_size, device)
    except ModelLoadError as error:
        if head is not None:
            raise
        warnings.warn(f"no probe for the accuracies: the model could not be loaded to fit one ({error})", stacklevel=3)
        return None
    if loaded.weights_sha256 != ds.attrs.get("weights_sha256"):
        if head is not None:
            raise ValueError("a head reads the final norm of the model the store was recorded with, and the live model "
                             "has other weights: pass that model (--model, --checkpoint)")
        warnings.warn("no probe for the accuracies: the live model is not the one the store was recorded with", stacklevel=3)
        return None
    return resolve_head(ds, loaded, head, seed=seed, progress=progress)


def live_model(ds: xr.Dataset, model, checkpoint, img_size, device: str) -> LoadedModel:
    """The model a store was recorded with, for the analyses that run it, on ``device``.

    ``model`` (a `LoadedModel`, or a name with ``checkpoint`` and ``img_size``) when given, else
    rebuilt from the store's attributes (`dynamo.models.load_recorded_model`). Warns when its
    weights are not the recorded ones (live and stored trajectories would then differ).
    """
    if isinstance(model, LoadedModel):
        loaded = model
    elif (model or ds.attrs.get("model")) is None:
        raise ValueError("the store does not name its model; pass --model (and --checkpoint)")
    elif model is None and img_size is None and checkpoint is None:
        loaded = load_recorded_model(ds.attrs)
    else:
        checkpoint = checkpoint or (ds.attrs.get("checkpoint") if model is None else None)
        loaded = load_model(model or ds.attrs["model"], checkpoint=checkpoint,
                            img_size=img_size or tuple(ds.attrs.get("image_size") or ()) or None)
    if loaded.weights_sha256 != ds.attrs.get("weights_sha256"):
        warnings.warn(
            f"the live model's weights (sha256 {loaded.weights_sha256[:12]}) differ from the ones the "
            f"store was recorded with ({str(ds.attrs.get('weights_sha256'))[:12]}); live and "
            "stored trajectories will not match",
            stacklevel=3,
        )
    loaded.module.to(device)
    return loaded


def _text(summary: dict, out: Path) -> str:
    lines = [
        f"{summary['model']}: {summary['n_images']} images from {summary['store']}; phase boundaries "
        f"after layers {summary['boundaries'] or 'none'} ({summary['boundary_source']})"
    ]
    for name, entry in summary["analyses"].items():
        lines.append(f"{name}:")
        lines += ["  " + line for line in headline_lines(entry)]
    if summary.get("exports"):
        lines.append("exported: " + ", ".join(summary["exports"]))
    lines.append(f"results (<name>.zarr), figures (.png) and summary.json in {out} ({summary['seconds']} s)")
    return "\n".join(lines)


# --- command line ---------------------------------------------------------------------------
