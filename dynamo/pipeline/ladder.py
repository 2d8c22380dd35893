"""``dynamo ladder`` and ``dynamo fit --surrogate``: every rung of the ladder of surrogates and Raptor on one store, side by side.

Every rung shares one partition per k, the training and held-out images and the head; each gets ε and a loop count.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import xarray as xr

from dynamo.heads import resolve_head
from dynamo.layout import TOKEN_KINDS, default_tokens
from dynamo.partition import Partition
from dynamo.pipeline.fit import ACCURACY_KEYS, default_partition
from dynamo.pipeline.summaries import format_value
from dynamo.serialize import jsonable
from dynamo.store import check_output, open_trajectories, positions_of, require_contents, save_result, writer_lock
from dynamo.surrogates import SURROGATES, LinearFitter, RaptorFitter, epsilon, loop_count, per_layer, transition_moments
from dynamo.surrogates.base import resolve_teacher, split_images
from dynamo.surrogates.measures import DEPTH_SIGNALS
from dynamo.surrogates.raptor.block import teacher_mlp
from figures.ladder import plot_ladder, plot_ladder_layers, plot_loop_count
from figures.output import save_figures
from figures.raptor import plot_r2_per_layer
from figures.report import Section, write_report

__all__ = ["CEILING", "RUNGS", "fit_surrogate", "ladder", "ladder_section"]

RUNGS = ("identity", "linear", "dmd", "teacher-block", "raptor")
RAPTOR_INITS = ("random", "teacher-block")
CEILING = "linear-per-layer"  # the non-recurrent linear variant: one map per layer, the same for every k
LOOP_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
IN_MEMORY_BYTES = 1 << 30  # held-out states up to this size are read once and kept for all the scoring


def fit_surrogate(store: str | Path, out: str | Path, surrogate: str, *, k: int | None = None, partition=None,
                  head: str | Path | None = None, seed: int = 0, device: str = "cpu", progress: bool = True,
                  n_bootstrap: int = 1000) -> dict:
    """Fit one closed-form or teacher-block rung to a store (``dynamo fit --surrogate``); Raptor is `dynamo.pipeline.fit.fit`.

    Writes ``config.json``, ``weights.safetensors``, ``evaluation.zarr``, ``epsilon.zarr``, ``r2_per_layer.png`` to
    ``out``; ``k``, ``partition``, ``head`` as `dynamo.pipeline.fit.fit`; ``n_bootstrap`` resamples for ε's intervals.
    Returns the summary: R² per layer and token kind, accuracies, ε with intervals, the fitted choice, ``text``.
    """
    if surrogate not in SURROGATES or surrogate == "raptor":
        raise ValueError(f"unknown surrogate {surrogate!r} here; choose one of {', '.join(s for s in SURROGATES if s != 'raptor')}")
    started = time.perf_counter()
    out = check_output(out, inputs=[store])
    ds = open_trajectories(store)
    require_contents(ds, f"dynamo fit --surrogate {surrogate} (a surrogate is scored layer by layer from layer 0, and through "
                     "the teacher's head on every token)")
    num_blocks = int(ds.attrs["num_blocks"])
    if partition is not None:
        partition, source = Partition.parse(partition, num_blocks), "given"
        if k is not None and k != len(partition):
            raise ValueError(f"--k {k} but the partition {partition} has {len(partition)} phases; give one or the other")
    else:
        training = split_images(ds["image"].values, 0.2, seed)[0]
        partition, source = default_partition(ds, k or 2, images=positions_of(ds, training))
    teacher = resolve_teacher(ds.attrs, None)
    fitter = SURROGATES[surrogate](partition=partition, seed=seed, device=device, **_progress(surrogate, progress))
    fitter.fit(ds, teacher=teacher, head=resolve_head(ds, teacher, head, seed=seed))
    fitter.save(out)
    report = fitter.evaluate(ds).assign_attrs(analysis="surrogate_evaluation")
    save_result(report, out / "evaluation.zarr", inputs=[store])
    errors = epsilon(fitter.model_, ds, fitter.held_out_positions(ds)[0], n_bootstrap=n_bootstrap, seed=seed)
    save_result(errors.assign_attrs(analysis="surrogate_epsilon"), out / "epsilon.zarr", inputs=[store])
    figure = plot_r2_per_layer(report)
    figure.axes[0].set_title(f"{report.attrs['model']}: {surrogate} k = {len(partition)}, R² per layer", fontsize=9)
    path = save_figures({"r2_per_layer": figure}, out, formats=("png", "svg"))["r2_per_layer"]
    r2 = report["r2"]
    summary = {
        "store": str(store), "out": str(out), "surrogate": surrogate, "k": len(partition), "partition": partition,
        "partition_source": source,
        **{key: report.attrs[key] for key in ("images", "n_images", "r2_reference", "r2_final", *ACCURACY_KEYS)
           if key in report.attrs},
        "r2_per_layer": r2.sel(token_kind="all").values.round(4).tolist(),
        **{f"r2_per_layer_{kind}": r2.sel(token_kind=kind).values.round(4).tolist()
           for kind in r2["token_kind"].values.tolist() if kind != "all"},
        **_epsilon_numbers(errors),
        **_choice(fitter),
        "figures": [str(path)],
        "seconds": round(time.perf_counter() - started, 2),
    }
    summary = jsonable(summary)
    summary["text"] = "\n".join([
        f"{surrogate} k={summary['k']} on {store} ({report.attrs['model']}), phases {partition} ({source})"
        + "".join(f", {key} {format_value(value)}" for key, value in _choice(fitter).items()),
        f"evaluated on {summary['n_images']} {summary['images']}; R² per layer:",
        "  " + " ".join(f"{layer}:{value:.3f}" for layer, value in enumerate(summary["r2_per_layer"])),
        f"r2_final {format_value(summary['r2_final'])}" + (
            f"  accuracy_ratio {format_value(summary['accuracy_ratio'])}  agreement {format_value(summary['agreement'])}"
            if "accuracy_ratio" in summary else ""),
        _epsilon_text(summary),
        f"saved to {out} in {summary['seconds']} s",
    ])
    return summary


def ladder(
    store: str | Path,
    out: str | Path,
    *,
    ks=(1, 2, 3, 4),
    surrogates=(*RUNGS, CEILING),
    loop_scales=LOOP_SCALES,
    head: str | Path | None = None,
    n_bootstrap: int = 1000,
    raptor_init: str = "random",
    tokens: str | None = None,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    command: str | None = None,
    **raptor_params,
) -> dict:
    """Fit every rung of the ladder for every k on one store and compare them (``dynamo ladder``).

    Writes ``ladder.zarr``, ``.csv``, ``.json``, ``.png``, ``ladder_layers.png``, ``loop_count.png``, ``ladder.html``
    and ``raptor-k<K>/`` (each Raptor fit, which a re-run resumes or reuses) to ``out``; returns ``table``,
    ``partitions``, the paths, ``seconds`` and ``text``.

    Parameters
    ----------
    ks : sequence of int
        Numbers of phases; each k's partition is `dynamo fit`'s default, shared by every rung.
    surrogates : sequence of str
        Rungs among `RUNGS` and `CEILING`.
    loop_scales : sequence of float
        Loop-count scales (each phase's block run ``round(scale * n_j)`` times), with every depth signal of
        `dynamo.surrogates.measures.DEPTH_SIGNALS`.
    raptor_init : {"random", "teacher-block"}
        Raptor's blocks start at random (the paper's) or from the ``teacher-block`` rung's choice for the same k.
    tokens : str, optional
        Token view of the dissimilarity the partitions are cut on (`dynamo.layout.default_tokens`).
    **raptor_params
        `RaptorFitter` parameters (``steps``, ``stage2_steps``, ``batch_size``, ``lr``, ``mlp``); None takes its defaults.
    """
    started = time.perf_counter()
    if raptor_init not in RAPTOR_INITS:
        raise ValueError(f"raptor_init must be one of {', '.join(RAPTOR_INITS)}, got {raptor_init!r}")
    unknown = set(surrogates) - {*RUNGS, CEILING}
    if unknown:
        raise ValueError(f"unknown surrogates {sorted(unknown)}; choose among {', '.join((*RUNGS, CEILING))}")
    out = check_output(out, inputs=[store])
    out.parent.mkdir(parents=True, exist_ok=True)
    with writer_lock(out):  # one ladder per out: a second would train the same rungs into the same files
        ds = open_trajectories(store)
        names = [name for name in (*RUNGS, CEILING) if name in surrogates]
        require_contents(ds, f"the ladder's rungs {', '.join(names)} (each is scored layer by layer from layer 0, and through "
                         "the teacher's head on every token)")
        out.mkdir(parents=True, exist_ok=True)
        num_blocks = int(ds.attrs["num_blocks"])
        ks = [int(k) for k in ks]
        if any(not 1 <= k <= num_blocks for k in ks):
            raise ValueError(f"--k values must be between 1 and the {num_blocks} blocks of {ds.attrs.get('model')}, got {ks}")
        teacher = resolve_teacher(ds.attrs, None)
        linear_head = resolve_head(ds, teacher, head, seed=seed)
        tokens = default_tokens(ds, tokens)
        training, held_out = split_images(ds["image"].values, 0.2, seed)
        chosen = {k: default_partition(ds, k, images=positions_of(ds, training), tokens=tokens)
                  for k in ks}
        partitions, sources = {k: chosen[k][0] for k in ks}, {k: chosen[k][1] for k in ks}
        scoring = ds.isel(image=positions_of(ds, held_out))
        if scoring["hidden"].nbytes <= IN_MEMORY_BYTES:
            scoring = scoring.load()
        training_positions = positions_of(ds, training)
        moments, moment_seconds = _timed(lambda: transition_moments(ds, training_positions, device=device, progress=progress)) \
            if {"linear", "dmd", CEILING} & set(surrogates) else (None, None)
        rows, reports = [], {}
        names = [name for name in (*RUNGS, CEILING) if name in surrogates]
        jobs = [(name, k) for name in names if name != CEILING for k in ks] + ([(CEILING, None)] if CEILING in names else [])
        starts = {}  # k -> the teacher-block rung's blocks, Raptor's starting point when raptor_init is teacher-block
        for name, k in jobs:
            params = raptor_params
            if name == "raptor" and raptor_init == "teacher-block":
                if k not in starts:
                    starts[k] = _fit_rung("teacher-block", k, partitions, ds, teacher, linear_head, moments, out, seed,
                                          device, progress, raptor_params).blocks_
                params = {**teacher_mlp(teacher.module.blocks[0]), **_given(raptor_params), "init": starts[k]}
            fitter, seconds = _timed(_fit_rung, name, k, partitions, ds, teacher, linear_head, moments, out, seed, device,
                                     progress, params)
            if name == "teacher-block":
                starts[k] = fitter.blocks_
            report = fitter.evaluate(scoring)
            errors = epsilon(fitter.model_, scoring, n_bootstrap=n_bootstrap, seed=seed)
            loops = None if name in ("identity", CEILING) else xr.concat(
                [loop_count(fitter.model_, scoring, loop_scales, depth_signal=signal) for signal in DEPTH_SIGNALS],
                dim=xr.DataArray(list(DEPTH_SIGNALS), dims="depth_signal"), combine_attrs="drop_conflicts")
            for key in ks if k is None else [k]:
                reports[name, key] = (report, errors, loops)
                rows.append(_row(name, key, partitions[key] if k is not None else fitter.partition_, report, errors, seconds, fitter))
        result = _result(ds, reports, names, ks, partitions, loop_scales)
        save_result(result, out / "ladder.zarr", inputs=[store])
        paths = _write_table(rows, out)
        figures = {"ladder": plot_ladder(result), "ladder_layers": plot_ladder_layers(result)}
        if "raptor" in names:
            figures["loop_count"] = plot_loop_count(result, "raptor")
        paths.update({name: str(path) for name, path in save_figures(figures, out).items()})
        seconds = round(time.perf_counter() - started, 2)
        summary = jsonable({"store": str(store), "out": str(out), "model": ds.attrs.get("model"), "ks": ks, "tokens": tokens,
                            "partitions": {str(k): partitions[k] for k in ks},
                            "partition_sources": {str(k): sources[k] for k in ks}, "n_images": int(scoring.sizes["image"]),
                            "accuracy_teacher": result.attrs.get("accuracy_teacher"), "table": rows,
                            "moments_seconds": None if moments is None else {key: round(value, 2) for key, value in moment_seconds.items()},
                            "files": paths, "seconds": seconds})
        section = ladder_section(summary)
        paths["html"] = str(write_report(out / "ladder.html", f"{summary['model']}: a ladder of surrogates",
                                         f"{summary['n_images']} held-out images; k = {', '.join(map(str, ks))}; {seconds:.0f} s.",
                                         [section], _provenance(ds, store, command)))
        summary["files"] = paths
        summary["text"] = _text(summary)
        return summary


def _progress(name: str, progress: bool) -> dict:
    return {} if name == "identity" else {"progress": progress}


def _timed(work, *args):
    """``(work(*args), {"wall": s, "cpu": s})``: wall-clock and CPU seconds (this process and finished children)."""
    wall, before = time.perf_counter(), os.times()
    value = work(*args)
    after = os.times()
    cpu = sum(after[:4]) - sum(before[:4])
    return value, {"wall": time.perf_counter() - wall, "cpu": cpu}


def _fit_rung(name, k, partitions, ds, teacher, head, moments, out: Path, seed, device, progress, raptor_params):
    if name == "raptor":
        fitter = RaptorFitter(partition=partitions[k], seed=seed, device=device, progress=progress,
                              checkpoint_dir=out / f"raptor-k{k}" / "checkpoint", stage1_cache=out / "stage1",
                              **_given(raptor_params))
        fitter.fit(ds, teacher=teacher, head=head)
        fitter.save(out / f"raptor-k{k}")
        return fitter
    partition = per_layer(int(ds.attrs["num_blocks"])) if name == CEILING else partitions[k]
    fitter = (LinearFitter if name == CEILING else SURROGATES[name])(partition=partition, seed=seed, device=device,
                                                                       **_progress(name, progress))
    data = {"moments": moments} if name in ("linear", "dmd", CEILING) else {}
    return fitter.fit(ds, teacher=teacher, head=head, **data)


def _given(params: dict) -> dict:
    """The parameters set (not None)."""
    return {key: value for key, value in params.items() if value is not None}


def _row(name, k, partition, report: xr.Dataset, errors: xr.Dataset, seconds: dict, fitter) -> dict:
    r2 = report["r2"]
    row = {"surrogate": name, "k": k, "partition": str(partition), "r2_final": report.attrs["r2_final"]}
    row.update({f"r2_final_{kind}": float(r2.sel(token_kind=kind)[-1]) for kind in r2["token_kind"].values.tolist()
                if kind != "all"})
    row["r2_stacked"] = float(report["r2_stacked"].sel(token_kind="all"))
    row.update({key: report.attrs[key] for key in ("accuracy_surrogate", "accuracy_ratio", "agreement",
                                                    "probe_accuracy_surrogate") if key in report.attrs})
    row.update(_epsilon_numbers(errors))
    row.update({"fit_seconds": round(seconds["wall"], 2), "fit_cpu_seconds": round(seconds["cpu"], 2)})
    row.update({key: format_value(value) for key, value in _choice(fitter).items()})
    return jsonable({key: round(value, 4) if isinstance(value, float) else value for key, value in row.items()})


EPSILON_COLUMNS = ("epsilon", "epsilon_strict", "epsilon_mean", "epsilon_identity", "skill", "skill_strict")
EPSILON_KIND_COLUMNS = ("epsilon", "epsilon_strict", "skill")


def _epsilon_numbers(errors: xr.Dataset) -> dict:
    """The ε columns of a row: `EPSILON_COLUMNS` (all tokens) with intervals, `EPSILON_KIND_COLUMNS` per token kind."""
    numbers = {f"{name}{end}": float(errors[f"{name}{end}"].sel(token_kind="all"))
               for name in EPSILON_COLUMNS for end in ("", "_low", "_high")}
    numbers["epsilon_layer"] = int(errors["epsilon_layer"].sel(token_kind="all"))
    numbers.update({f"{name}_{kind}": float(errors[name].sel(token_kind=kind)) for name in EPSILON_KIND_COLUMNS
                    for kind in errors["token_kind"].values.tolist() if kind != "all"})
    return numbers


def _epsilon_text(row: dict) -> str:
    """ε, its stricter variant, the skill over the identity and ε per token kind, in one line."""
    return (f"epsilon {_interval_text(row, 'epsilon')} (layer {row['epsilon_layer']})  epsilon_strict "
            f"{_interval_text(row, 'epsilon_strict')}  identity {format_value(row['epsilon_identity'])}  skill "
            f"{_interval_text(row, 'skill')}" + "".join(f"  {kind} {format_value(row[f'epsilon_{kind}'])}" for kind in _kinds(row)))


def _kinds(row: dict) -> list[str]:
    """The token kinds a row has ε for."""
    return [kind for kind in TOKEN_KINDS if f"epsilon_{kind}" in row]


def _choice(fitter) -> dict:
    """What a rung chose while fitting: the teacher's blocks, the ridge penalties, the DMD ranks, Raptor's start."""
    return {label: getattr(fitter, attr) for attr, label in (("blocks_", "blocks"), ("alpha_", "alpha"), ("rank_", "rank"),
                                                             ("init", "init"))
            if getattr(fitter, attr, None) is not None}


def _result(ds, reports: dict, names: list, ks: list, partitions: dict, scales) -> xr.Dataset:
    """One Dataset over (surrogate, k, layer, token_kind, scale) from every rung's evaluation, ε and loop count."""
    first, first_errors = next(iter(reports.values()))[:2]
    layers, kinds = first["layer"].values, first["token_kind"].values.tolist()
    shape = (len(names), len(ks))

    def grid(read, extra=()):
        values = np.full(shape + tuple(extra), np.nan)
        for (name, k), entry in reports.items():
            value = read(*entry)
            if value is not None:
                values[names.index(name), ks.index(k)] = value
        return values

    epsilon_names = [name for name in first_errors.data_vars if name.startswith(("epsilon", "skill"))]

    def attr(key):
        return lambda report, errors, loops: report.attrs.get(key, np.nan)

    def loop(key):
        return lambda report, errors, loops: None if loops is None or key not in loops else loops[key].values

    result = xr.Dataset(
        {
            "r2": (("surrogate", "k", "layer", "token_kind"),
                   grid(lambda report, errors, loops: report["r2"].values, (len(layers), len(kinds)))),
            "relative_error": (("surrogate", "k", "block"),
                               grid(lambda report, errors, loops: errors["relative_error_mean"].sel(token_kind="all").values,
                                    (len(layers) - 1,))),
            **{key: (("surrogate", "k"), grid(attr(key))) for key in
               ("r2_final", "accuracy_surrogate", "accuracy_ratio", "agreement", "probe_accuracy_surrogate")},
            **{key: (("surrogate", "k", "token_kind"),
                     grid(lambda report, errors, loops, key=key: errors[key].sel(token_kind=kinds).values, (len(kinds),)))
               for key in epsilon_names},
            **{f"loop_{key}": (("surrogate", "k", "depth_signal", "scale"), grid(loop(key), (len(DEPTH_SIGNALS), len(scales))))
               for key in ("r2_final", "accuracy_ratio", "agreement")},
        },
        coords={
            "surrogate": names, "k": ks, "layer": layers, "token_kind": kinds, "block": layers[1:],
            "scale": np.asarray(scales, dtype=float), "depth_signal": list(DEPTH_SIGNALS),
            "phase": (("k", "layer"), np.stack([partitions[k].phase_of(layers) for k in ks])),
            "partition": ("k", [str(partitions[k]) for k in ks]),
        },
        attrs={"analysis": "surrogate_ladder", "model": ds.attrs.get("model"), "n_images": first.attrs["n_images"],
               "r2_reference": first.attrs["r2_reference"], "ceiling": CEILING,
               **{key: first.attrs[key] for key in ("accuracy_teacher", "accuracy_against", "accuracy_head",
                                                    "head_source", "probe_accuracy_teacher") if key in first.attrs},
               "epsilon_description": first_errors.attrs["description"],
               **{f"depth_signal_{name}": rule for name, rule in DEPTH_SIGNALS.items()},
               "description": "every rung fitted on the same partitions and training images, scored on the same "
                              "held-out images: R² (teacher variance) per layer, accuracy through the teacher's head, "
                              "ε per token kind with its skill over the identity (epsilon_description), and the loop "
                              "count with each depth signal (depth_signal_*)"},
    )
    return result


def _write_table(rows: list[dict], out: Path) -> dict:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(out / "ladder.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(rows)
    (out / "ladder.json").write_text(json.dumps(rows, indent=1, allow_nan=False))
    return {"csv": str(out / "ladder.csv"), "json": str(out / "ladder.json")}


def _interval_text(row: dict, key: str) -> str:
    return f"{format_value(row[key])} [{format_value(row[f'{key}_low'])}, {format_value(row[f'{key}_high'])}]"


def ladder_section(summary: dict) -> Section:
    """The report section of a ladder (`ladder`'s summary): text, the table, the figures."""
    files = summary["files"]
    numbers = {
        f"{row['surrogate']} k={row['k']}": {
            "R² last layer": format_value(row["r2_final"]),
            "accuracy ratio": format_value(row.get("accuracy_ratio")),
            "agreement": format_value(row.get("agreement")),
            "ε [95%]": _interval_text(row, "epsilon"),
            "ε strict [95%]": _interval_text(row, "epsilon_strict"),
            "skill over identity [95%]": _interval_text(row, "skill"),
            "ε per token kind": " / ".join(f"{kind} {format_value(row[f'epsilon_{kind}'])}" for kind in _kinds(row)),
            "skill per token kind": " / ".join(f"{kind} {format_value(row[f'skill_{kind}'])}" for kind in _kinds(row)),
            "fit s (cpu s)": f"{row['fit_seconds']:.1f} ({row['fit_cpu_seconds']:.1f})",
            "chosen": "; ".join(f"{key} {row[key]}" for key in ("blocks", "alpha", "rank") if key in row),
        }
        for row in summary["table"]
    }
    figures = [(files["ladder"], "Top: final-layer R², accuracy ratio (surrogate over teacher, teacher's head), ε "
                                 "(the ε-BRH's: max over layers of the mean over held-out images of the relative "
                                 "Frobenius error; dotted: the stricter mean over images of each image's max over "
                                 "layers) and its skill over the identity x_l = x_0 (1 − ε / ε of the identity), "
                                 "against k, one line per surrogate, 95% bootstrap intervals over images. Bottom: ε "
                                 "of each token kind's rows alone."),
               (files["ladder_layers"], "R² of each surrogate's rollout from layer 0 at every layer, one panel per k, "
                                        "phase boundaries dotted.")]
    if "loop_count" in files:
        figures.append((files["loop_count"], "Raptor run with each phase's block repeated scale x its phase's length: "
                                             "final-layer R² and accuracy ratio against the scale. Solid: each step "
                                             "takes the depth signal of a layer of its phase (only values seen in "
                                             "training); dashed: evenly spaced signals, unseen at non-integer "
                                             "multiples, which confound what the scale alone does."))
    return Section(
        "A ladder of surrogates",
        "Each rung replaces the blocks of every phase by one map applied once per layer: identity (nothing), "
        "linear (a token-wise ridge map per phase, applied recurrently), dmd (exact DMD per phase with a constant "
        "observable), teacher-block (one of the teacher's own blocks per phase, chosen by R² on training images), "
        "raptor (trained shared blocks with a depth signal); linear-per-layer is the non-recurrent linear variant, "
        "one map per layer, the same for every k. All are fitted on the same partitions and training images and "
        f"scored on the same {summary['n_images']} held-out images; the teacher's own accuracy there is "
        f"{format_value(summary.get('accuracy_teacher'))}. ε is the ε-BRH's bound, the largest over layers of the "
        "expected relative Frobenius error; being relative to the uncentred norm it is small wherever the states "
        "hardly move, so each ε comes with its skill over the identity on the same images (1: exact; 0: no better "
        "than not moving at all; NaN where the identity is itself exact).",
        figures,
        numbers,
    )


def _provenance(ds, store, command) -> dict:
    attrs = ds.attrs
    return {key: format_value(value) if not isinstance(value, str) else value for key, value in {
        "store": str(store), "model": attrs.get("model"), "weights_sha256": attrs.get("weights_sha256"),
        "n_images": int(ds.sizes["image"]), "versions": json.dumps(attrs.get("versions")),
        "command": command or " ".join(sys.argv),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }.items()}


def _text(summary: dict) -> str:
    kinds = _kinds(summary["table"][0]) if summary["table"] else []
    header = (f"{'surrogate':<17} {'k':>2}  {'R² last':>8}  {'acc ratio':>9}  {'agree':>6}  {'ε [95%]':>24}  "
              f"{'ε strict':>8}  {'skill [95%]':>24}  " + "".join(f"{'ε ' + kind:>10}  " for kind in kinds)
              + f"{'fit s':>6}  {'cpu s':>6}")
    lines = [f"ladder of surrogates on {summary['store']} ({summary['model']}), {summary['n_images']} held-out images",
             *(f"  k={k}: {format_value(p)} ({summary['partition_sources'][k]})" for k, p in summary["partitions"].items()),
             header]
    for row in summary["table"]:
        lines.append(f"{row['surrogate']:<17} {row['k']:>2}  {row['r2_final']:>8.3f}  {row.get('accuracy_ratio', float('nan')):>9.3f}  "
                     f"{row.get('agreement', float('nan')):>6.3f}  {_interval_text(row, 'epsilon'):>24}  "
                     f"{format_value(row['epsilon_strict']):>8}  {_interval_text(row, 'skill'):>24}  "
                     + "".join(f"{format_value(row[f'epsilon_{kind}']):>10}  " for kind in kinds)
                     + f"{row['fit_seconds']:>6.1f}  {row['fit_cpu_seconds']:>6.1f}")
    if summary["moments_seconds"] is not None:
        lines.append(f"the one pass over the store's training images that the linear and dmd fits share took "
                     f"{summary['moments_seconds']['wall']:.1f} s ({summary['moments_seconds']['cpu']:.1f} s of CPU), "
                     "not counted in their fit s")
    lines.append("ε: max over layers of the mean over images of ||X^ - X||_F / ||X||_F (the ε-BRH's); ε strict: mean "
                 "over images of each image's max over layers; skill: 1 - ε / ε of the identity x_l = x_0 on the same "
                 "images; ε per token kind: that kind's rows alone")
    lines.append(f"written to {summary['out']} (ladder.html, ladder.csv, ladder.png, ...) in {summary['seconds']} s")
    return "\n".join(lines)
