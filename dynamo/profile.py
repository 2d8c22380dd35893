"""``dynamo profile``: one command from a model and images to a report of figures and numbers.

Stages, each shown as it runs and each resumable:

1. **record** the trajectories into ``DIR/trajectories.zarr`` (an interrupted recording resumes;
   an existing store is reused only if it was recorded with the same weights, preprocessing and
   images: `dynamo.record` refuses any other);
2. **phases**: the paper's layer dissimilarity, a partition of depth, its scores and its
   bootstrap stability, and the heatmap;
3. **dynamics**: every `dynamo.analyze` analysis (basins, token motion, update rank, and with
   the live model perturbation recovery, Jacobian spectra and layer swaps), with the phase
   boundaries drawn on every depth plot;
4. **raptor** (with ``fit_raptor=k``): a k-block Raptor surrogate fitted on the store;
5. **report**: ``DIR/report.html`` (self-contained), ``DIR/summary.json``.

A finished stage leaves ``DIR/stages/<stage>.json`` holding its summary and the key it was
computed for (the store's weights hash and image count, and the stage's settings); a re-run
reuses a stage whose key still matches and recomputes the others.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import xarray as xr

from dynamo import zoo
from dynamo.images import image_set
from dynamo.models import LoadedModel, load_model
from dynamo.record import record
from dynamo.store import open_trajectories, save_result

__all__ = ["profile", "profile_store"]


def profile(
    model: str | LoadedModel | None = None,
    out: str | Path = "profile",
    *,
    images=None,
    checkpoint: str | Path | None = None,
    pretrained: bool = True,
    limit: int | None = None,
    batch_size: int = 32,
    dtype: str = "float32",
    phase_method: str = "maxcut",
    eps: float = 0.1,
    k: int | None = None,
    n_boot: int = 100,
    only: list[str] | None = None,
    fit_raptor: int | None = None,
    raptor_steps: int | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    seed: int = 0,
    progress: bool = True,
    command: str | None = None,
) -> dict:
    """Profile a ViT: record, phases, dynamics, optionally Raptor, and a report.

    Parameters
    ----------
    model : str or LoadedModel, optional
        timm name, zoo name, or a loaded model; default the zoo's default model.
    out : str or Path
        Output folder; holds the store, the figures, ``report.html`` and ``summary.json``.
    images : folder, list of paths, array or ImageSet, optional
        Default: the zoo's bundled held-out digits (with labels).
    checkpoint, pretrained
        As `dynamo.load_model`.
    limit : int, optional
        Use only the first ``limit`` images.
    batch_size, dtype
        As `dynamo.record`.
    phase_method, eps, k
        How depth is partitioned (`analyses.phases.partition_matrix`): the paper's max-cut with
        fraction ``eps`` by default.
    n_boot : int
        Bootstrap replicates over images for the stability of the phase boundaries.
    only : list of str, optional
        Dynamics analyses to run (names in `dynamo.analyze.ANALYSES`); default all.
    fit_raptor : int, optional
        Fit a Raptor surrogate with this many blocks on the store's phases.
    raptor_steps : int, optional
        Training steps per Raptor stage (default the fitter's).
    device : str
        Torch device for the live model.
    overwrite : bool
        Replace a store in ``out`` that was recorded with another model or images.
    seed : int
        Seed of every random draw (bootstrap, perturbation directions, Raptor).
    progress : bool
        Show progress bars.
    command : str, optional
        The command line, for the provenance table (default ``sys.argv``).

    Returns
    -------
    dict
        The content of ``summary.json``, plus ``text``, a human summary.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if progress:
        print("[record]", file=sys.stderr, flush=True)
    loaded = model if isinstance(model, LoadedModel) else load_model(model or zoo.DEFAULT_MODEL, checkpoint, pretrained)
    store = out / "trajectories.zarr"
    record(
        loaded,
        image_set(images if images is not None else zoo.default_images()),
        store,
        batch_size=batch_size,
        dtype=dtype,
        limit=limit,
        device=device,
        overwrite=overwrite,
        progress=progress,
    )
    recorded = time.perf_counter() - started
    return profile_store(
        store, out, model=loaded, phase_method=phase_method, eps=eps, k=k, n_boot=n_boot, only=only,
        fit_raptor=fit_raptor, raptor_steps=raptor_steps, device=device, seed=seed, progress=progress,
        command=command, timings={"record": recorded},
    )


def profile_store(
    store: str | Path,
    out: str | Path,
    *,
    model: str | LoadedModel | None = None,
    phase_method: str = "maxcut",
    eps: float = 0.1,
    k: int | None = None,
    n_boot: int = 100,
    only: list[str] | None = None,
    fit_raptor: int | None = None,
    raptor_steps: int | None = None,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
    command: str | None = None,
    timings: dict | None = None,
) -> dict:
    """Profile an existing trajectory store: phases, dynamics, optionally Raptor, and a report.

    Parameters
    ----------
    store : str or Path
        A trajectory store (`dynamo.record`).
    out : str or Path
        Output folder (may be the store's own parent).
    model : str or LoadedModel, optional
        The live model, for the analyses that run it (perturbation, Jacobian, layer swap); without
        it only the analyses that read the store run.
    timings : dict, optional
        Seconds already spent by earlier stages (``record``), carried into the summary.

    Other parameters are as `profile`.

    Returns
    -------
    dict
        The content of ``summary.json``, plus ``text``, a human summary.
    """
    from dynamo.analyze import ANALYSES

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timings = dict(timings or {})
    dataset = open_trajectories(store)
    if dataset.sizes["image"] == 0:
        raise ValueError(f"store {store} has no recorded images; record some with `dynamo record`")
    if model is not None and not isinstance(model, LoadedModel):
        model = load_model(model)
    if only is None:
        only = [name for name, entry in ANALYSES.items() if model is not None or not entry.needs_model]
    stages = ["phases", "dynamics", *(["raptor"] if fit_raptor else []), "report"]

    def announce(stage: str) -> float:
        if progress:
            print(f"[{stages.index(stage) + 1}/{len(stages)}] {stage}", file=sys.stderr, flush=True)
        return time.perf_counter()

    identity = {"weights_sha256": dataset.attrs["weights_sha256"], "n_images": int(dataset.sizes["image"])}
    t = announce("phases")
    phases = _cached(
        out, "phases", {**identity, "method": phase_method, "eps": eps, "k": k, "n_boot": n_boot, "seed": seed},
        lambda: _phases(dataset, out, phase_method, eps, k, n_boot, seed, progress),
    )
    timings["phases"] = time.perf_counter() - t

    t = announce("dynamics")
    dynamics = _cached(
        out, "dynamics", {**identity, "only": only, "boundaries": phases["boundaries"], "seed": seed},
        lambda: _dynamics(store, out, model, only, phases["boundaries"], device, seed, progress),
    )
    timings["dynamics"] = time.perf_counter() - t

    raptor = None
    if fit_raptor:
        t = announce("raptor")
        raptor = _cached(
            out, "raptor", {**identity, "k": fit_raptor, "steps": raptor_steps, "seed": seed,
                            "partition": phases["partition"]},
            lambda: _raptor(store, out, fit_raptor, phases, raptor_steps, device, seed, progress),
        )
        timings["raptor"] = time.perf_counter() - t

    announce("report")
    summary = {
        "model": dataset.attrs["model"],
        "weights_sha256": dataset.attrs["weights_sha256"],
        "n_images": identity["n_images"],
        "layers": int(dataset.sizes["layer"]),
        "store": str(store),
        "partition": phases["partition"],
        "boundaries": phases["boundaries"],
        "thresholds": phases["thresholds"],
        "similarity": phases["similarity"],
        "phases": phases,
        "dynamics": dynamics["analyses"],
        "raptor": raptor,
        "provenance": _provenance(dataset, command),
        "seconds": {name: round(value, 2) for name, value in timings.items()},
    }
    summary["seconds"]["total"] = round(timings.get("record", 0.0) + time.perf_counter() - started, 2)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    _report(out, summary)
    summary["text"] = _text(summary, out)
    return summary


def _cached(out: Path, stage: str, key: dict, compute) -> dict:
    """A stage's summary: reused from ``out/stages/<stage>.json`` if its key matches, else computed."""
    path = out / "stages" / f"{stage}.json"
    key = json.loads(json.dumps(key, default=str))
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved["summary"]
    summary = json.loads(json.dumps(compute(), default=str))
    path.parent.mkdir(exist_ok=True)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps({"key": key, "summary": summary}, indent=1))
    partial.replace(path)
    return summary


def _phases(dataset, out: Path, method: str, eps: float, k: int | None, n_boot: int, seed: int, progress: bool) -> dict:
    from analyses import phases as phasing
    from figures.output import save_figures
    from figures.similarity import similarity_heatmap

    result = phasing.phase_analysis(dataset, method, eps, k, n_boot=n_boot, seed=seed, progress=progress)
    save_result(result, out / "phases.zarr")
    summary = phasing.phase_summary(result)
    summary.pop("text")
    matrix = result["dissimilarity"]
    heatmap = similarity_heatmap(matrix, {f"{method} phases": summary["partition"]}).figure
    figure = save_figures({"similarity": heatmap}, out, formats=("png", "svg"))["similarity"]
    return {**summary, "similarity": np.round(matrix.values, 6).tolist(), "figures": [str(figure)]}


def _dynamics(store: Path, out: Path, loaded, only, boundaries, device, seed, progress) -> dict:
    from dynamo.analyze import analyze

    return analyze(store, out / "dynamics", only=only, model=loaded, boundaries=boundaries, device=device,
                   seed=seed, progress=progress)


def _raptor(store: Path, out: Path, k: int, phases: dict, steps, device, seed, progress) -> dict:
    from analyses import phases as phasing
    from dynamo.raptor import RaptorFitter
    from figures.output import save_figures
    from figures.raptor import plot_r2_per_layer

    partition = phases["partition"]
    if phases["thresholds"] is None or len(partition) != k:
        # the found phases are not k contiguous blocks: the exact contiguous split into k
        partition = phasing.contiguous_partition(xr.open_zarr(out / "phases.zarr")["dissimilarity"].load(), k)
    options = {"steps": steps} if steps else {}
    fitter = RaptorFitter(k=k, partition=partition, seed=seed, device=device, progress=progress,
                          checkpoint_dir=out / "raptor" / "checkpoints", **options)
    fitter.fit(store)
    fitter.save(out / "raptor")
    report = fitter.evaluate(store)
    save_result(report, out / "raptor" / "evaluation.zarr")
    r2_figure = plot_r2_per_layer(report, boundaries=phasing.boundaries(partition))
    figure = save_figures({"r2_per_layer": r2_figure}, out / "raptor", formats=("png", "svg"))["r2_per_layer"]
    numbers = {key: report.attrs[key] for key in ("r2_final", "accuracy_ratio", "agreement", "accuracy_teacher",
                                                  "accuracy_surrogate", "images") if key in report.attrs}
    return {"k": k, "partition": partition, **numbers,
            "r2_per_layer": np.round(report["r2"].sel(group="all").values, 4).tolist(),
            "figures": [str(figure)]}


def _provenance(dataset, command: str | None) -> dict:
    attrs = dataset.attrs
    return {
        "model": attrs.get("model"),
        "checkpoint": attrs.get("checkpoint"),
        "weights_sha256": attrs.get("weights_sha256"),
        "pretrained": attrs.get("pretrained"),
        "images": attrs.get("images_source", attrs.get("images")),
        "n_images": int(dataset.sizes["image"]),
        "preprocessing": attrs.get("preprocessing"),
        "dtype": attrs.get("dtype"),
        "versions": attrs.get("versions"),
        "command": command or " ".join(sys.argv),
        "python": platform.python_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _report(out: Path, summary: dict) -> None:
    from figures.report import Section, write_report

    phases = summary["phases"]
    sections = [
        Section(
            "Phases of depth",
            "Layer x layer dissimilarity, the paper's measure (mean over images of mean over the cls "
            "token and the patch mean of 1 - cos), with the phase partition drawn; boundary frequency "
            "is how often each boundary appears when the images are resampled (bootstrap).",
            phases["figures"],
            {
                "partition": phases["partition"],
                "boundaries (after layer)": phases["boundaries"],
                "Raptor thresholds": phases["thresholds"],
                **{f"score: {name}": value for name, value in phases["scores"].items()},
                "boundary frequency": phases.get("boundary_frequency", "no bootstrap"),
                "bootstrap consensus": phases.get("consensus", "no bootstrap"),
                "consensus support": phases.get("consensus_support", "no bootstrap"),
            },
        )
    ]
    for name, entry in summary["dynamics"].items():
        numbers = {key: value for key, value in entry.items() if key not in ("result", "figures")}
        sections.append(Section(f"Dynamics: {name}", _DYNAMICS_TEXT.get(name, ""), entry["figures"], numbers))
    if summary["raptor"]:
        raptor = summary["raptor"]
        sections.append(
            Section(
                f"Raptor surrogate, k = {raptor['k']}",
                "k shared blocks applied recurrently in place of the model's blocks, routed by the "
                "phase partition; R² of the surrogate's states against the model's, per layer.",
                [Path(p) for p in raptor.get("figures", [])],
                {key: value for key, value in raptor.items() if key != "figures"},
            )
        )
    write_report(
        out / "report.html",
        f"dynamo profile: {summary['model']}",
        f"{summary['n_images']} images, {summary['layers']} layers; {summary['seconds']['total']:.0f} s.",
        sections,
        summary["provenance"],
    )


_DYNAMICS_TEXT = {
    "basins": "Directional convergence: the cosine of each token to its own final direction, per layer "
    "and token kind; class structure of the cls direction per layer; cls trajectories projected to 2-D.",
    "tokens": "Angular speed arccos<x_l, x_(l+1)> per token kind, and patch coherence (mean cosine of "
    "patches to their mean direction).",
    "rank": "Rank of the layer updates x_(l+1) - x_l (raw and on the sphere): stable rank, effective rank, "
    "participation ratio, directions for 90% of the variance, with bootstrap error bars.",
    "perturbation": "A perturbation of relative size alpha injected at layer l0 and carried through the "
    "remaining blocks: gap to the clean trajectory at every later layer, and the recovery ratio.",
    "jacobian": "Top singular values of each block's Jacobian along real trajectories: local expansion "
    "(> 1) or contraction (< 1) per layer.",
    "swap": "Replacing a layer by another block within a phase and across phases: accuracy and final-layer "
    "R² against the clean run.",
}


def _text(summary: dict, out: Path) -> str:
    lines = [
        f"{summary['model']}: {summary['n_images']} images, {summary['layers']} layers",
        f"phases ({summary['phases']['method']}): {summary['partition']}; boundaries after layers "
        f"{summary['boundaries']}",
    ]
    for name, entry in summary["dynamics"].items():
        scalars = {key: value for key, value in entry.items() if isinstance(value, (int, float, str))
                   and key != "result"}
        numbers = "; ".join(f"{key} = {_number(value)}" for key, value in scalars.items())
        lines.append(f"{name}: {numbers or 'per-layer numbers in summary.json'}")
    if summary["raptor"]:
        raptor = summary["raptor"]
        lines.append(f"raptor k={raptor['k']} on {raptor['partition']}: r2_final = {_number(raptor.get('r2_final'))}, "
                     f"accuracy_ratio = {_number(raptor.get('accuracy_ratio'))}")
    lines.append(f"report: {out / 'report.html'}; summary: {out / 'summary.json'} ({summary['seconds']['total']:.0f} s)")
    return "\n".join(lines)


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
