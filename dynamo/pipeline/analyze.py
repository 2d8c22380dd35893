"""``dynamo analyze``: run the registered analyses over a trajectory store and write their results.

`analyze` writes, under ``out``: ``<name>.zarr`` per analysis (an xarray Dataset carrying its
phases as a ``phase`` coordinate: ``xr.open_zarr(path)``), ``<name>_<figure>.png`` per figure,
``summary.json`` (each analysis' headline numbers, the phase boundaries, the paths written), and,
with ``export``, trials x time x features arrays for other dynamics tools (`analyses.export`).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import xarray as xr

from analyses import export as exporting
from analyses.phases import find_phases
from dynamo.layout import REDUCED_VIEWS
from dynamo.models import LoadedModel, load_model
from dynamo.partition import Partition, assign_phases
from dynamo.pipeline.registry import ANALYSES, add_arguments, comma_list, int_list, options_for, summarize
from dynamo.pipeline.summaries import headline_lines
from dynamo.store import check_output, jsonable, open_trajectories, save_result
from figures.output import save_figures

__all__ = ["analyze", "configure_parser", "run_from_args", "store_partition"]


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
        `LoadedModel`); default the model and checkpoint the store was recorded with.
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
    loaded = _live_model(ds, model, checkpoint, device) if any(ANALYSES[name].needs_model for name in names) else None
    settings = {**options_for(names, options), "seed": seed, "device": device, "progress": progress}
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
    for name in names:
        entry = ANALYSES[name]
        result = entry.run(ds, loaded, swap_partition, settings)
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
            for p in exporting.export_trajectories(ds, out, view=view, sphere=export_sphere,
                                                   n_components=export_components, progress=progress)
        ]
    summary["seconds"] = round(time.perf_counter() - started, 2)
    summary = jsonable(summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    summary["text"] = _text(summary, out)
    return summary


def _live_model(ds: xr.Dataset, model, checkpoint, device: str) -> LoadedModel:
    if isinstance(model, LoadedModel):
        loaded = model
    else:
        name = model or ds.attrs.get("model")
        if name is None:
            raise ValueError("the store does not name its model; pass --model (and --checkpoint)")
        checkpoint = checkpoint or (ds.attrs.get("checkpoint") if model is None else None)
        loaded = load_model(name, checkpoint=checkpoint)
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


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add ``dynamo analyze``'s arguments, including every registered analysis' own."""
    parser.add_argument("store", help="trajectory store written by `dynamo record`")
    parser.add_argument("--out", required=True, help="output folder for results, figures and summary.json")
    parser.add_argument(
        "--only", type=comma_list,
        help="comma-separated analyses to run (default all): "
        + "; ".join(f"{name}: {entry.description}" for name, entry in ANALYSES.items()).replace("%", "%%"),
    )
    parser.add_argument("--model", help="live model for analyses that need one (default: the store's own model)")
    parser.add_argument("--checkpoint", help="local weights for --model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--boundaries", type=_boundary_list,
        help="comma-separated layers after which a new phase begins (default: found by max-cut; 'none' for none)",
    )
    parser.add_argument("--phase-method", choices=["maxcut", "contiguous"], default="maxcut")
    parser.add_argument(
        "--export", type=comma_list, default=[],
        help="views to export as trials x time x features .npy arrays for other dynamics tools "
        "(cls, patch_mean, register_mean, patch, register, ...)",
    )
    parser.add_argument("--export-components", type=int, help="project exported features on N principal directions")
    parser.add_argument("--export-sphere", action="store_true", help="export unit-normalised states")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_arguments(parser)


def run_from_args(args: argparse.Namespace) -> dict:
    """The ``dynamo analyze`` command: `analyze` with the parsed arguments."""
    options = {option.name: getattr(args, option.name) for entry in ANALYSES.values() for option in entry.options}
    return analyze(
        args.store, args.out, only=args.only, model=args.model, checkpoint=args.checkpoint,
        boundaries=args.boundaries, phase_method=args.phase_method, export=args.export,
        export_components=args.export_components, export_sphere=args.export_sphere, seed=args.seed,
        device=args.device, progress=not args.quiet, **options,
    )


def _boundary_list(text: str) -> list[int]:
    return [] if text.strip().lower() == "none" else int_list(text)
