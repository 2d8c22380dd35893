"""``dynamo profile``: one command from a model and images to a report of figures and numbers.

Stages, each shown as it runs and each resumable:

1. **record** the trajectories into ``DIR/trajectories.zarr`` (an interrupted recording resumes;
   an existing store is reused only if it was recorded with the same weights, preprocessing and
   images: `dynamo.record` refuses any other);
2. **phases**: the paper's layer dissimilarity, a partition of depth, its scores and its
   bootstrap stability, and the heatmap;
3. **dynamics**: every `dynamo.pipeline.analyze` analysis (basins, token motion, update rank, and with
   the live model perturbation recovery, Jacobian spectra and layer swaps), with the phase
   boundaries drawn on every depth plot;
4. **raptor** (with ``fit_raptor=k``): a k-block Raptor surrogate fitted on the store;
   **concepts** (with ``concepts=True``): one sparse dictionary across depth, its concepts against
   the phases (`dynamo.pipeline.concepts`; 40 s of CPU on the default store and over a minute of
   wall time on a busy machine, so opt-in);
5. **report**: ``DIR/report.html`` (self-contained), ``DIR/summary.json``.

A finished stage leaves ``DIR/stages/<stage>.json`` holding its summary and the key it was
computed for (the store's weights hash and image count, and the stage's settings); a re-run
reuses a stage whose key still matches and recomputes the others.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from dynamo import zoo
from dynamo.images import image_set
from dynamo.models import LoadedModel, load_model
from analyses import concepts as concept_analysis
from dynamo.pipeline.analyze import analyze
from dynamo.pipeline.concepts import concepts as concept_stage
from dynamo.pipeline.fit import fit
from dynamo.pipeline.phases import phases as phase_stage
from dynamo.pipeline.registry import ANALYSES
from dynamo.pipeline.summaries import format_value, headline_rows
from dynamo.record import record
from dynamo.serialize import digest, jsonable
from dynamo.store import check_output, open_trajectories
from figures.report import Section, write_report

__all__ = ["profile", "profile_store"]


def profile(
    model: str | LoadedModel | None = None,
    out: str | Path = "profile",
    *,
    images=None,
    checkpoint: str | Path | None = None,
    pretrained: bool = True,
    img_size: int | tuple[int, int] | None = None,
    preprocess: dict | str | None = None,
    limit: int | None = None,
    batch_size: int = 32,
    dtype: str = "float32",
    phase_method: str = "maxcut",
    eps: float = 0.1,
    k: int | None = None,
    n_bootstrap: int = 100,
    only: list[str] | None = None,
    fit_raptor: int | None = None,
    raptor_steps: int | None = None,
    concepts: bool = False,
    head: str | Path | None = None,
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
    checkpoint, pretrained, img_size, preprocess
        As `dynamo.load_model` (random weights are seeded with ``seed``).
    limit : int, optional
        Use only the first ``limit`` images.
    batch_size, dtype
        As `dynamo.record`.
    phase_method, eps, k
        How depth is partitioned (`analyses.phases.partition_matrix`): the paper's max-cut with
        fraction ``eps`` by default.
    n_bootstrap : int
        Bootstrap resamples of the images, for the stability of the phase boundaries and for every
        error bar of the dynamics.
    only : list of str, optional
        Dynamics analyses to run (names in `dynamo.pipeline.registry.ANALYSES`); default all.
    fit_raptor : int, optional
        Fit a Raptor surrogate with this many blocks on the store's phases.
    raptor_steps : int, optional
        Training steps per Raptor stage (default the fitter's).
    concepts : bool
        Also learn a concept dictionary across depth and analyse it on the phases (``DIR/concepts/``).
    head : str or Path, optional
        A linear head file for every accuracy (`dynamo.heads.LinearHead.load`); default the
        model's own classifier, or a probe fitted on the labels for a model without one.
    device : str
        Torch device for the live model.
    overwrite : bool
        Replace a store in ``out`` that was recorded with another model or images.
    seed : int
        Seed of every random draw (random weights, bootstrap, perturbation directions, Raptor).
    progress : bool
        Show progress bars.
    command : str, optional
        The command line, for the provenance table (default ``sys.argv``).

    Returns
    -------
    dict
        The content of ``summary.json``, plus ``text``, a human summary.
    """
    out = check_output(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if progress:
        print("[record]", file=sys.stderr, flush=True)
    loaded = model if isinstance(model, LoadedModel) else load_model(
        model or zoo.DEFAULT_MODEL, checkpoint, pretrained, img_size=img_size, preprocess=preprocess, seed=seed
    )
    store = out / "trajectories.zarr"
    record(
        loaded,
        image_set(images if images is not None else zoo.default_images(loaded.source)),
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
        store, out, model=loaded, phase_method=phase_method, eps=eps, k=k, n_bootstrap=n_bootstrap, only=only,
        fit_raptor=fit_raptor, raptor_steps=raptor_steps, concepts=concepts, head=head, device=device, seed=seed,
        progress=progress,
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
    n_bootstrap: int = 100,
    only: list[str] | None = None,
    fit_raptor: int | None = None,
    raptor_steps: int | None = None,
    concepts: bool = False,
    head: str | Path | None = None,
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
    out = check_output(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timings = dict(timings or {})
    dataset = open_trajectories(store)
    if dataset.sizes["image"] == 0:
        raise ValueError(f"store {store} has no recorded images; record some with `dynamo record`")
    if model is not None and not isinstance(model, LoadedModel):
        model = load_model(model, img_size=tuple(dataset.attrs["image_size"]))  # built for the store's input size
    if only is None:
        only = [name for name, entry in ANALYSES.items() if model is not None or not entry.needs_model]
    stages = ["phases", "dynamics", *(["raptor"] if fit_raptor else []), *(["concepts"] if concepts else []), "report"]

    def announce(stage: str) -> float:
        if progress:
            print(f"[{stages.index(stage) + 1}/{len(stages)}] {stage}", file=sys.stderr, flush=True)
        return time.perf_counter()

    identity = {"store": store_identity(store, dataset), "n_images": int(dataset.sizes["image"])}
    t = announce("phases")
    phases = _cached(
        out, "phases", {**identity, "method": phase_method, "eps": eps, "k": k, "n_bootstrap": n_bootstrap, "seed": seed},
        lambda: phase_stage(dataset, method=phase_method, eps=eps, k=k, n_bootstrap=n_bootstrap, seed=seed,
                            out=out / "phases.zarr", figure=out / "similarity.png", figure_formats=("png", "svg"),
                            progress=progress),
    )
    timings["phases"] = time.perf_counter() - t

    t = announce("dynamics")
    dynamics = _cached(
        out, "dynamics", {**identity, "only": only, "boundaries": phases["boundaries"], "seed": seed,
                                "n_bootstrap": n_bootstrap, "head": _file_key(head)},
        lambda: analyze(store, out / "dynamics", only=only, model=model, boundaries=phases["boundaries"],
                        head=head, device=device, seed=seed, n_bootstrap=n_bootstrap, progress=progress),
    )
    timings["dynamics"] = time.perf_counter() - t

    raptor = None
    if fit_raptor:
        t = announce("raptor")
        raptor = _cached(
            out, "raptor", {**identity, "k": fit_raptor, "steps": raptor_steps, "seed": seed,
                            "partition": phases["partition"], "head": _file_key(head)},
            lambda: fit(store, out / "raptor", k=fit_raptor, phases=phases, steps=raptor_steps, device=device,
                        seed=seed, progress=progress, head=head, teacher=model),
            invalidates=[out / "raptor"],
        )
        timings["raptor"] = time.perf_counter() - t

    concept_summary = None
    if concepts:
        t = announce("concepts")
        concept_summary = _cached(
            out, "concepts", {**identity, "partition": phases["partition"], "seed": seed},
            lambda: concept_stage(store, out / "concepts", partition=phases["partition"], seed=seed, device=device,
                                  progress=progress),
            invalidates=[out / "concepts"],
        )
        timings["concepts"] = time.perf_counter() - t

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
        "concepts": concept_summary,
        "provenance": _provenance(dataset, command),
        "seconds": {name: round(value, 2) for name, value in timings.items()},
    }
    summary["seconds"]["total"] = round(timings.get("record", 0.0) + time.perf_counter() - started, 2)
    summary = jsonable(summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _report(out, summary)
    summary["text"] = _text(summary, out)
    return summary


def store_identity(store: str | Path, dataset) -> str:
    """sha256 of what makes a store's trajectories what they are: its resolved path and its recording
    identity (weights, images and their contents, preprocessing, dtype, layers, tokens, autocast)."""
    return digest({"path": str(Path(store).resolve()), **dataset.attrs["identity"]})


def _file_key(path: str | Path | None) -> str | None:
    """A file's resolved path and sha256, for a stage key (None for no file)."""
    if path is None:
        return None
    return f"{Path(path).resolve()} sha256:{hashlib.sha256(Path(path).read_bytes()).hexdigest()}"


def _cached(out: Path, stage: str, key: dict, compute, invalidates=()) -> dict:
    """A stage's summary: reused from ``out/stages/<stage>.json`` if its key matches, else computed.

    ``invalidates`` are paths (a stage's checkpoints) removed before a stale stage is computed again.
    """
    path = out / "stages" / f"{stage}.json"
    key = jsonable(key)
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved["summary"]
    for stale in map(Path, invalidates):
        shutil.rmtree(stale, ignore_errors=True)
    summary = jsonable(compute())
    path.parent.mkdir(exist_ok=True)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps({"key": key, "summary": summary}, indent=1))
    partial.replace(path)
    return summary


def _provenance(dataset, command: str | None) -> dict:
    attrs = dataset.attrs
    return {
        "model": attrs.get("model"),
        "checkpoint": attrs.get("checkpoint"),
        "weights_sha256": attrs.get("weights_sha256"),
        "pretrained": attrs.get("pretrained"),
        "images": attrs.get("images_source", attrs.get("images")),
        "n_images": int(dataset.sizes["image"]),
        "image_size": attrs.get("image_size"),
        "preprocessing": attrs.get("preprocessing"),
        "preprocess_overrides": attrs.get("preprocess_overrides") or None,
        "init_seed": attrs.get("init_seed"),
        "dtype": attrs.get("dtype"),
        "versions": attrs.get("versions"),
        "command": command or " ".join(sys.argv),
        "python": platform.python_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _report(out: Path, summary: dict) -> None:
    phases = summary["phases"]
    sections = [
        Section(
            "Phases of depth",
            "Layer x layer dissimilarity, the paper's measure (mean over images of mean over the cls "
            "token and the patch mean of 1 - cos), with the phase partition drawn; boundary frequency "
            "is how often each boundary appears when the images are resampled (bootstrap). Against a "
            "smooth gradient (the matrix's diagonal average, max-cut re-run on it): "
            + phases.get("gradient_null_conclusion", "not tested") + ".",
            [(path, "Layer x layer similarity (1 - dissimilarity) with the phase boundaries dashed.")
             for path in phases.get("figures", [])],
            headline_rows({key: value for key, value in phases.items() if key not in ("similarity", "layers", "out", "text")}),
        )
    ]
    for name, entry in summary["dynamics"].items():
        sections.append(Section(f"Dynamics: {name}", ANALYSES[name].description,
                                list(zip(entry["figures"], entry["captions"])), headline_rows(entry)))
    if summary["raptor"]:
        raptor = summary["raptor"]
        sections.append(Section(
            f"Raptor surrogate, k = {raptor['k']}",
            "k shared blocks applied recurrently in place of the model's blocks, routed by the "
            "phase partition; R² of the surrogate's states against the model's, per layer.",
            [(path, "R² of the surrogate's states against the model's, per layer and token kind.")
             for path in raptor.get("figures", [])],
            headline_rows({key: value for key, value in raptor.items() if key not in ("out", "text")}),
        ))
    if summary.get("concepts"):
        entry = summary["concepts"]
        sections.append(Section(f"Concepts through depth ({entry['dictionary_kind']}, {entry['concepts']} concepts)",
                                concept_analysis.DESCRIPTION, list(zip(entry["figures"], entry["captions"])),
                                headline_rows({key: value for key, value in entry.items() if key not in ("out", "text")})))
    write_report(
        out / "report.html",
        f"dynamo profile: {summary['model']}",
        f"{summary['n_images']} images, {summary['layers']} layers; {summary['seconds']['total']:.0f} s.",
        sections,
        headline_rows(summary["provenance"]),
    )


def _text(summary: dict, out: Path) -> str:
    lines = [
        f"{summary['model']}: {summary['n_images']} images, {summary['layers']} layers",
        f"phases ({summary['phases']['method']}): {format_value(summary['partition'])}; boundaries after layers "
        f"{summary['boundaries']}",
        *([f"against a smooth gradient: {summary['phases']['gradient_null_conclusion']}"]
          if "gradient_null_conclusion" in summary["phases"] else []),
    ]
    for name, entry in summary["dynamics"].items():
        scalars = {key: value for key, value in entry.items() if isinstance(value, (int, float, str)) and key != "result"}
        numbers = "; ".join(f"{key} = {value}" for key, value in headline_rows(scalars).items())
        lines.append(f"{name}: {numbers or 'per-layer numbers in summary.json'}")
    if summary["raptor"]:
        raptor = summary["raptor"]
        lines.append(f"raptor k={raptor['k']} on {format_value(raptor['partition'])}: r2_final = "
                     f"{format_value(raptor.get('r2_final'))}, accuracy_ratio = {format_value(raptor.get('accuracy_ratio'))}")
    if summary.get("concepts"):
        entry = summary["concepts"]
        lines.append(f"concepts ({entry['dictionary_kind']}, {entry['concepts']}): births and deaths at phase boundaries "
                     f"{format_value(entry['boundary_fraction_both'])} vs {format_value(entry['boundary_null_fraction_both'])} "
                     f"at random boundaries (p = {format_value(entry['boundary_p_value_both'])})")
    lines.append(f"report: {out / 'report.html'}; summary: {out / 'summary.json'} ({summary['seconds']['total']:.0f} s)")
    return "\n".join(lines)
