"""``dynamo fit`` and the Raptor stage of ``dynamo profile``: fit, evaluate, compare with baselines, save."""

from __future__ import annotations

import time
from pathlib import Path

import xarray as xr

from analyses import phases as phasing
from dynamo.partition import Partition, from_result
from dynamo.pipeline.summaries import format_value
from dynamo.raptor import RaptorFitter, partition_baselines
from dynamo.store import check_output, jsonable, open_trajectories, save_result
from figures.output import save_figures
from figures.raptor import plot_r2_per_layer

__all__ = ["default_partition", "fit"]

ACCURACY_KEYS = ("accuracy_teacher", "accuracy_surrogate", "accuracy_ratio", "agreement",
                 "probe_accuracy_teacher", "probe_accuracy_surrogate")


def default_partition(ds: xr.Dataset, k: int, phases: dict | None = None) -> Partition:
    """The phases Raptor is fitted on by default: the store's own, as k contiguous phases.

    The found phases (``phases``, a summary of `dynamo.pipeline.phases.phases`) when they are k
    contiguous runs; otherwise the exact contiguous split into k phases of the store's layer
    dissimilarity (`analyses.phases.find_phases` with ``method="contiguous"``).
    """
    if phases is not None and phases.get("thresholds") is not None and len(phases["partition"]) == k:
        return Partition(phases["partition"])
    if phases is not None and phases.get("out"):
        return Partition(phasing.contiguous_partition(xr.open_zarr(phases["out"])["dissimilarity"].load(), k))
    return Partition(phasing.find_phases(ds, method="contiguous", k=k))


def fit(
    store: str | Path,
    out: str | Path,
    *,
    k: int | None = None,
    partition=None,
    phases: dict | None = None,
    baselines: int = 0,
    **params,
) -> dict:
    """Fit a Raptor surrogate to a store, evaluate it on held-out images, save it with its figure.

    Parameters
    ----------
    store : str or Path
        A trajectory store.
    out : str or Path
        Output folder: ``weights.safetensors``, ``config.json``, ``checkpoint/``,
        ``evaluation.zarr``, ``r2_per_layer.png``.
    k : int, optional
        Number of blocks (default the partition's length, else 2).
    partition : optional
        Phases or thresholds in any form `dynamo.partition.Partition.parse` reads; default
        `default_partition`.
    phases : dict, optional
        The store's phases summary, to take the default partition from.
    baselines : int
        Also refit the recipe on the uniform partition, this many random contiguous ones and
        k = 1 (`dynamo.raptor.partition_baselines`); 0 for none.
    **params
        `dynamo.raptor.RaptorFitter` parameters (``steps``, ``lr``, ``seed``, ``device``, ...);
        None values take the fitter's defaults.

    Returns
    -------
    dict
        ``k``, ``partition``, R² per layer and token kind, ``r2_final``, accuracies where the
        store has labels, ``baselines``, the paths written, ``seconds`` and ``text``.
    """
    started = time.perf_counter()
    out = check_output(out, inputs=[store])
    ds = open_trajectories(store)
    num_blocks = int(ds.attrs["num_blocks"])
    if partition is not None:
        partition = Partition.parse(partition, num_blocks)
    else:
        partition = default_partition(ds, k or 2, phases)
    fitter = RaptorFitter(k=len(partition), partition=partition, checkpoint_dir=out / "checkpoint",
                          **{name: value for name, value in params.items() if value is not None})
    fitter.fit(ds)
    fitter.save(out)
    report = fitter.evaluate(ds).assign_attrs(analysis="raptor_evaluation")
    save_result(report, out / "evaluation.zarr", inputs=[store])
    figure = save_figures({"r2_per_layer": plot_r2_per_layer(report)}, out, formats=("png", "svg"))["r2_per_layer"]
    r2 = report["r2"]
    summary = {
        "store": str(store), "out": str(out), "k": len(partition), "partition": partition,
        **{key: report.attrs[key] for key in ("images", "n_images", "r2_reference", "r2_final", *ACCURACY_KEYS)
           if key in report.attrs},
        "r2_per_layer": r2.sel(token_kind="all").values.round(4).tolist(),
        **{f"r2_per_layer_{kind}": r2.sel(token_kind=kind).values.round(4).tolist()
           for kind in r2["token_kind"].values.tolist() if kind != "all"},
        "figures": [str(figure)],
    }
    if baselines:
        table = partition_baselines(ds, fitter, random_seeds=baselines)
        summary["baselines"] = {
            str(name): {"partition": str(from_result(table.sel(fit=name))),
                        "r2_final": float(table["r2_final"].sel(fit=name)),
                        "accuracy_ratio": float(table["accuracy_ratio"].sel(fit=name))}
            for name in table["fit"].values
        }
    summary["seconds"] = round(time.perf_counter() - started, 2)
    summary = jsonable(summary)
    summary["text"] = _text(summary, report)
    return summary


def _text(summary: dict, report: xr.Dataset) -> str:
    lines = [
        f"Raptor k={summary['k']} on {summary['store']} ({report.attrs['model']}), phases {Partition(summary['partition'])}",
        f"evaluated on {summary['n_images']} {summary['images']}; R² ({summary['r2_reference']} variance) per layer:",
        "  " + " ".join(f"{layer}:{value:.3f}" for layer, value in enumerate(summary["r2_per_layer"])),
        f"r2_final {format_value(summary['r2_final'])}",
    ]
    if "accuracy_ratio" in summary:
        lines.append(f"accuracy_ratio {format_value(summary['accuracy_ratio'])} (surrogate "
                     f"{format_value(summary['accuracy_surrogate'])} / teacher {format_value(summary['accuracy_teacher'])}), "
                     f"agreement {format_value(summary['agreement'])}")
    for name, baseline in summary.get("baselines", {}).items():
        lines.append(f"  baseline {name:<10} r2_final {format_value(baseline['r2_final'])}  accuracy_ratio "
                     f"{format_value(baseline['accuracy_ratio'])}  {baseline['partition']}")
    lines.append(f"saved to {summary['out']} in {summary['seconds']} s")
    return "\n".join(lines)
