"""``dynamo profile``: one command from a model and images to a report of figures and numbers.

Stages record, phases, dynamics, raptor (opt-in), concepts (opt-in) and report; a finished stage leaves
``DIR/stages/<stage>.json`` with its summary and the key it was computed for, and a re-run reuses a stage
whose key still matches.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from analyses import concepts as concept_analysis
from dynamo import zoo
from dynamo.images import image_set
from dynamo.layout import default_tokens, describe_tokens
from dynamo.models import LoadedModel, load_model
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


def profile(model: str | LoadedModel | None = None, out: str | Path = "profile", *, images=None,
            checkpoint: str | Path | None = None, pretrained: bool = True, img_size: int | tuple[int, int] | None = None,
            preprocess: dict | str | None = None, timm_options: dict | None = None, limit: int | None = None,
            batch_size: int = 32, dtype: str = "float32", device: str = "cpu", overwrite: bool = False, seed: int = 0,
            progress: bool = True, **options) -> dict:
    """Profile a ViT: record, phases, dynamics, optionally Raptor and concepts, and a report.

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
    timm_options : dict, optional
        Extra `timm.create_model` options (``global_pool``, ...), kept with the store.
    limit : int, optional
        Use only the first ``limit`` images.
    batch_size, dtype, overwrite
        As `dynamo.record`.
    **options
        As `profile_store` (``phase_method``, ``eps``, ``k``, ``tokens``, ``n_bootstrap``, ``only``,
        ``fit_raptor``, ``raptor_steps``, ``concepts``, ``head``, ``command``), which returns the summary.
    """
    out = check_output(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if progress:
        print("[record]", file=sys.stderr, flush=True)
    loaded = model if isinstance(model, LoadedModel) else load_model(
        model or zoo.DEFAULT_MODEL, checkpoint, pretrained, img_size=img_size, preprocess=preprocess, seed=seed,
        **(timm_options or {}),
    )
    store = out / "trajectories.zarr"
    record(loaded, image_set(images if images is not None else zoo.default_images(loaded.source)), store,
           batch_size=batch_size, dtype=dtype, limit=limit, device=device, overwrite=overwrite, progress=progress)
    return profile_store(store, out, model=loaded, device=device, seed=seed, progress=progress,
                         timings={"record": time.perf_counter() - started}, **options)


def profile_store(store: str | Path, out: str | Path, *, model: str | LoadedModel | None = None, phase_method: str = "maxcut",
                  eps: float = 0.1, k: int | None = None, tokens: str | None = None, n_bootstrap: int = 100,
                  only: list[str] | None = None, fit_raptor: int | None = None, raptor_steps: int | None = None,
                  concepts: bool = False, head: str | Path | None = None, device: str = "cpu", seed: int = 0,
                  progress: bool = True, command: str | None = None, timings: dict | None = None) -> dict:
    """Profile an existing trajectory store: phases, dynamics, optionally Raptor and concepts, and a report.

    Parameters
    ----------
    store : str or Path
        A trajectory store (`dynamo.record`).
    out : str or Path
        Output folder (may be the store's own parent).
    model : str or LoadedModel, optional
        The live model, for the analyses that run it (perturbation, Jacobian, layer swap); without
        it only the analyses that read the store run.
    phase_method, eps, k
        How depth is partitioned (`analyses.phases.partition_matrix`).
    tokens : str, optional
        Token view of the layer dissimilarity; default `dynamo.layout.default_tokens`.
    n_bootstrap : int
        Bootstrap resamples of the images, for the phase boundaries and every error bar of the dynamics.
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
    seed : int
        Seed of every random draw (random weights, bootstrap, perturbation directions, Raptor).
    progress : bool
    command : str, optional
        The command line, for the provenance table (default ``sys.argv``).
    timings : dict, optional
        Seconds already spent by earlier stages (``record``), carried into the summary.

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

    def announce(stage: str) -> None:
        if progress:
            print(f"[{stages.index(stage) + 1}/{len(stages)}] {stage}", file=sys.stderr, flush=True)

    def run(stage: str, key: dict, compute, invalidates=()) -> dict:
        announce(stage)
        t = time.perf_counter()
        summary = _cached(out, stage, {**identity, **key}, compute, invalidates)
        timings[stage] = time.perf_counter() - t
        return summary

    identity = {"store": store_identity(store, dataset), "n_images": int(dataset.sizes["image"])}
    tokens = default_tokens(dataset, tokens)
    phases = run(
        "phases", {"method": phase_method, "eps": eps, "k": k, "n_bootstrap": n_bootstrap, "seed": seed, "tokens": tokens},
        lambda: phase_stage(dataset, method=phase_method, eps=eps, k=k, tokens=tokens, n_bootstrap=n_bootstrap, seed=seed,
                            out=out / "phases.zarr", figure=out / "similarity.png", figure_formats=("png", "svg"),
                            progress=progress),
    )
    dynamics = run(
        "dynamics", {"only": only, "boundaries": phases["boundaries"], "seed": seed, "n_bootstrap": n_bootstrap,
                     "head": _file_key(head)},
        lambda: analyze(store, out / "dynamics", only=only, model=model, boundaries=phases["boundaries"],
                        head=head, device=device, seed=seed, n_bootstrap=n_bootstrap, progress=progress),
    )
    raptor = run(
        "raptor", {"k": fit_raptor, "steps": raptor_steps, "seed": seed, "partition": phases["partition"],
                   "head": _file_key(head)},
        lambda: fit(store, out / "raptor", k=fit_raptor, phases=phases, steps=raptor_steps, device=device,
                    seed=seed, progress=progress, head=head, teacher=model),
        invalidates=[out / "raptor"],
    ) if fit_raptor else None
    concept_summary = run(
        "concepts", {"partition": phases["partition"], "seed": seed},
        lambda: concept_stage(store, out / "concepts", partition=phases["partition"], seed=seed, device=device,
                              progress=progress),
        invalidates=[out / "concepts"],
    ) if concepts else None

    announce("report")
    summary = {
        "model": dataset.attrs["model"],
        "weights_sha256": dataset.attrs["weights_sha256"],
        "n_images": identity["n_images"],
        "layers": int(dataset.sizes["layer"]),
        "tokens": tokens,
        "token_view": describe_tokens(dataset, tokens),
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
    """sha256 of a store's resolved path and its recording identity (weights, images, preprocessing, dtype, ...)."""
    return digest({"path": str(Path(store).resolve()), **dataset.attrs["identity"]})


def _file_key(path: str | Path | None) -> str | None:
    """A file's resolved path and sha256, for a stage key (None for no file)."""
    if path is None:
        return None
    return f"{Path(path).resolve()} sha256:{hashlib.sha256(Path(path).read_bytes()).hexdigest()}"


def _cached(out: Path, stage: str, key: dict, compute, invalidates=()) -> dict:
    """A stage's summary: reused from ``out/stages/<stage>.json`` if its key matches, else computed after removing
    ``invalidates`` (a stale stage's checkpoints)."""
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

    def named(*keys):
        return {key: attrs.get(key) for key in keys}

    return {
        **named("model", "checkpoint", "weights_sha256", "pretrained"),
        "images": attrs.get("images_source", attrs.get("images")),
        "n_images": int(dataset.sizes["image"]),
        **named("image_size", "preprocessing"),
        "preprocess_overrides": attrs.get("preprocess_overrides") or None,
        **named("init_seed", "dtype", "versions"),
        "command": command or " ".join(sys.argv),
        "python": platform.python_version(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _report(out: Path, summary: dict) -> None:
    phases = summary["phases"]
    sections = [
        Section(
            "Phases of depth",
            f"Layer x layer dissimilarity: mean over images of mean over the token view {summary['token_view']} of "
            "1 - cos, with the phase partition drawn; boundary frequency "
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
        f"phases ({summary['phases']['method']}, token view {summary['token_view']}): {format_value(summary['partition'])}; "
        f"boundaries after layers {summary['boundaries']}",
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
