"""``dynamo fit`` and the Raptor stage of ``dynamo profile``: fit every k and seed asked for, evaluate, compare with baselines, save.

One fit is saved in ``OUT``, several in ``OUT/k<K>-seed<S>/``, all on the held-out images of the first seed, with
stage-1 blocks shared through ``OUT/stage1/``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import xarray as xr

from analyses import phases as phasing
from analyses.similarity import layer_similarity
from dynamo.heads import resolve_head
from dynamo.partition import Partition, from_result
from dynamo.pipeline.summaries import format_value
from dynamo.serialize import jsonable
from dynamo.store import check_output, open_trajectories, positions_of, require_contents, save_result
from dynamo.surrogates.base import resolve_teacher, split_images
from dynamo.surrogates.raptor import PAPER_RECIPE, RaptorFitter, partition_baselines
from dynamo.surrogates.raptor.train import stopping_rule
from figures.output import save_figures
from figures.raptor import plot_r2_per_layer

__all__ = ["RECIPES", "default_partition", "fit", "parse_loss"]

RECIPES = {"paper": PAPER_RECIPE}
ACCURACY_KEYS = ("accuracy_head", "head_source", "accuracy_images", "accuracy_against", "accuracy_teacher",
                 "accuracy_surrogate", "accuracy_ratio", "agreement", "accuracy_note",
                 "probe_accuracy_teacher", "probe_accuracy_surrogate", "probe_accuracy_head")
LOSS_KINDS = ("cls", "register", "patch")  # the order of the a/b/c shorthand


def parse_loss(text: str):
    """A loss from the command line: ``paper``, ``mse``, ``a/b/c`` (cls/register/patch) or ``cls=a,register=b,patch=c[,dist=d]``."""
    text = text.strip()
    if text in ("paper", "mse"):
        return text
    try:
        if "=" in text:
            pairs = [part.split("=") for part in text.split(",")]
            return {name.strip(): float(value) for name, value in pairs}
        values = [float(part) for part in text.split("/")]
    except ValueError:
        values = None
    if values is None or len(values) != len(LOSS_KINDS):
        raise ValueError(f"cannot read the loss {text!r}: give paper, mse, cls/register/patch weights such as "
                         "0.45/0.10/0.45, or cls=0.45,register=0.1,patch=0.45")
    return dict(zip(LOSS_KINDS, values))


def default_partition(ds: xr.Dataset, k: int, phases: dict | None = None, progress: bool = False,
                      images=None, tokens: str | None = None) -> tuple[Partition, str]:
    """The phases Raptor is fitted on by default, and a sentence saying which rule gave them.

    The store's ``phases`` summary when it has k contiguous phases; else the recursive max-cut stopped at k when
    contiguous; else the exact contiguous split into k (`analyses.phases.contiguous_partition`). With ``images``
    (positions, a fit's training images) the phases are found on those alone.
    """
    if images is not None:
        ds, phases = ds.isel(image=np.asarray(images)), None
    if k == 1:
        return Partition.uniform(int(ds.attrs["num_blocks"]), 1), "one phase"
    if phases is not None and phases.get("thresholds") is not None and len(phases["partition"]) == k:
        return Partition(phases["partition"]), f"the store's phases ({phases.get('method', 'maxcut')})"
    if phases is not None and phases.get("out"):
        matrix = xr.open_zarr(phases["out"])["dissimilarity"].load()
    else:
        matrix = layer_similarity(ds, tokens=tokens, progress=progress)
    view = f" of {matrix.attrs.get('tokens', tokens)}"
    try:
        maxcut = Partition(phasing.maxcut_partition(matrix, k=k))
    except ValueError as error:
        why = str(error)
    else:
        if maxcut.is_contiguous:
            return maxcut, f"max-cut phases{view} (the paper's recursive max-cut, stopped at k)"
        why = f"the max-cut phases {maxcut} are not contiguous"
    return Partition(phasing.contiguous_partition(matrix, k)), f"exact contiguous split{view} into {k} phases ({why})"


def fit(
    store: str | Path,
    out: str | Path,
    *,
    k: int | list[int] | None = None,
    partition=None,
    phases: dict | None = None,
    baselines: int = 0,
    shuffled: int = 0,
    seeds: int = 1,
    recipe: str | None = None,
    head: str | Path | None = None,
    teacher=None,
    **params,
) -> dict:
    """Fit Raptor surrogates to a store, evaluate them on held-out images, save them with their figures.

    Returns the summary: ``recipe``, ``params``, per fit ``k``, ``seed``, ``partition``, R² per layer and token kind,
    accuracies, ``segments``; with several fits ``runs`` and ``by_k``; ``baselines``, the paths, ``text``.

    Parameters
    ----------
    k : int or list of int, optional
        Number of blocks, or several (default the partition's length, else 2).
    partition, phases : optional
        Phases in any form `Partition.parse` reads; default `default_partition` (of the ``phases`` summary if given).
    baselines, shuffled : int
        Also refit on the uniform partition, this many random contiguous ones and k = 1; and this many random
        shuffled partitions (the paper's Fig. 3). One k and one seed only.
    seeds : int
        Fits per k, with seeds ``seed .. seed + seeds - 1``, all on the held-out images of ``seed``.
    recipe : {"paper"}, optional
        Start from a named recipe (`RECIPES`); ``params`` given override it.
    **params
        `RaptorFitter` parameters; None values take the recipe's, else the fitter's defaults.
    """
    started = time.perf_counter()
    out = check_output(out, inputs=[store])
    ds = open_trajectories(store)
    require_contents(ds, "dynamo fit (Raptor: its rollout runs attention over every token from layer 0 and is scored "
                     "at every layer)")
    num_blocks = int(ds.attrs["num_blocks"])
    if recipe is not None and recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")
    params = {**RECIPES.get(recipe, {}), **{name: value for name, value in params.items() if value is not None}}
    seed = int(params.pop("seed", 0))
    ks = [k] if isinstance(k, int) or k is None else list(k)
    if partition is not None:
        partition = Partition.parse(partition, num_blocks)
        if ks not in ([None], [len(partition)]):
            raise ValueError(f"--k {','.join(map(str, ks))} but the partition {partition} has {len(partition)} phases; give one or the other")
        ks = [len(partition)]
    ks = [kk or 2 for kk in ks]
    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    if (baselines or shuffled) and (len(ks) > 1 or seeds > 1):
        raise ValueError("--baselines and --shuffled refit one fit's recipe: use them with one --k and --seeds 1")
    teacher = resolve_teacher(ds.attrs, teacher)
    linear_head = resolve_head(ds, teacher, head, seed=seed)
    single = len(ks) == 1 and seeds == 1
    runs, fitters = [], {}
    training = split_images(ds["image"].values, params.get("validation_fraction", 0.2), seed)[0]
    for kk in ks:
        chosen, source = (partition, "given") if partition is not None else default_partition(
            ds, kk, phases, progress=params.get("progress", True), images=positions_of(ds, training))
        for s in range(seed, seed + seeds):
            folder = out if single else out / f"k{kk}-seed{s}"
            fitter = RaptorFitter(k=len(chosen), partition=chosen, checkpoint_dir=folder / "checkpoint",
                                  stage1_cache=out / "stage1", seed=s, split_seed=seed if seeds > 1 else None, **params)
            fitter.fit(ds, teacher=teacher, head=linear_head)
            runs.append({**_run(fitter, ds, store, folder, kk, s), "partition_source": source})
            fitters[(kk, s)] = fitter
    first = fitters[(ks[0], seed)]
    summary = {
        "store": str(store), "out": str(out), "recipe": recipe or "dynamo defaults",
        "params": {name: value for name, value in first.get_params().items()
                   if name not in ("k", "partition", "checkpoint_dir", "stage1_cache", "progress", "seed", "split_seed")},
        "stopping": stopping_rule(first),
        **({key: value for key, value in runs[0].items()} if single else {"runs": runs, "by_k": _by_k(runs)}),
    }
    if baselines or shuffled:
        table = partition_baselines(ds, first, random_seeds=baselines, shuffled_seeds=shuffled, teacher=teacher)
        summary["baselines"] = {
            str(name): {"partition": str(from_result(table.sel(fit=name))),
                        "r2_final": float(table["r2_final"].sel(fit=name)),
                        "accuracy_ratio": float(table["accuracy_ratio"].sel(fit=name))}
            for name in table["fit"].values
        }
    summary["seconds"] = round(time.perf_counter() - started, 2)
    summary = jsonable(summary)
    summary["text"] = _text(summary, ds.attrs.get("model"))
    return summary


def _run(fitter: RaptorFitter, ds: xr.Dataset, store, folder: Path, k: int, seed: int) -> dict:
    """Save one fit, evaluate it on its held-out images, draw its R² per layer; its summary."""
    fitter.save(folder)
    report = fitter.evaluate(ds).assign_attrs(analysis="raptor_evaluation", seed=seed)
    save_result(report, folder / "evaluation.zarr", inputs=[store])
    figure = save_figures({"r2_per_layer": plot_r2_per_layer(report)}, folder, formats=("png", "svg"))["r2_per_layer"]
    r2 = report["r2"]
    return {
        "k": k, "seed": seed, "out": str(folder), "partition": fitter.partition_,
        **{key: report.attrs[key] for key in ("images", "n_images", "r2_reference", "r2_final", *ACCURACY_KEYS)
           if key in report.attrs},
        "r2_per_layer": r2.sel(token_kind="all").values.round(4).tolist(),
        **{f"r2_per_layer_{kind}": r2.sel(token_kind=kind).values.round(4).tolist()
           for kind in r2["token_kind"].values.tolist() if kind != "all"},
        "segments": _segments(fitter),
        "figures": [str(figure)],
    }


def _segments(fitter: RaptorFitter) -> list[dict]:
    """Per training segment: steps trained, how it ended, its last held-out R²."""
    ended = {}
    for entry in fitter.history_:
        ended[(entry["stage"], entry["block"])] = entry
    return [
        {"stage": stage, "block": block if stage == 1 else None, "steps": entry["step"], "val_r2": round(entry["val_r2"], 5),
         "ended": "reused (stage-1 block kept)" if entry.get("reused") else entry.get("stop", "maximum steps")}
        for (stage, block), entry in ended.items()
    ]


def _by_k(runs: list[dict]) -> dict:
    """Mean and standard deviation over seeds (numpy's, ddof 0) of each k's numbers."""
    table = {}
    for k in dict.fromkeys(run["k"] for run in runs):
        group = [run for run in runs if run["k"] == k]
        layers = np.array([run["r2_per_layer"] for run in group])
        entry = {"seeds": [run["seed"] for run in group],
                 "r2_per_layer_mean": layers.mean(axis=0).round(4).tolist(),
                 "r2_per_layer_std": layers.std(axis=0).round(4).tolist()}
        for name in ("r2_final", "accuracy_ratio", "accuracy_surrogate"):
            values = [run[name] for run in group if name in run]
            if values:
                entry[f"{name}_mean"], entry[f"{name}_std"] = float(np.mean(values)), float(np.std(values))
        table[str(k)] = entry
    return table


def _text(summary: dict, model: str) -> str:
    params = summary["params"]
    lines = [
        f"Raptor on {summary['store']} ({model}); recipe: {summary['recipe']}",
        "  " + ", ".join(f"{name} {format_value(params[name])}" for name in (
            "steps", "stage2_steps", "step_budget", "batch_size", "lr", "weight_decay", "warmup", "min_lr", "tf_anneal",
            "tf_floor", "noise", "stage1_loss", "stage2_loss", "grad_clip", "mlp")),
        f"stopping: {summary['stopping']}",
    ]
    if params["warmup"] >= 1 and params["warmup"] >= params["steps"]:
        lines.append(f"note: the warmup ({int(params['warmup'])} steps) is not shorter than a segment ({params['steps']} "
                     "steps): the learning rate never reaches its peak; give --warmup as a fraction (e.g. 0.032, the paper's 10k/312.5k)")
    for run in summary.get("runs", [summary]):
        lines += _run_lines(run)
    for k, entry in summary.get("by_k", {}).items():
        if len(entry["seeds"]) > 1:
            lines.append(f"k={k}, seeds {entry['seeds']}: R² per layer mean ± std:")
            lines.append("  " + " ".join(f"{layer}:{m:.3f}±{s:.3f}" for layer, (m, s) in
                                         enumerate(zip(entry["r2_per_layer_mean"], entry["r2_per_layer_std"]))))
            lines.append(f"  r2_final {entry['r2_final_mean']:.4f} ± {entry['r2_final_std']:.4f}"
                         + (f", accuracy_ratio {entry['accuracy_ratio_mean']:.4f} ± {entry['accuracy_ratio_std']:.4f}"
                            if "accuracy_ratio_mean" in entry else ""))
    for name, baseline in summary.get("baselines", {}).items():
        lines.append(f"  baseline {name:<10} r2_final {format_value(baseline['r2_final'])}  accuracy_ratio "
                     f"{format_value(baseline['accuracy_ratio'])}  {baseline['partition']}")
    lines.append(f"saved to {summary['out']} in {summary['seconds']} s")
    return "\n".join(lines)


def _run_lines(run: dict) -> list[str]:
    lines = [
        f"k={run['k']} seed {run['seed']}: phases {Partition(run['partition'])} ({run['partition_source']})",
        "  segments: " + "; ".join(f"stage {s['stage']}" + (f" block {s['block']}" if s["block"] else "")
                                    + f" {s['steps']} steps ({s['ended']}, held-out R² {s['val_r2']:.4f})"
                                    for s in run["segments"]),
        f"  evaluated on {run['n_images']} {run['images']}; R² ({run['r2_reference']} variance) per layer:",
        "  " + " ".join(f"{layer}:{value:.3f}" for layer, value in enumerate(run["r2_per_layer"])),
        f"  r2_final {format_value(run['r2_final'])}",
    ]
    if "accuracy_ratio" in run:
        lines.append(f"  accuracy_ratio {format_value(run['accuracy_ratio'])} (surrogate "
                     f"{format_value(run['accuracy_surrogate'])} / teacher {format_value(run['accuracy_teacher'])} on "
                     f"{run['accuracy_images']} images, {run['accuracy_head']} head: {run['head_source']}), "
                     f"agreement {format_value(run['agreement'])}")
    if "accuracy_note" in run:
        lines.append(f"  {run['accuracy_note']}")
    return lines
