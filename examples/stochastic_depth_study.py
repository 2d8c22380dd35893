"""Stochastic depth, phase structure and Raptor: the paper's small-scale study, on dynamo's zoo.

The paper's small-scale section claims that training and stochastic depth promote block-recurrent
structure, and that phase-structure metrics predict how well Raptor fits. This script reruns
that experiment offline on the zoo's stochastic-depth family (``dynamo-zoo/vit-digits-p0.0`` ...
``-p0.5``: same architecture and recipe, drop-path rate 0 to 0.5) plus an untrained model of the
same architecture (seeded random init), on the 360 bundled held-out digits:

1. record each model's trajectories (`dynamo.record`; an interrupted recording resumes);
2. the layer dissimilarity, its max-cut phases and their scores (`analyses.phases.phase_analysis`),
   and for each k the partition Raptor is fitted on: the max-cut with k phases, or the exact
   contiguous split into k phases (`analyses.phases.contiguous_partition`) where the max-cut is
   not k contiguous phases, and its scores (`analyses.phases.phase_scores`);
3. Raptor with k = 1 and each k (`dynamo.raptor.RaptorFitter`, checkpointed and saved, so a
   re-run reuses them), and the same recipe on the uniform and random contiguous partitions
   (`dynamo.raptor.partition_baselines`, cached per model and k); R² per layer (cls and patch
   tokens) and accuracy ratio on each fit's held-out images;
4. one xarray Dataset with a ``model`` dimension (``OUT/study.zarr``, variables as `study_model`),
   the numbers and Spearman rank correlations of each phase-structure score with Raptor's
   final-layer R² (``OUT/study.json``),
   and the paper's figure kinds (``OUT/*.png``, drawn by `figures.study`).

Usage::

    OMP_NUM_THREADS=1 python examples/stochastic_depth_study.py --out sd-study      # full study
    python examples/stochastic_depth_study.py --out /tmp/sd-fast --fast             # smoke run

A full default run (6 models, k = 2 and 3, 100 steps per stage, 2 random partitions, 2 parallel
processes of one thread each) is sized for 2 CPU cores; every stage is reused on a re-run with the same settings.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from scipy.stats import spearmanr

import dynamo
from analyses import phases as phasing
from dynamo import zoo
from dynamo.layout import token_layout
from dynamo.models import LoadedModel, data_config, weights_sha256
from dynamo.partition import Partition, from_result
from dynamo.raptor import RaptorFitter, partition_baselines
from dynamo.store import save_result
from dynamo.zoo.train import build_model

DROP_RATES = (0.0, 0.1, 0.2, 0.3, 0.5)
RANDOM_INIT = "random-init"
SCORES = ("contrast", "cut_fraction", "normalized_cut", "silhouette", "mean_dissimilarity")


def random_init_model(like: str = "dynamo-zoo/vit-digits-p0.0", seed: int = 0) -> LoadedModel:
    """An untrained model with the architecture and preprocessing of zoo model ``like`` (seeded init)."""
    card = zoo.model_card(like)
    torch.manual_seed(seed)
    module = build_model(card["architecture"]["kwargs"], card["pretrained_cfg"]).eval()
    return LoadedModel(module=module, source=f"{RANDOM_INIT} ({card['architecture']['kwargs'].get('depth', '?')} blocks, seed {seed})",
                       checkpoint=None, pretrained=False, weights_sha256=weights_sha256(module),
                       data_config=data_config(module), layout=token_layout(module))


def study_models(names: list[str], seed: int) -> dict[str, tuple[float, LoadedModel]]:
    """Label -> (drop rate, or NaN for the untrained model; loaded model)."""
    models = {}
    for name in names:
        if name == RANDOM_INIT:
            models[name] = (float("nan"), random_init_model(seed=seed))
        else:
            zoo_name = f"{zoo.ZOO_PREFIX}vit-digits-p{float(name.removeprefix('p')):.1f}"
            drop_rate = float(zoo.model_card(zoo_name)["architecture"]["kwargs"]["drop_path_rate"])
            models[name] = (drop_rate, dynamo.load_model(zoo_name))
    return models


def raptor_partition(dissimilarity: xr.DataArray, k: int) -> tuple[Partition, str]:
    """The max-cut partition with k phases, or the exact contiguous one where max-cut is not k contiguous phases."""
    partition = phasing.partition_matrix(dissimilarity, "maxcut", k=k)
    if partition.is_contiguous and len(partition) == k:
        return partition, "maxcut"
    return phasing.contiguous_partition(dissimilarity, k), "contiguous"


def fitted(store: Path, folder: Path, teacher: LoadedModel, partition: Partition, recipe: dict) -> RaptorFitter:
    """A Raptor fit on ``partition``: loaded from ``folder`` if saved there with the same recipe, else fitted (resumably)."""
    config = folder / "config.json"
    if config.exists():
        saved = json.loads(config.read_text())
        if saved["partition"] == partition and all(saved["params"].get(k) == v for k, v in recipe.items() if k != "progress"):
            return RaptorFitter.load(folder, teacher=teacher)
    fitter = RaptorFitter(partition=partition, checkpoint_dir=folder / "checkpoints", **recipe).fit(store, teacher=teacher)
    fitter.save(folder)
    return fitter


def baselines(store: Path, path: Path, fitter: RaptorFitter, teacher, reuse, random_seeds: int, key: dict) -> xr.Dataset:
    """`partition_baselines`, cached in ``path`` (zarr) with the settings it was computed for."""
    if path.exists():
        cached = xr.open_zarr(path).load()
        if cached.attrs.get("study_key") == json.dumps(key):
            return cached
    result = partition_baselines(store, fitter, random_seeds=random_seeds, teacher=teacher, reuse=reuse)
    result.attrs.update(analysis="partition_baselines", study_key=json.dumps(key))
    save_result(result, path)
    return result


def study_model(label: str, loaded: LoadedModel, out: Path, args) -> xr.Dataset:
    """Everything for one model, as a Dataset without the ``model`` dimension.

    Returns
    -------
    xarray.Dataset
        ``similarity`` (layer_i, layer_j): the layer dissimilarity (1 - mean cos); ``phase_<score>``
        and ``n_phases`` of its max-cut phases at ``--eps`` (coordinate ``phase_partition``, e.g.
        ``"[1-3][4-12]"``); per ``k``: ``partition_<score>`` of the partition Raptor is fitted on
        (coordinate ``partition_method``), ``raptor_r2`` (k, layer, token_kind) and the fit's
        ``raptor_r2_final``, accuracies and agreement; per ``fit`` (fitted, uniform, random i,
        k=1): ``baseline_r2`` (k, fit, layer), ``baseline_r2_final``, ``baseline_accuracy_ratio``
        (k, fit), and every fit's partition as the coordinate ``phase`` (k, fit, layer):
        ``from_result(result.sel(k=k, fit="fitted"))`` is Raptor's.
    """
    folder = out / label
    store = folder / "trajectories.zarr"
    dataset = dynamo.record(loaded, zoo.default_images(loaded.source), store, limit=args.limit, progress=not args.quiet)
    phases = phasing.phase_analysis(dataset, "maxcut", eps=args.eps, n_bootstrap=0, progress=False)
    save_result(phases.assign_attrs(analysis="phases"), folder / "phases.zarr")
    matrix = phases["dissimilarity"]
    logits = np.asarray(dataset["logits"].values)
    labels = np.asarray(dataset["label"].values)
    recipe = {"steps": args.steps, "seed": args.seed, "progress": not args.quiet, "validate_every": args.steps}
    num_layers = loaded.num_blocks
    k1 = fitted(store, folder / "raptor" / "k1", loaded, Partition.uniform(num_layers, 1), recipe)
    partitions, methods, reports, rows = {}, {}, {}, []
    for k in args.ks:
        partitions[k], methods[k] = raptor_partition(matrix, k)
        fitter = fitted(store, folder / "raptor" / f"k{k}", loaded, partitions[k], recipe)
        reports[k] = fitter.evaluate(store, probe=False)
        key = {**{n: v for n, v in recipe.items() if n != "progress"}, "partition": partitions[k],
               "random_seeds": args.random_seeds, "weights_sha256": loaded.weights_sha256, "n_images": int(dataset.sizes["image"])}
        rows.append(baselines(store, folder / "raptor" / f"baselines_k{k}.zarr", fitter, loaded, [k1], args.random_seeds, key))
    ks = list(args.ks)
    per_k_scores = {k: phasing.phase_scores(matrix, partitions[k]) for k in ks}
    baseline = xr.concat(rows, dim=xr.Variable("k", ks), coords="all", combine_attrs="drop")
    return xr.Dataset(
        {
            "similarity": matrix.drop_attrs().assign_attrs(measure=matrix.attrs["measure"], tokens=matrix.attrs["tokens"]),
            "vit_accuracy": ((), float((logits.argmax(-1) == labels).mean())),
            **{f"phase_{name}": ((), float(phases["scores"].sel(score=name))) for name in SCORES},
            "n_phases": ((), len(from_result(phases))),
            **{f"partition_{name}": (("k",), [per_k_scores[k][name] for k in ks]) for name in SCORES},
            "raptor_r2": (("k", "layer", "token_kind"), np.stack([reports[k]["r2"].values for k in ks])),
            **{f"raptor_{name}": (("k",), [reports[k].attrs[name] for k in ks])
               for name in ("r2_final", "accuracy_ratio", "accuracy_teacher", "accuracy_surrogate", "agreement")},
            "baseline_r2": baseline["r2"],
            "baseline_r2_final": baseline["r2_final"],
            "baseline_accuracy_ratio": baseline["accuracy_ratio"],
        },
        coords={
            "k": ks, "token_kind": reports[ks[0]]["token_kind"].values, "layer": reports[ks[0]]["layer"].values,
            "fit": baseline["fit"].values, "phase": baseline["phase"],
            "partition_method": (("k",), [methods[k] for k in ks]),
            "phase_partition": str(from_result(phases)),
            "n_images": int(dataset.sizes["image"]), "n_heldout": int(reports[ks[0]].attrs["n_images"]),
        },
    )


def one_model(label: str, args) -> tuple[xr.Dataset, float]:
    """`study_model` for one label (in a worker process when ``--jobs`` > 1), with its seconds."""
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    print(f"[{label}] started", file=sys.stderr, flush=True)
    drop_rate, loaded = study_models([label], args.seed)[label]
    part = study_model(label, loaded, Path(args.out), args).assign_coords(
        drop_rate=drop_rate, pretrained=loaded.pretrained, source=loaded.source).load()
    took = round(time.perf_counter() - started, 1)
    print(f"[{label}] done in {took} s", file=sys.stderr, flush=True)
    return part, took


def rank_correlations(study: xr.Dataset) -> dict:
    """Spearman rho, p and n of each partition score against Raptor's final R².

    Per k and pooled over k, over all models and over the trained ones only (the untrained
    model's near-identity blocks make its fit trivially good, which alone can set the sign).
    """
    result = {}
    for name in SCORES:
        result[name] = {}
        for subset in ("all", "trained"):
            models = study if subset == "all" else study.sel(model=study["pretrained"].values.astype(bool))
            entry = {}
            for k in [*study["k"].values.tolist(), "pooled"]:
                select = models if k == "pooled" else models.sel(k=k)
                x = select[f"partition_{name}"].values.ravel()
                y = select["raptor_r2_final"].values.ravel()
                keep = np.isfinite(x) & np.isfinite(y)
                rho, p = spearmanr(x[keep], y[keep]) if keep.sum() >= 3 else (np.nan, np.nan)
                entry[str(k)] = {"rho": float(rho), "p": float(p), "n": int(keep.sum())}
            result[name][subset] = entry
    return result


def run_study(args) -> tuple[xr.Dataset, dict]:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(one_model, args.models, [args] * len(args.models)))
    else:
        results = [one_model(label, args) for label in args.models]
    parts = [part for part, _ in results]
    seconds = {label: took for label, (_, took) in zip(args.models, results)}
    study = xr.concat(parts, dim=xr.Variable("model", list(args.models)), coords="all", join="outer")
    correlations = rank_correlations(study)
    settings = {key: value for key, value in vars(args).items() if key not in ("quiet", "out")}
    study.attrs.update(analysis="stochastic_depth_study", correlations=json.dumps(correlations), settings=json.dumps(settings),
                       description="stochastic-depth study: phases and Raptor fits per model (examples/stochastic_depth_study.py)")
    save_result(study, out / "study.zarr")
    numbers = study_numbers(study, correlations, settings, seconds, time.perf_counter() - started)
    numbers["figures"] = draw_figures(study, out)
    (out / "study.json").write_text(json.dumps(numbers, indent=2))
    return study, numbers


def study_numbers(study: xr.Dataset, correlations: dict, settings: dict, seconds: dict, total: float) -> dict:
    per_model = {}
    for label in study["model"].values.tolist():
        row = study.sel(model=label)
        per_model[label] = {
            "drop_rate": None if np.isnan(float(row["drop_rate"])) else float(row["drop_rate"]),
            "vit_accuracy": round(float(row["vit_accuracy"]), 4),
            "phase_partition": str(row["phase_partition"].values),
            **{f"phase_{name}": round(float(row[f"phase_{name}"]), 4) for name in SCORES},
            "raptor": {
                f"k={k}": {
                    "partition": str(from_result(row.sel(k=k, fit="fitted"))),
                    "partition_method": str(row["partition_method"].sel(k=k).values),
                    **{name: round(float(row[f"partition_{name}"].sel(k=k)), 4) for name in SCORES},
                    **{name: round(float(row[f"raptor_{name}"].sel(k=k)), 4)
                       for name in ("r2_final", "accuracy_ratio", "accuracy_teacher", "accuracy_surrogate", "agreement")},
                    "r2_final_cls": round(float(row["raptor_r2"].sel(k=k, token_kind="cls").isel(layer=-1)), 4),
                    "r2_final_patch": round(float(row["raptor_r2"].sel(k=k, token_kind="patch").isel(layer=-1)), 4),
                    "baselines_r2_final": {str(f): round(float(v), 4) for f, v in
                                           zip(row["fit"].values, row["baseline_r2_final"].sel(k=k).values)},
                }
                for k in study["k"].values.tolist()
            },
        }
    return {"models": per_model, "spearman_partition_score_vs_raptor_r2_final": correlations,
            "n_images": int(study["n_images"].max()), "settings": settings,
            "seconds": {**seconds, "total": round(total, 1)}}


def draw_figures(study: xr.Dataset, out: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")

    from figures import study as study_figures
    from figures.output import save_figures

    figures = {
        "similarity_row": study_figures.plot_similarity_row(study),
        "r2_per_layer": study_figures.plot_r2_per_drop_rate(study),
        "accuracy_vs_drop_rate": study_figures.plot_accuracy_vs_drop_rate(study),
        "score_vs_r2": study_figures.plot_score_vs_r2(study, "contrast"),
        "maxcut_vs_random": study_figures.plot_partition_baselines(study),
    }
    return {name: str(path) for name, path in save_figures(figures, out, dpi=120).items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="sd-study", help="output folder (reused on a re-run)")
    parser.add_argument("--models", nargs="+", default=[f"p{rate}" for rate in DROP_RATES] + [RANDOM_INIT],
                        help=f"zoo drop rates as p0.0 ... p0.5, and/or {RANDOM_INIT}")
    parser.add_argument("--ks", nargs="+", type=int, default=[2, 3], help="Raptor block counts")
    parser.add_argument("--steps", type=int, default=100, help="Raptor optimizer steps per stage-1 block and in stage 2")
    parser.add_argument("--random-seeds", type=int, default=2, help="random contiguous partitions per k")
    parser.add_argument("--eps", type=float, default=0.1, help="max-cut fraction f for the phases shown")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N images (default all 360)")
    parser.add_argument("--seed", type=int, default=0, help="Raptor seed and random-init seed")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per process (1 is fastest for these small models)")
    parser.add_argument("--jobs", type=int, default=2, help="models studied in parallel processes (one per CPU core)")
    parser.add_argument("--fast", action="store_true",
                        help="smoke run: 2 models (p0.0, random-init), 48 images, k = 2, 4 steps, 1 random partition, 1 job")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.fast:
        args.models, args.ks, args.steps, args.random_seeds, args.limit, args.jobs = ["p0.0", RANDOM_INIT], [2], 4, 1, args.limit or 48, 1
    if any(k < 2 for k in args.ks):
        raise SystemExit("--ks: each k must be at least 2 (k = 1 is always fitted as a baseline)")
    _, numbers = run_study(args)
    rho = numbers["spearman_partition_score_vs_raptor_r2_final"]["contrast"]["all"]["pooled"]
    print(f"done in {numbers['seconds']['total']} s; contrast vs Raptor R²: Spearman rho = {rho['rho']:.3f}, "
          f"p = {rho['p']:.3g}, n = {rho['n']}; outputs in {args.out}", file=sys.stderr)
    return numbers


if __name__ == "__main__":
    main()
