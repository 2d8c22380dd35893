"""``dynamo analyze``: run the dynamics analyses over a trajectory store and write their results.

Each analysis is one entry of `ANALYSES`, a name mapped to an `Analysis`: a function that takes
the opened trajectory Dataset, a live model (only for entries that need one) and the options,
and returns an `AnalysisResult` (an ``xarray.Dataset`` with coords and attrs, plus a few
headline numbers for the JSON summary); and a function that draws its figures from that
Dataset. Adding an analysis is one more entry in the dict::

    ANALYSES["jacobian"] = Analysis(run=_run_jacobian, figures=_jacobian_figures,
                                    needs_model=True, help="...", add_arguments=_jacobian_args)

`analyze` writes, under ``out``: ``<name>.zarr`` per analysis (an xarray Dataset: ``xr.open_zarr(path)``),
``<name>_<figure>.png`` per figure, ``summary.json`` (the headline numbers, the phase
boundaries drawn on every depth plot, and the paths written), and, with ``export``,
trials x time x features arrays for other dynamics tools (`analyses.export`).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import xarray as xr

from dynamo.models import LoadedModel
from dynamo.store import open_trajectories, save_result


@dataclass
class AnalysisResult:
    """What one analysis returns.

    Attributes
    ----------
    data : xarray.Dataset
        The result, with named dims, coords and attrs saying what was computed.
    headline : dict
        A few JSON-serialisable numbers for the summary (and the issue's closing notes).
    """

    data: xr.Dataset
    headline: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Analysis:
    """One entry of `dynamo analyze`.

    Attributes
    ----------
    run : callable
        ``run(dataset, model, options) -> AnalysisResult``. ``dataset`` is the lazily opened
        trajectory store; ``model`` is a `LoadedModel` when ``needs_model`` (else None);
        ``options`` is a dict of the command's options (``seed``, ``bootstrap``, ``device``,
        ``progress``, ``boundaries`` and whatever ``add_arguments`` declared).
    figures : callable
        ``figures(result_data, boundaries) -> {figure_name: matplotlib Figure}``; ``boundaries``
        are the layers after which a new phase begins (None: unknown).
    needs_model : bool
        The analysis runs the model (perturbations, Jacobians, layer swaps).
    help : str
        One line for ``dynamo analyze --help``.
    add_arguments : callable, optional
        ``add_arguments(parser)`` adds the analysis' own options to the command line; their
        values arrive in ``options`` under argparse's ``dest`` names.
    """

    run: Callable[[xr.Dataset, LoadedModel | None, dict], AnalysisResult]
    figures: Callable[[xr.Dataset, Sequence[int] | None], dict]
    needs_model: bool = False
    help: str = ""
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None


# --- store-only entries ---------------------------------------------------------------------


def _run_basins(dataset, model, options) -> AnalysisResult:
    from analyses import convergence

    result = convergence.basins(dataset, progress=options.get("progress", True))
    return AnalysisResult(result, convergence.headline(result))


def _basins_figures(result, boundaries):
    from figures import dynamics

    figures = {"convergence": dynamics.plot_convergence(result, boundaries)}
    if "within_class_angle" in result:  # the store has labels
        figures["class_structure"] = dynamics.plot_class_structure(result, boundaries)
    if "projection" in result:  # the model has a cls token
        figures["cls_projection"] = dynamics.plot_cls_projection(result, boundaries)
    return figures


def _run_tokens(dataset, model, options) -> AnalysisResult:
    from analyses import tokens

    result = tokens.token_dynamics(dataset, progress=options.get("progress", True))
    return AnalysisResult(result, tokens.headline(result, options.get("boundaries")))


def _tokens_figures(result, boundaries):
    from figures import dynamics

    figures = {"angular_speed": dynamics.plot_angular_speed(result, boundaries)}
    if "coherence" in result:  # the store has patch tokens
        figures["coherence"] = dynamics.plot_coherence(result, boundaries)
    return figures


def _run_rank(dataset, model, options) -> AnalysisResult:
    from analyses import rank

    result = rank.update_rank(
        dataset,
        n_bootstrap=options.get("bootstrap", 100),
        seed=options.get("seed", 0),
        progress=options.get("progress", True),
    )
    return AnalysisResult(result, rank.headline(result))


def _rank_figures(result, boundaries):
    from figures import dynamics

    return {"update_rank": dynamics.plot_update_rank(result, boundaries)}


def _rank_arguments(parser) -> None:
    parser.add_argument(
        "--bootstrap", type=int, default=100, help="bootstrap replicates over images for rank error bars (default 100)"
    )


ANALYSES: dict[str, Analysis] = {
    "basins": Analysis(
        run=_run_basins,
        figures=_basins_figures,
        help="directional convergence (gamma) per token kind, class angles, nearest-final-centroid accuracy, cls paths",
    ),
    "tokens": Analysis(
        run=_run_tokens,
        figures=_tokens_figures,
        help="angular speed per token kind, cls reorientation, patch coherence of states and updates",
    ),
    "rank": Analysis(
        run=_run_rank,
        figures=_rank_figures,
        help="update-rank collapse: stable/effective rank, participation ratio, n for 90%% variance",
        add_arguments=_rank_arguments,
    ),
}


# --- live-model entries (analyses.perturbation, analyses.jacobian, analyses.swap) -------------


def _run_perturbation(dataset, model, options) -> AnalysisResult:
    from analyses.perturbation import perturbation_recovery, recovery_summary

    settings = dict(
        starts=options.get("starts"), alphas=options.get("alphas") or (0.01, 0.05, 0.1, 0.2),
        n_directions=options.get("directions", 2), images=options.get("perturbation_images"),
        seed=options.get("seed", 0), progress=options.get("progress", True),
    )
    propagators = {"ViT": model}
    if options.get("surrogate"):
        from dynamo.raptor import RaptorFitter

        propagators["Raptor"] = RaptorFitter.load(options["surrogate"], teacher=model).model_
    results = {name: perturbation_recovery(dataset, propagator, **settings) for name, propagator in propagators.items()}
    data = xr.concat(list(results.values()), dim="propagator", combine_attrs="override").assign_coords(
        propagator=list(results)
    )
    headline = {name: recovery_summary(result)["recovery"] for name, result in results.items()}
    return AnalysisResult(data, {"median_recovery": headline})


def _perturbation_figures(result, boundaries):
    from figures import perturbation as figs

    figures = {f"recovery_{name}": figs.plot_perturbation_recovery(result.sel(propagator=name), boundaries)
               for name in result["propagator"].values}
    if result.sizes["propagator"] > 1:
        for basis in result["basis"].values:
            figures[f"comparison_{basis}"] = figs.plot_recovery_comparison(
                {str(name): result.sel(propagator=name) for name in result["propagator"].values}, boundaries,
                basis=str(basis),
            )
    return figures


def _perturbation_arguments(parser) -> None:
    parser.add_argument("--alphas", type=lambda text: [float(v) for v in text.split(",")],
                        help="perturbation: relative sizes (default 0.01,0.05,0.1,0.2)")
    parser.add_argument("--starts", type=lambda text: [int(v) for v in text.split(",")],
                        help="perturbation: injection layers (default all but the last)")
    parser.add_argument("--directions", type=int, default=2,
                        help="perturbation: random draws and principal directions each (default 2)")
    parser.add_argument("--perturbation-images", type=int, help="perturbation: N images evenly spaced through the store (default all)")
    parser.add_argument("--surrogate", help="perturbation: also run through a saved Raptor fit (folder of `dynamo fit`)")


def _run_jacobian(dataset, model, options) -> AnalysisResult:
    from analyses.jacobian import jacobian_spectrum, jacobian_summary

    result = jacobian_spectrum(
        dataset, model, n_singular=options.get("singular_values", 4), composed=options.get("composed", False),
        images=options.get("jacobian_images", 32), seed=options.get("seed", 0), progress=options.get("progress", True),
    )
    summary = jacobian_summary(result)
    return AnalysisResult(result, {k: v for k, v in summary.items() if k != "text"})


def _jacobian_figures(result, boundaries):
    from figures.perturbation import plot_jacobian_spectrum

    return {"spectrum": plot_jacobian_spectrum(result, boundaries)}


def _jacobian_arguments(parser) -> None:
    parser.add_argument("--singular-values", type=int, default=4, help="jacobian: singular values per block (default 4)")
    parser.add_argument("--composed", action="store_true", help="jacobian: also the map from every layer to the last")
    parser.add_argument("--jacobian-images", type=int, default=32, help="jacobian: N images evenly spaced through the store (default 32)")


def _run_swap(dataset, model, options) -> AnalysisResult:
    import numpy as np

    from analyses.swap import layer_swap, swap_summary

    num_blocks = int(dataset.attrs.get("num_blocks", dataset["layer"].values.max()))
    partition = [phase.tolist() for phase in np.split(np.arange(1, num_blocks + 1), options.get("boundaries") or [])]
    result = layer_swap(
        dataset, model, width=options.get("swap_width", 1), partition=partition, images=options.get("swap_images"),
        progress=options.get("progress", True),
    )
    summary = swap_summary(result)
    return AnalysisResult(result, {k: v for k, v in summary.items() if k != "text"})


def _swap_figures(result, boundaries):
    from figures.perturbation import plot_layer_swap

    return {"accuracy": plot_layer_swap(result, boundaries)}


def _swap_arguments(parser) -> None:
    parser.add_argument("--swap-width", type=int, default=1, help="swap: consecutive layers replaced (default 1)")
    parser.add_argument("--swap-images", type=int, help="swap: N images evenly spaced through the store (default all)")


ANALYSES.update(
    perturbation=Analysis(
        run=_run_perturbation, figures=_perturbation_figures, needs_model=True, add_arguments=_perturbation_arguments,
        help="perturbation recovery: gap and angle to the clean run after a relative nudge at each layer (live model)",
    ),
    jacobian=Analysis(
        run=_run_jacobian, figures=_jacobian_figures, needs_model=True, add_arguments=_jacobian_arguments,
        help="top singular values of each block's Jacobian along real trajectories, by JVP/VJP (live model)",
    ),
    swap=Analysis(
        run=_run_swap, figures=_swap_figures, needs_model=True, add_arguments=_swap_arguments,
        help="causal layer swap: accuracy and last-layer R² when block j runs in layer i's place (live model)",
    ),
)


# --- running --------------------------------------------------------------------------------


def phase_boundaries(dataset: xr.Dataset, method: str = "maxcut") -> list[int]:
    """Layers after which a new phase begins, from `analyses.phases` on the store."""
    from analyses import phases

    return [int(b) for b in phases.boundaries(phases.find_phases(dataset, method=method))]


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
        Names from `ANALYSES` to run; default all.
    model, checkpoint
        The live model for analyses that need one (a name, as in `dynamo.load_model`, or a
        `LoadedModel`); default the model and checkpoint the store was recorded with.
    boundaries : sequence of int, optional
        Layers after which a new phase begins, drawn on every depth plot; default found by
        `analyses.phases.find_phases` with ``phase_method`` (pass ``[]`` for none).
    export : sequence of str
        Views to export as trials x time x features arrays (see `analyses.export.VIEWS`).
    export_components : int, optional
        Project exported features onto this many principal directions.
    export_sphere : bool
        Export unit-normalised states.
    progress : bool
        Show progress bars.
    **options
        Passed to every analysis (``seed``, ``bootstrap``, ``device``, and entries' own).

    Returns
    -------
    dict
        The summary written to ``out/summary.json``, plus ``text`` (a human summary).
    """
    names = list(ANALYSES) if only is None else list(only)
    unknown = [name for name in names if name not in ANALYSES]
    if unknown:
        raise ValueError(f"unknown analyses {unknown}; choose from {', '.join(ANALYSES)}")
    from analyses.export import VIEWS

    if set(export) - set(VIEWS):
        raise ValueError(f"unknown export views {sorted(set(export) - set(VIEWS))}; choose from {', '.join(VIEWS)}")
    dataset = open_trajectories(store)
    if dataset.sizes["image"] == 0:
        raise ValueError(f"store {store} has no recorded images; record some with `dynamo record`")
    if "hidden" not in dataset:
        raise ValueError(
            f"store {store} holds only reduced views (recorded with --summaries-only); the dynamics "
            "analyses follow every token, so record again without --summaries-only. `dynamo phases` "
            "works on this store."
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    if boundaries is None:
        boundaries = phase_boundaries(dataset, phase_method)
        boundary_source = f"analyses.phases.find_phases(method={phase_method!r})"
    else:
        boundary_source = "given"
    boundaries = [int(b) for b in boundaries]
    loaded = _live_model(dataset, model, checkpoint, options.get("device", "cpu")) if any(
        ANALYSES[name].needs_model for name in names
    ) else None

    options = {"progress": progress, "boundaries": boundaries, **options}
    summary = {
        "store": str(store),
        "model": dataset.attrs.get("model"),
        "weights_sha256": dataset.attrs.get("weights_sha256"),
        "n_images": int(dataset.sizes["image"]),
        "boundaries": boundaries,
        "boundary_source": boundary_source,
        "analyses": {},
    }
    from figures.output import save_figures

    for name in names:
        entry = ANALYSES[name]
        result = entry.run(dataset, loaded, options)
        data = result.data.assign_attrs(
            analysis=name,
            store=str(store),
            model=str(dataset.attrs.get("model")),
            weights_sha256=str(dataset.attrs.get("weights_sha256")),
            boundaries=boundaries,
        )
        path = out / f"{name}.zarr"
        save_result(data, path)
        figure_paths = [str(p) for p in save_figures(entry.figures(data, boundaries), out, prefix=f"{name}_").values()]
        summary["analyses"][name] = {"result": str(path), "figures": figure_paths, **_jsonable(result.headline)}
    if export:
        from analyses import export as exporting

        summary["exports"] = [
            str(p)
            for view in export
            for p in exporting.export_trajectories(
                dataset, out, view=view, sphere=export_sphere, n_components=export_components, progress=progress
            )
        ]
    summary["seconds"] = round(time.perf_counter() - started, 2)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    summary["text"] = _text(summary, out)
    return summary


def _live_model(dataset, model, checkpoint, device) -> LoadedModel:
    from dynamo.models import load_model

    if isinstance(model, LoadedModel):
        loaded = model
    else:
        name = model or dataset.attrs.get("model")
        if name is None:
            raise ValueError("the store does not name its model; pass --model (and --checkpoint)")
        checkpoint = checkpoint or (dataset.attrs.get("checkpoint") if model is None else None)
        loaded = load_model(name, checkpoint=checkpoint)
    if loaded.weights_sha256 != dataset.attrs.get("weights_sha256"):
        warnings.warn(
            f"the live model's weights (sha256 {loaded.weights_sha256[:12]}) differ from the ones the "
            f"store was recorded with ({str(dataset.attrs.get('weights_sha256'))[:12]}); live and "
            "stored trajectories will not match",
            stacklevel=3,
        )
    loaded.module.to(device)
    return loaded


def _jsonable(value):
    """Numpy scalars and arrays as plain JSON values (recursively)."""
    import numpy as np

    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.ndarray, np.generic)):
        return _jsonable(value.tolist())
    return value


def _text(summary: dict, out: Path) -> str:
    lines = [
        f"{summary['model']}: {summary['n_images']} images from {summary['store']}; phase boundaries "
        f"after layers {summary['boundaries'] or 'none'} ({summary['boundary_source']})"
    ]
    for name, entry in summary["analyses"].items():
        lines.append(f"{name}:")
        for key, value in entry.items():
            if key not in ("result", "figures") and not key.endswith("_ci95"):
                lines.append(f"  {key}: {_short(value)}")
    if summary.get("exports"):
        lines.append("exported: " + ", ".join(summary["exports"]))
    lines.append(f"results (<name>.zarr), figures (.png) and summary.json in {out} ({summary['seconds']} s)")
    return "\n".join(lines)


def _short(value) -> str:
    if isinstance(value, dict):
        return "; ".join(f"{k} {_short(v)}" for k, v in value.items())
    if isinstance(value, list):
        return " ".join(_short(v) for v in value)
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


# --- command line ---------------------------------------------------------------------------


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add ``dynamo analyze``'s arguments, including every registered analysis' own."""
    parser.add_argument("store", help="trajectory store written by `dynamo record`")
    parser.add_argument("--out", required=True, help="output folder for results, figures and summary.json")
    parser.add_argument(
        "--only",
        type=comma_list,
        help=f"comma-separated analyses to run (default all): "
        + "; ".join(f"{name}: {entry.help}" for name, entry in ANALYSES.items()),
    )
    parser.add_argument("--model", help="live model for analyses that need one (default: the store's own model)")
    parser.add_argument("--checkpoint", help="local weights for --model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--boundaries",
        type=_boundary_list,
        help="comma-separated layers after which a new phase begins (default: found by max-cut; 'none' for none)",
    )
    parser.add_argument("--phase-method", choices=["maxcut", "contiguous"], default="maxcut")
    parser.add_argument(
        "--export",
        type=comma_list,
        default=[],
        help="views to export as trials x time x features .npy arrays for other dynamics tools "
        "(cls, patch_mean, register_mean, patch, register, ...)",
    )
    parser.add_argument("--export-components", type=int, help="project exported features on N principal directions")
    parser.add_argument("--export-sphere", action="store_true", help="export unit-normalised states")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    for entry in ANALYSES.values():
        if entry.add_arguments is not None:
            entry.add_arguments(parser)


def run_from_args(args: argparse.Namespace) -> dict:
    """The ``dynamo analyze`` command: `analyze` with the parsed arguments."""
    options = {
        key: value
        for key, value in vars(args).items()
        if key not in {"store", "out", "only", "model", "checkpoint", "boundaries", "phase_method", "export",
                       "export_components", "export_sphere", "quiet", "json", "run", "command", "cluster"}
    }
    return analyze(
        args.store,
        args.out,
        only=args.only,
        model=args.model,
        checkpoint=args.checkpoint,
        boundaries=args.boundaries,
        phase_method=args.phase_method,
        export=args.export,
        export_components=args.export_components,
        export_sphere=args.export_sphere,
        progress=not args.quiet,
        **options,
    )


def comma_list(text: str) -> list[str]:
    """Command-line ``a,b,c`` as a list of names."""
    return [part.strip() for part in text.split(",") if part.strip()]


def _boundary_list(text: str) -> list[int]:
    if text.strip().lower() == "none":
        return []
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layers or 'none', got {text!r}") from None
