"""Comparative studies: many models, seeds or training settings, profiled and set side by side.

`load_study` reads what `dynamo profile` wrote and never runs a model; models of different depths line up on
``depth`` and ``block_depth`` (layer / L).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import xarray as xr

from dynamo.partition import assign_phases, boundaries_of, from_result
from dynamo.pipeline.profile import profile, profile_store, store_identity
from dynamo.pipeline.summaries import format_value
from dynamo.store import is_trajectory_store, open_trajectories, save_result
from figures import compare as compare_figures
from figures.output import save_figures
from figures.report import Section, write_report

__all__ = ["compare", "load_study", "profile_models", "headline_table"]

# Curves overlaid by `compare`: (variable in the study, selection, y label).
COMPARED_CURVES = (
    ("basins_gamma", {"token_kind": "cls"}, "cls: cos to own final direction (γ)"),
    ("basins_gamma", {"token_kind": "patch"}, "patches: cos to own final direction (γ)"),
    ("tokens_speed", {"token_kind": "cls"}, "cls angular speed (degree / block)"),
    ("tokens_speed", {"token_kind": "patch"}, "patch angular speed (degree / block)"),
    ("tokens_coherence", {}, "patch coherence κ"),
    ("rank_rank", {"measure": "stable_rank", "token_kind": "patch", "space": "sphere"}, "stable rank of patch updates (sphere)"),
)


def profile_models(models: Sequence, out: str | Path, *, images=None, **options) -> list[Path]:
    """Profile several models into ``out/<label>`` each (resumable); return the folders in the order of ``models``.

    ``models``: names, or dicts with ``model``, optionally ``label`` and any per-model option of
    `dynamo.pipeline.profile.profile`; ``images`` every model sees (default the bundled digits); ``**options`` go to
    `dynamo.pipeline.profile.profile`.
    """
    folders = []
    for entry in models:
        spec = {"model": entry} if isinstance(entry, str) else dict(entry)
        label = spec.pop("label", None) or _slug(spec["model"])
        folder = Path(out) / label
        profile(spec.pop("model"), folder, images=images, **spec, **options)
        folders.append(folder)
    return folders


def load_study(paths: Sequence[str | Path], labels: Sequence[str] | None = None) -> xr.Dataset:
    """Combine profiles (folders with ``summary.json``) into one Dataset with a ``model`` dimension.

    It holds ``similarity`` (model, layer_i, layer_j); ``<analysis>_<variable>`` averaged over images; ``phase_<score>``,
    ``n_phases``, ``n_images`` and any ``raptor_*`` (model); coords ``depth``, ``block_depth`` and ``phase``.
    """
    if not paths:
        raise ValueError("no profiles to compare")
    summaries = [_summary(Path(p)) for p in paths]
    labels = list(labels) if labels is not None else _unique([s["model"] for s in summaries])
    if len(labels) != len(summaries):
        raise ValueError(f"{len(labels)} labels for {len(summaries)} profiles")
    parts = [_one_profile(summary) for summary in summaries]
    combined = xr.concat(parts, dim=xr.Variable("model", labels), join="outer", coords="all", combine_attrs="drop")
    return combined.assign_attrs(profiles=json.dumps([str(p) for p in paths]))


def headline_table(study: xr.Dataset) -> list[dict]:
    """One row per model of the scalar variables (phase scores, Raptor fit, image count)."""
    scalars = [name for name, variable in study.data_vars.items() if variable.dims == ("model",)]
    rows = []
    for label in study["model"].values:
        row = {"model": str(label), "layers": int(study["n_layers"].sel(model=label)),
               "boundaries": boundaries_of(study["phase"].sel(model=label).dropna("layer"))}
        for name in scalars:
            value = float(study[name].sel(model=label))
            row[name] = None if np.isnan(value) else round(value, 4)
        rows.append(row)
    return rows


def compare(paths: Sequence[str | Path], out: str | Path, *, labels: Sequence[str] | None = None,
            progress: bool = True) -> dict:
    """Side-by-side report of several profiles (or stores, profiled first from the store alone): figures, table, HTML and JSON.

    Writes ``compare.html``, ``compare.json``, ``study.zarr`` and PNG figures to ``out``; returns ``compare.json``'s
    content plus ``text``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    folders = []
    for path in map(Path, paths):
        if (path / "summary.json").exists():
            folders.append(path)
        elif is_trajectory_store(path):
            # its own folder, named from the store and its identity: two stores never share one
            folder = out / f"{_slug(path.stem)}-{store_identity(path, open_trajectories(path))[:10]}"
            profile_store(path, folder, progress=progress)
            folders.append(folder)
        else:
            raise ValueError(f"{path} is neither a profile folder (with summary.json) nor a trajectory store")
    study = load_study(folders, labels)
    save_result(study.assign_attrs(analysis="study"), out / "study.zarr")
    table = headline_table(study)
    figures = {"similarity_grid": compare_figures.plot_similarity_grid(study)}
    for variable, selection, ylabel in COMPARED_CURVES:
        if variable in study and all(dim in study[variable].dims and value in study[dim].values
                                     for dim, value in selection.items()):  # a cls-less study has no cls curve
            key = "_".join([variable, *map(str, selection.values())]).replace("rank_rank", "rank")
            figures[key] = compare_figures.plot_overlaid(study, variable, selection, ylabel)
    paths_written = {key: str(path) for key, path in save_figures(figures, out).items()}
    summary = {"models": [str(m) for m in study["model"].values], "table": table, "figures": paths_written,
               "profiles": [str(f) for f in folders]}
    (out / "compare.json").write_text(json.dumps(summary, indent=2))
    write_report(
        out / "compare.html",
        "dynamo compare: " + ", ".join(summary["models"]),
        "Depth normalised to [0, 1] (layer / L) on every curve; dashed lines are phase boundaries.",
        [Section("Headline numbers", "One column per model.", [],
                 {key: {row["model"]: format_value(row.get(key)) for row in table}
                  for key in dict.fromkeys(k for row in table for k in row if k != "model")}),
         Section("Similarity and phases", "", [(paths_written["similarity_grid"],
                                                "Layer similarity of every model, phase boundaries dashed.")]),
         Section("Dynamics, overlaid", "", [(p, f"{k.replace('_', ' ')}, against depth / L.")
                                            for k, p in paths_written.items() if k != "similarity_grid"])],
        {"profiles": format_value(summary["profiles"])},
    )
    summary["text"] = _table_text(table) + f"\nreport: {out / 'compare.html'}"
    return summary


def _summary(folder: Path) -> dict:
    path = folder / "summary.json"
    if not path.exists():
        raise ValueError(f"{folder} has no summary.json; run `dynamo profile ... --out {folder}` first")
    summary = json.loads(path.read_text())
    summary["folder"] = folder
    return summary


def _read_result(summary: dict, relative: str, what: str) -> xr.Dataset:
    """A result a profile wrote, read from the summary's own folder and checked against its model and weights.

    Raises ValueError if the result is missing or was computed on another model or other weights.
    """
    folder = summary["folder"]
    path = folder / relative
    if not path.exists():
        raise ValueError(f"{folder} is an incomplete profile: its {what} result {path} is missing; run "
                         f"`dynamo profile ... --out {folder}` again")
    result = xr.open_zarr(path)
    expected = (summary.get("model"), summary.get("weights_sha256"))
    found = (result.attrs.get("model"), result.attrs.get("weights_sha256"))
    if None not in expected and found != expected:
        raise ValueError(
            f"{folder}: its {what} result was computed on {found[0]} (weights {str(found[1])[:12]}), but its "
            f"summary.json is of {expected[0]} (weights {str(expected[1])[:12]}); the folder mixes two profiles: "
            f"run `dynamo profile ... --out {folder}` again"
        )
    return result


def _one_profile(summary: dict) -> xr.Dataset:
    store = summary["folder"] / "trajectories.zarr"
    if is_trajectory_store(store):
        recorded = open_trajectories(store).attrs
        if (recorded.get("model"), recorded.get("weights_sha256")) != (summary.get("model"), summary.get("weights_sha256")):
            raise ValueError(f"{summary['folder']}: its store holds {recorded.get('model')} (weights "
                             f"{str(recorded.get('weights_sha256'))[:12]}), but its summary.json is of {summary.get('model')} "
                             f"(weights {str(summary.get('weights_sha256'))[:12]}): run `dynamo profile` on it again")
    phases = _read_result(summary, "phases.zarr", "phases").load()
    n_layers = summary["layers"] - 1
    parts = [xr.Dataset({"similarity": phases["dissimilarity"].reset_coords(drop=True)},
                        coords={"layer": np.arange(n_layers + 1)})]
    for name in summary["dynamics"]:
        result = _read_result(summary, f"dynamics/{name}.zarr", name)
        means = result.mean("image") if "image" in result.dims else result
        parts.append(means.rename({v: f"{name}_{v}" for v in means.data_vars}).drop_vars(
            [c for c in means.coords if c not in means.dims], errors="ignore").load())
    scalars = {f"phase_{score}": value for score, value in zip(phases["score"].values, phases["scores"].values)
               if score != "n_phases"}
    scalars.update(n_phases=len(summary["partition"]), n_images=summary["n_images"], n_layers=n_layers)
    if summary.get("raptor"):
        scalars.update(raptor_r2_final=summary["raptor"].get("r2_final"),
                       raptor_accuracy_ratio=summary["raptor"].get("accuracy_ratio"))
    parts.append(xr.Dataset({k: ((), np.nan if v is None else float(v)) for k, v in scalars.items()}))
    combined = assign_phases(xr.merge(parts, compat="override", join="outer", combine_attrs="drop"), from_result(phases))
    depth = {}
    for dim, name in (("layer", "depth"), ("block", "block_depth")):
        if dim in combined.dims:
            depth[name] = (dim, combined[dim].values / n_layers)
    return combined.assign_coords(depth)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(name)).strip("-")


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return unique


def _table_text(table: list[dict]) -> str:
    keys = ["model", "layers", "n_phases", "boundaries", "phase_contrast", "raptor_r2_final"]
    lines = ["  ".join(keys)]
    for row in table:
        lines.append("  ".join(str(row.get(k)) for k in keys))
    return "\n".join(lines)
