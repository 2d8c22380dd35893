"""Stochastic depth, over-training, phase structure and Raptor: the paper's small-scale study, on dynamo's zoo.

The paper's small-scale section claims that training and stochastic depth promote block-recurrent
structure, that over-training degrades it, that phase-structure scores predict how well Raptor
fits, and that Raptor on max-cut phases beats Raptor on random contiguous and random shuffled
partitions (its Fig. 3). This script reruns that experiment offline on a zoo family:

- ``--family fashion`` (the powered study): the 14 Fashion-MNIST models (uniform stochastic depth
  p in {0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9}, seeds 0 and 1), the over-training series (checkpoints of
  one model trained 100 epochs on 500 images) and a seeded untrained model of the same
  architecture, each on its 1,000 bundled held-out test images;
- ``--family digits`` (the smaller study): ``vit-digits-p0.0`` ... ``-p0.5`` and an untrained
  model, on the 360 bundled digits.

Per model:

1. record its trajectories (`dynamo.record`; an interrupted recording resumes);
2. the layer dissimilarity, its max-cut phases at ``--eps`` and their scores
   (`analyses.phases.phase_analysis`), and for each k the partition Raptor is fitted on: the
   max-cut with k phases, or the exact contiguous split into k phases
   (`analyses.phases.contiguous_partition`) where the max-cut is not k contiguous phases;
3. Raptor (`dynamo.surrogates.raptor.RaptorFitter`) with k = 1 and each k on that partition, on the uniform
   partition, and, for the models of ``--partition-test`` (default all), on ``--random-seeds``
   random contiguous and ``--shuffled-seeds`` random shuffled partitions (`Partition.random_contiguous`,
   `Partition.random_shuffled`). Every fit follows one recipe with an early-stopping rule
   (`dynamo.surrogates.raptor.train.stopping_rule`, stated in ``study.json``), is saved, and is reused on a
   re-run with the same settings; stage-1 blocks are shared between fits of the same layer range;
4. one xarray Dataset with a ``model`` dimension (``OUT/study.zarr``), the numbers, Spearman
   correlations over independent runs (exact permutation p for small n, `analyses.statistics`),
   and a verdict on each of the paper's claims, Holm-corrected together (``OUT/study.json``, `claims`), and one figure per claim (``OUT/*.png``, `study_figures`).

Usage::

    python examples/stochastic_depth_study.py --family fashion --out fashion-study      # the powered study
    python examples/stochastic_depth_study.py --family digits --out sd-study           # the digits study
    python examples/stochastic_depth_study.py --out /tmp/sd-fast --fast                 # smoke run, seconds

Runs ``--jobs`` models at once in processes of ``--threads`` torch threads each (1 thread per
process is fastest for these 64-wide models).
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

import dynamo
from analyses import phases as phasing
from analyses import statistics
from dynamo import zoo
from dynamo.layout import token_layout
from dynamo.models import LoadedModel, data_config, weights_sha256
from dynamo.partition import Partition, from_result
from dynamo.store import save_result
from dynamo.surrogates.raptor import RaptorFitter, partition_baselines
from dynamo.surrogates.raptor.baselines import candidate_partitions
from dynamo.surrogates.raptor.train import stopping_rule
from dynamo.zoo import build_model

RANDOM_INIT = "random-init"
RUN_UNIT = "training run"
SERIES_EPOCHS = (5, 10, 20, 40)  # checkpoints of the over-training series studied, beside its final model
FAMILIES = {
    "digits": [f"vit-digits-p{rate}" for rate in (0.0, 0.1, 0.2, 0.3, 0.5)] + [RANDOM_INIT],
    "fashion": [f"vit-fashion-reg4-p{rate}{seed}" for rate in (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9) for seed in ("", "-s1")]
    + [f"vit-fashion-reg4-n500-p0.0-e{epoch}" for epoch in SERIES_EPOCHS] + ["vit-fashion-reg4-n500-p0.0", RANDOM_INIT],
}
SCORES = ("contrast", "cut_fraction", "normalized_cut", "silhouette", "mean_dissimilarity")
RAPTOR_NUMBERS = ("r2_final", "accuracy_ratio", "accuracy_teacher", "accuracy_surrogate", "agreement")


def random_init_model(like: str, seed: int = 0) -> LoadedModel:
    """An untrained model with the architecture and preprocessing of zoo model ``like`` (seeded init)."""
    card = zoo.model_card(like)
    torch.manual_seed(seed)
    module = build_model(card["architecture"]["kwargs"], card["pretrained_cfg"]).eval()
    return LoadedModel(module=module, source=f"{RANDOM_INIT} ({card['architecture']['kwargs'].get('depth', '?')} blocks, seed {seed})",
                       checkpoint=None, pretrained=False, weights_sha256=weights_sha256(module),
                       data_config=data_config(module), layout=token_layout(module))


def model_facts(label: str, like: str) -> dict:
    """What the study knows of a model before running it: its role and its card's numbers.

    ``role`` is ``"family"`` (a stochastic-depth model), ``"series"`` (a checkpoint or the final
    model of the over-training series: trained on at most 1,000 images) or ``"untrained"``;
    ``drop_rate``, ``seed`` and ``epoch`` are NaN for the untrained model.
    """
    if label == RANDOM_INIT:
        return {"role": "untrained", "drop_rate": np.nan, "seed": np.nan, "epoch": 0.0, "train_accuracy": np.nan, "images": zoo.default_images(like)}
    card = zoo.model_card(label)
    training = card["training"]
    series = bool(card.get("checkpoint")) or (training.get("train_limit") or 10**9) <= 1000
    return {
        "role": "series" if series else "family",
        "drop_rate": float(training["drop_path_rate"]),
        "seed": float(training["seed"]),
        "epoch": float((card.get("checkpoint") or {}).get("epoch", training["epochs"])),
        "train_accuracy": float(card.get("train_accuracy") or np.nan),
        "images": zoo.default_images(label),
    }


def load(label: str, like: str, seed: int) -> LoadedModel:
    return random_init_model(like, seed) if label == RANDOM_INIT else dynamo.load_model(zoo.ZOO_PREFIX + label)


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


def study_model(label: str, loaded: LoadedModel, images: Path, out: Path, args, partition_test: bool) -> xr.Dataset:
    """Everything for one model, as a Dataset without the ``model`` dimension.

    Returns
    -------
    xarray.Dataset
        ``similarity`` (layer_i, layer_j): the layer dissimilarity (1 - mean cos); ``phase_<score>``
        and ``n_phases`` of its max-cut phases at ``--eps`` (coordinate ``phase_partition``, e.g.
        ``"[1-3][4-12]"``); per ``k``: ``partition_<score>`` of the partition Raptor is fitted on
        (coordinate ``partition_method``), ``raptor_r2`` (k, layer, token_kind) and the fit's
        ``raptor_<number>`` (`RAPTOR_NUMBERS`), ``raptor_segments_stopped_early`` (segments its
        early-stopping rule ended before the step cap) and ``raptor_stage2_last_gain`` (held-out R²
        gained over stage 2's last ``--patience`` validations); per ``fit`` ("fitted", "uniform", "random i",
        "shuffled i", "k=1"): ``baseline_r2`` (k, fit, layer), ``baseline_r2_final``,
        ``baseline_accuracy_ratio`` (k, fit), and every fit's partition as the coordinate
        ``phase`` (k, fit, layer): ``from_result(result.sel(k=k, fit="fitted"))`` is Raptor's.
    """
    folder = out / label
    store = folder / "trajectories.zarr"
    dataset = dynamo.record(loaded, images, store, limit=args.limit, batch_size=100, progress=not args.quiet)
    phases = phasing.phase_analysis(dataset, "maxcut", eps=args.eps, n_bootstrap=0, progress=False)
    save_result(phases.assign_attrs(analysis="phases"), folder / "phases.zarr")
    matrix = phases["dissimilarity"]
    logits = np.asarray(dataset["logits"].values)
    labels = np.asarray(dataset["label"].values)
    recipe = {"steps": args.steps, "validate_every": args.validate_every, "patience": args.patience, "tol": args.tol,
              "seed": args.seed, "progress": not args.quiet, "stage1_cache": str(folder / "stage1")}
    num_layers = loaded.num_blocks
    k1 = fitted(store, folder / "raptor" / "k1", loaded, Partition.uniform(num_layers, 1), recipe)
    random_seeds, shuffled_seeds = (args.random_seeds, args.shuffled_seeds) if partition_test else (0, 0)
    partitions, methods, fitters, baselines = {}, {}, {}, {k: [k1] for k in args.ks}
    for k in args.ks:
        partitions[k], methods[k] = raptor_partition(matrix, k)
        fitters[k] = fitted(store, folder / "raptor" / f"k{k}", loaded, partitions[k], recipe)
    # the baselines seed by seed across k, so that a study stopped early has the first seeds of every k
    candidates = {k: candidate_partitions(num_layers, k, random_seeds, shuffled_seeds) for k in args.ks}
    for seed in [None, *range(max(random_seeds, shuffled_seeds))]:
        for k in args.ks:
            names = ["uniform"] if seed is None else [f"random {seed}", f"shuffled {seed}"]
            baselines[k] += [fitted(store, folder / "raptor" / f"k{k}-{name.replace(' ', '')}", loaded, candidates[k][name], recipe)
                             for name in names if name in candidates[k] and candidates[k][name] != partitions[k]]
    reports = {k: fitters[k].evaluate(store, probe=False) for k in args.ks}
    rows = [partition_baselines(store, fitters[k], random_seeds=random_seeds, shuffled_seeds=shuffled_seeds, teacher=loaded,
                                reuse=baselines[k]) for k in args.ks]
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
            **{f"raptor_{name}": (("k",), [reports[k].attrs[name] for k in ks]) for name in RAPTOR_NUMBERS},
            "raptor_segments_stopped_early": (("k",), [sum("stop" in entry for entry in fitters[k].history_) for k in ks]),
            "raptor_stage2_last_gain": (("k",), [stage2_gain(fitters[k].history_, args.patience or 3) for k in ks]),
            "raptor_k1_r2_final": ((), float(baseline["r2_final"].sel(fit="k=1").isel(k=0))),
            "raptor_k1_accuracy_ratio": ((), float(baseline["accuracy_ratio"].sel(fit="k=1").isel(k=0))),
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


def stage2_gain(history: list[dict], validations: int) -> float:
    """Held-out R² gained by stage 2 over its last ``validations`` validations: how far from converged a fit stopped."""
    scores = [entry["val_r2"] for entry in history if entry["stage"] == 2]
    return float(scores[-1] - scores[-1 - validations]) if len(scores) > validations else np.nan


def one_model(label: str, args) -> tuple[xr.Dataset, float]:
    """`study_model` for one label (in a worker process when ``--jobs`` > 1), with its seconds."""
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    print(f"[{label}] started", file=sys.stderr, flush=True)
    like = next(name for name in args.models if name != RANDOM_INIT)
    facts = model_facts(label, like)
    loaded = load(label, like, args.seed)
    partition_test = args.partition_test is None or label in args.partition_test
    part = study_model(label, loaded, facts.pop("images"), Path(args.out), args, partition_test)
    part = part.assign_coords(pretrained=loaded.pretrained, source=loaded.source, partition_test=partition_test, **facts).load()
    took = round(time.perf_counter() - started, 1)
    print(f"[{label}] done in {took} s", file=sys.stderr, flush=True)
    return part, took


def _by_model(study: xr.Dataset, roles: tuple[str, ...]) -> xr.Dataset:
    return study.sel(model=np.isin(study["role"].values, roles))


def model_table(study: xr.Dataset) -> dict:
    """One row per model of what the claims use, as arrays (see `table_from_numbers` for the same from ``study.json``).

    Keys: ``model``, ``role``, ``drop_rate``, ``epoch``, ``vit_accuracy``, ``phase_<score>`` (max-cut
    phases at ``--eps``), ``partition_<score>`` (the Raptor partition, mean over k), ``r2`` and
    ``accuracy_ratio`` (Raptor, mean over k), ``uniform_r2_gain`` (max-cut minus uniform R², mean over
    the k where they differ; NaN where they never do). Scores include ``relative_contrast``
    (contrast / mean dissimilarity, the scale-free primary score of `analyses.phase_null`).
    """
    gains = []
    for label in study["model"].values.tolist():
        row = study.sel(model=label)
        differ = [k for k in study["k"].values.tolist() if from_result(row.sel(k=k, fit="fitted")) != from_result(row.sel(k=k, fit="uniform"))]
        gains.append(float((row["baseline_r2_final"].sel(k=differ, fit="fitted") - row["baseline_r2_final"].sel(k=differ, fit="uniform")).mean())
                     if differ else np.nan)
    table = {"model": study["model"].values.astype(str), "role": study["role"].values.astype(str),
             **{name: study[name].values.astype(float) for name in ("drop_rate", "epoch", "vit_accuracy")},
             "r2": study["raptor_r2_final"].mean("k").values, "accuracy_ratio": study["raptor_accuracy_ratio"].mean("k").values,
             "uniform_r2_gain": np.array(gains)}
    for where in ("phase", "partition"):
        for name in SCORES:
            values = study[f"{where}_{name}"]
            table[f"{where}_{name}"] = (values.mean("k") if "k" in values.dims else values).values
        ratio = study[f"{where}_contrast"] / study[f"{where}_mean_dissimilarity"]
        table[f"{where}_relative_contrast"] = (ratio.mean("k") if "k" in ratio.dims else ratio).values
    return table


def table_from_numbers(numbers: dict) -> dict:
    """`model_table` from a ``study.json`` (its ``models``), without the study's Dataset."""
    models = numbers["models"]
    rows = list(models.values())
    nan = lambda value: np.nan if value is None else float(value)  # noqa: E731
    table = {"model": np.array(list(models)), "role": np.array([row["role"] for row in rows]),
             **{name: np.array([nan(row[name]) for row in rows]) for name in ("drop_rate", "epoch", "vit_accuracy")}}
    fits = [list(row["raptor"].values()) for row in rows]
    table["r2"] = np.array([np.mean([fit["r2_final"] for fit in per_k]) for per_k in fits])
    table["accuracy_ratio"] = np.array([np.mean([fit["accuracy_ratio"] for fit in per_k]) for per_k in fits])
    gains = []
    for per_k in fits:
        differ = [fit for fit in per_k if "uniform" in fit["baselines_r2_final"]]  # the fitted partition is never a baseline
        gains.append(np.mean([fit["baselines_r2_final"]["fitted"] - fit["baselines_r2_final"]["uniform"] for fit in differ])
                     if differ else np.nan)
    table["uniform_r2_gain"] = np.array(gains)
    for name in SCORES:
        table[f"phase_{name}"] = np.array([row[f"phase_{name}"] for row in rows])
        table[f"partition_{name}"] = np.array([np.mean([fit[name] for fit in per_k]) for per_k in fits])
    table["phase_relative_contrast"] = table["phase_contrast"] / table["phase_mean_dissimilarity"]
    table["partition_relative_contrast"] = np.array([np.mean([fit["contrast"] / fit["mean_dissimilarity"] for fit in per_k])
                                                     for per_k in fits])
    return table


def correlations(table: dict) -> dict:
    """The study's correlations (`analyses.statistics`): exact/Monte Carlo permutation p, Fisher-z intervals.

    The unit is explicit: ``p_vs_<y>`` and ``<score>_vs_r2`` have one point per independent training
    run of the stochastic-depth family (never model x k rows, never the series' checkpoints);
    ``epoch_vs_<y>`` is a within-run trend over the checkpoints of the ONE over-training run;
    ``<score>_vs_r2_given_accuracy`` partials out the ViT's accuracy (a known confound: p moves both).
    Scores and R² are each model's mean over k.
    """
    family, series = table["role"] == "family", table["role"] == "series"
    result = {}
    for y in ("r2", "accuracy_ratio", "vit_accuracy", "phase_mean_dissimilarity", "phase_contrast", "phase_relative_contrast"):
        result[f"p_vs_{y}"] = statistics.correlation(table["drop_rate"][family], table[y][family])
        if series.sum() >= 3:
            result[f"epoch_vs_{y}"] = statistics.within_run_trend(table["epoch"][series], table[y][series])
    for name in (*SCORES, "relative_contrast"):
        x = table[f"partition_{name}"][family]
        result[f"{name}_vs_r2"] = statistics.correlation(x, table["r2"][family])
        result[f"{name}_vs_r2_given_accuracy"] = statistics.partial_correlation(x, table["r2"][family], table["vit_accuracy"][family])
    return result


def partition_test(study: xr.Dataset) -> dict:
    """The paper's Fig. 3 protocol: Raptor on max-cut phases against random contiguous and random shuffled partitions.

    For each trained model of the partition test and each k: the fitted (max-cut) partition's final-layer
    R² and accuracy ratio, the mean and standard deviation over each random kind, whether the
    max-cut fit beats the mean and the mean + 1 sd (the paper's reading), its rank among the random
    fits, and one-sided permutation p-values: if max-cut were one more random partition, its rank
    would be uniform, and independent between (model, k) cases (each draws its own partitions), so
    `claims` combines them with Fisher's method.
    """
    tested = study.sel(model=study["partition_test"].values.astype(bool) & (study["role"].values != "untrained"))
    fits = [str(f) for f in study["fit"].values]
    result = {}
    for kind in ("random", "shuffled"):
        names = [f for f in fits if f.startswith(f"{kind} ")]
        if not names or tested.sizes["model"] == 0:
            continue
        entry = {}
        for k in study["k"].values.tolist():
            rows = []
            for label in tested["model"].values.tolist():
                for number, variable in (("r2_final", "baseline_r2_final"), ("accuracy_ratio", "baseline_accuracy_ratio")):
                    values = tested[variable].sel(model=label, k=k)
                    others = values.sel(fit=names).values
                    others = others[np.isfinite(others)]
                    if others.size == 0:
                        continue
                    best = float(values.sel(fit="fitted"))
                    rows.append({"model": label, "number": number, "maxcut": best, "mean": float(others.mean()),
                                 "sd": float(others.std(ddof=1)) if others.size > 1 else np.nan, "n": int(others.size),
                                 "beats_mean": bool(best > others.mean()),
                                 "beats_mean_plus_sd": bool(others.size > 1 and best > others.mean() + others.std(ddof=1)),
                                 "rank": int((others >= best).sum()) + 1,
                                 # one-sided permutation p-values: max-cut no better (worse) than an exchangeable random partition
                                 "p_better": float((1 + (others >= best).sum()) / (others.size + 1)),
                                 "p_worse": float((1 + (others <= best).sum()) / (others.size + 1))})
            entry[str(k)] = rows
        result[kind] = entry
    return result


def claims(table: dict, correlation: dict, test: dict | None = None, *, correction: str = "holm") -> list[dict]:
    """Each of the paper's small-scale claims with its test, unit, corrected p and verdict (`analyses.statistics.judge`).

    All claims of the study are corrected together (Holm by default). A claim whose premise fails
    (``precondition`` False, with ``precondition_note``) is undecided whatever its p.
    """
    family, series = table["role"] == "family", table["role"] == "series"
    found = []

    def add(claim: str, key: str, sign: int, **extra):
        entry = correlation[key]
        found.append({"claim": claim, "measure": key, **entry, "sign": sign, **extra})

    add("higher stochastic depth p gives more similar layers (mean layer dissimilarity)", "p_vs_phase_mean_dissimilarity", -1)
    add("higher stochastic depth p gives clearer blocks (relative contrast of the max-cut phases)", "p_vs_phase_relative_contrast", +1)
    add("higher p gives higher Raptor R²", "p_vs_r2", +1)
    add("higher p gives higher Raptor accuracy (ratio to the ViT)", "p_vs_accuracy_ratio", +1)
    add("higher p gives higher ViT accuracy", "p_vs_vit_accuracy", +1)
    order = np.argsort(table["epoch"][series])
    accuracy = table["vit_accuracy"][series][order]
    over_trained = bool(accuracy.size and accuracy[-1] < accuracy.max())
    premise = {"precondition": over_trained, "precondition_note": "" if over_trained else
               "the series never over-trains: its test accuracy is highest at the last checkpoint, so epoch measures training"}
    if "epoch_vs_phase_relative_contrast" in correlation:
        add("over-training degrades block structure (relative contrast, within the one run)", "epoch_vs_phase_relative_contrast", -1, **premise)
        add("over-training degrades Raptor's fit (R², within the one run)", "epoch_vs_r2", -1, **premise)
    add("block structure predicts Raptor's fit (relative contrast of the Raptor partition vs R², ViT accuracy partialled out)",
        "relative_contrast_vs_r2_given_accuracy", +1,
        without_partialling=correlation["relative_contrast_vs_r2"]["rho"], cut_fraction_rho=correlation["cut_fraction_vs_r2"]["rho"])
    untrained = table["role"] == "untrained"
    if untrained.any() and series.any():
        last = np.flatnonzero(series)[np.argmax(table["epoch"][series])]
        found.append({"claim": "an untrained ViT is easier to reconstruct than an over-trained one",
                      "measure": f"Raptor R² (mean over k): untrained minus {table['model'][last]}",
                      "difference": float(table["r2"][untrained][0] - table["r2"][last]), "n": 1, "unit": "one pair of models",
                      "test": "none: one pair has no test", "p_value": np.nan, "effect_key": "difference", "sign": +1, **premise})
    gains = table["uniform_r2_gain"][family]
    gains = gains[np.isfinite(gains)]
    found.append({"claim": "max-cut partitions beat the uniform split", "measure": "family runs whose max-cut Raptor R² beats the "
                  "uniform split's (mean over the k where the partitions differ)", **statistics.sign_test(int((gains > 0).sum()), int((gains != 0).sum())),
                  "unit": RUN_UNIT, "sign": +1, "precondition": False,
                  "precondition_note": "a fixed step budget per segment penalises unbalanced phases, and the phases were found on the "
                                       "scored images: superseded by the fair partition test (examples/partition_test.py)"})
    for kind, entry in (test or {}).items():
        rows = [row for k_rows in entry.values() for row in k_rows if row["number"] == "accuracy_ratio"]
        found.append({"claim": f"max-cut partitions beat random {'contiguous' if kind == 'random' else kind} ones (the paper's Fig. 3)",
                      "measure": f"(model, k) cases where max-cut's accuracy ratio beats the {kind} partitions' mean",
                      "wins": sum(row["beats_mean"] for row in rows), "n": len(rows), "unit": "(model, k) case",
                      "test": "Fisher's combination of per-case rank p-values", "p_value": np.nan, "effect": np.nan, "sign": +1,
                      "precondition": False, "precondition_note": "the random draws repeat within and across models, so the cases "
                      "are not independent and Fisher's combination does not apply: superseded by the fair partition test "
                      "(examples/partition_test.py)"})
    return _judged(found, correction)


def _judged(found: list[dict], correction: str) -> list[dict]:
    """`analyses.statistics.judge` with each claim's effect under its own key (``rho`` unless ``effect_key``)."""
    for claim in found:
        claim.setdefault("effect_key", "rho" if "rho" in claim else "effect")
    return statistics.judge(found, method=correction)


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
    table = model_table(study)
    correlation, test = correlations(table), partition_test(study)
    settings = {key: value for key, value in vars(args).items() if key not in ("quiet", "out")}
    rule = stopping_rule(RaptorFitter(steps=args.steps, validate_every=args.validate_every, patience=args.patience, tol=args.tol))
    study.attrs.update(analysis="stochastic_depth_study", correlations=json.dumps(correlation), settings=json.dumps(settings),
                       stopping_rule=rule,
                       description="stochastic-depth study: phases and Raptor fits per model (examples/stochastic_depth_study.py)")
    save_result(study, out / "study.zarr")
    numbers = study_numbers(study, settings, seconds, time.perf_counter() - started)
    numbers.update(stopping_rule=rule, correlations=correlation, partition_test=test, claims=claims(table, correlation, test))
    numbers["figures"] = draw_figures(study, out)
    (out / "study.json").write_text(json.dumps(numbers, indent=2))
    return study, numbers


def study_numbers(study: xr.Dataset, settings: dict, seconds: dict, total: float) -> dict:
    per_model = {}
    for label in study["model"].values.tolist():
        row = study.sel(model=label)
        per_model[label] = {
            **{name: None if not np.isfinite(float(row[name])) else float(row[name]) for name in ("drop_rate", "seed", "epoch")},
            "role": str(row["role"].values),
            "vit_accuracy": round(float(row["vit_accuracy"]), 4),
            "phase_partition": str(row["phase_partition"].values),
            **{f"phase_{name}": round(float(row[f"phase_{name}"]), 4) for name in SCORES},
            "raptor_k1_r2_final": round(float(row["raptor_k1_r2_final"]), 4),
            "raptor": {
                f"k={k}": {
                    "partition": str(from_result(row.sel(k=k, fit="fitted"))),
                    "partition_method": str(row["partition_method"].sel(k=k).values),
                    **{name: round(float(row[f"partition_{name}"].sel(k=k)), 4) for name in SCORES},
                    **{name: round(float(row[f"raptor_{name}"].sel(k=k)), 4) for name in RAPTOR_NUMBERS},
                    "segments_stopped_early": int(row["raptor_segments_stopped_early"].sel(k=k)),
                    "stage2_last_gain": round(float(row["raptor_stage2_last_gain"].sel(k=k)), 4),
                    "r2_final_cls": round(float(row["raptor_r2"].sel(k=k, token_kind="cls").isel(layer=-1)), 4),
                    "r2_final_patch": round(float(row["raptor_r2"].sel(k=k, token_kind="patch").isel(layer=-1)), 4),
                    "baselines_r2_final": {str(f): round(float(v), 4) for f, v in
                                           zip(row["fit"].values, row["baseline_r2_final"].sel(k=k).values) if np.isfinite(v)},
                }
                for k in study["k"].values.tolist()
            },
        }
    return {"models": per_model, "n_images": int(study["n_images"].max()), "n_heldout": int(study["n_heldout"].max()),
            "settings": settings, "seconds": {**seconds, "total": round(total, 1)}}


def draw_figures(study: xr.Dataset, out: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # the study's figures sit next to this script
    import study_figures

    from figures.output import save_figures

    trained = _by_model(study, ("family", "untrained"))
    figures = {
        "similarity_row": study_figures.plot_similarity_row(trained),
        "r2_per_layer": study_figures.plot_r2_per_drop_rate(trained),
        "r2_vs_drop_rate": study_figures.plot_raptor_vs_drop_rate(study),
        "accuracy_vs_drop_rate": study_figures.plot_accuracy_vs_drop_rate(trained),
        "score_vs_r2": study_figures.plot_score_vs_r2(_by_model(study, ("family", "series")), "relative_contrast"),
    }
    if study["partition_test"].values.any():
        figures["maxcut_vs_random"] = study_figures.plot_partition_baselines(study)
    if "series" in study["role"].values:
        figures["overtraining"] = study_figures.plot_overtraining(study)
    return {name: str(path) for name, path in save_figures(figures, out, dpi=120).items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="sd-study", help="output folder (reused on a re-run)")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="digits", help="the zoo family studied (its models: FAMILIES)")
    parser.add_argument("--models", nargs="+", default=None,
                        help=f"zoo model names without the {zoo.ZOO_PREFIX} prefix and/or {RANDOM_INIT} (default: the family's)")
    parser.add_argument("--ks", nargs="+", type=int, default=[2, 3, 4], help="Raptor block counts (k = 1 is always fitted)")
    parser.add_argument("--steps", type=int, default=120, help="Raptor: at most this many optimizer steps per stage-1 block and in stage 2")
    parser.add_argument("--validate-every", type=int, default=20, help="Raptor: held-out R² every this many steps (early stopping)")
    parser.add_argument("--patience", type=int, default=3, help="Raptor: stop a segment after this many validations without gain (0: never)")
    parser.add_argument("--tol", type=float, default=1e-3, help="Raptor: the held-out R² gain that counts")
    parser.add_argument("--random-seeds", type=int, default=10, help="random contiguous partitions per k (partition-test models)")
    parser.add_argument("--shuffled-seeds", type=int, default=10, help="random shuffled partitions per k (partition-test models)")
    parser.add_argument("--partition-test", nargs="*", default=None,
                        help="models fitted on the random partitions too (default: every model; none when given without names)")
    parser.add_argument("--eps", type=float, default=0.1, help="max-cut fraction f for the phases shown")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N images (default all bundled)")
    parser.add_argument("--seed", type=int, default=0, help="Raptor seed and random-init seed")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per process (1 is fastest for these small models)")
    parser.add_argument("--jobs", type=int, default=2, help="models studied in parallel processes (one per CPU core)")
    parser.add_argument("--fast", action="store_true",
                        help="smoke run: 2 digits models (p0.0, random-init), 48 images, k = 2, 4 steps, 1 random and 1 shuffled partition, 1 job")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    args.models = args.models or FAMILIES[args.family]
    if args.fast:
        args.models, args.ks, args.steps, args.limit, args.jobs = ["vit-digits-p0.0", RANDOM_INIT], [2], 4, args.limit or 48, 1
        args.random_seeds, args.shuffled_seeds, args.validate_every, args.patience = 1, 1, 2, 0
    if any(k < 2 for k in args.ks):
        raise SystemExit("--ks: each k must be at least 2 (k = 1 is always fitted as a baseline)")
    if all(name == RANDOM_INIT for name in args.models):
        raise SystemExit(f"--models: name at least one zoo model ({RANDOM_INIT} copies its architecture)")
    _, numbers = run_study(args)
    for claim in numbers["claims"]:
        print(f"{claim['verdict']}: {claim['claim']}", file=sys.stderr)
    print(f"done in {numbers['seconds']['total']} s; outputs in {args.out}", file=sys.stderr)
    return numbers


if __name__ == "__main__":
    main()
