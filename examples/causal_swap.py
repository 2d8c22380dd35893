"""The paper's causal layer-swap test on the Fashion-MNIST family: do swaps across phases hurt more than within?

For each model (the 14 stochastic-depth models, every checkpoint of the over-training series and a
seeded untrained model of the same architecture), forward passes only:

1. record its trajectories on ``--limit`` (default 400, class-balanced) of the 1,000 bundled Fashion-MNIST
   test images (`dynamo.zoo.fashion_images`);
2. find its phases (max-cut, f = ``--eps``) on the even-numbered images only;
3. on the odd-numbered images (disjoint from those that found the phases), replace layer i by
   block j for every |i - j| <= 2 (`analyses.swap.compute`) and score top-1 accuracy through the
   model's own head;
4. the statistic: across-minus-within accuracy drop at matched distance (`analyses.swap.matched_drop`);
   the null: the same statistic for every contiguous partition with the same number of phases
   (all of them, enumerated, so each model has its own distinct draws; partitions with the same
   phase sizes are too few, at most k! orderings, to be a null); the model's excess = statistic
   − null mean, and its exact rank p.

Units: the 14 family models are 14 independent runs, combined by an exact Wilcoxon signed-rank test
of their excesses; the series is ONE run, analysed as a within-run trend of the excess against the
epoch (`analyses.statistics.within_run_trend`); the untrained model is reported alone.

Usage::

    python examples/causal_swap.py --out /tmp/causal-swap --docs docs
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stochastic_depth_study import RANDOM_INIT, model_facts, random_init_model  # noqa: E402

import dynamo  # noqa: E402
from analyses import phases as phasing  # noqa: E402
from analyses.statistics import signed_rank, within_run_trend  # noqa: E402
from analyses.swap import compute as layer_swap  # noqa: E402
from analyses.swap import matched_drop
from dynamo import zoo  # noqa: E402
from dynamo.partition import Partition  # noqa: E402

FAMILY = [f"vit-fashion-reg4-p{rate}{seed}" for rate in (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9) for seed in ("", "-s1")]
SERIES = [f"vit-fashion-reg4-n500-p0.0-e{epoch}" for epoch in (5, 10, 20, 30, 40, 60, 80)] + ["vit-fashion-reg4-n500-p0.0"]
MAX_DISTANCE = 2


def one_model(label: str, out: Path, eps: float, seed: int, limit: int) -> dict:
    started = time.perf_counter()
    loaded = random_init_model(FAMILY[0], seed) if label == RANDOM_INIT else dynamo.load_model(zoo.ZOO_PREFIX + label)
    store = dynamo.record(loaded, dynamo.image_set(zoo.fashion_images()), out / label / "trajectories.zarr",
                          limit=limit, batch_size=200, progress=False)
    n = store.sizes["image"]
    phase_images, swap_images = np.arange(0, n, 2), np.arange(1, n, 2)
    partition = phasing.find_phases(store.isel(image=phase_images), "maxcut", eps=eps)
    result = layer_swap(store, loaded, partition=partition, images=swap_images, max_distance=MAX_DISTANCE, progress=False)
    observed = matched_drop(result)
    null = np.array([matched_drop(result, p) for p in Partition.every_contiguous(loaded.num_blocks, len(partition))])
    null = null[np.isfinite(null)]
    distance = np.abs(result["target"].values[:, None] - result["block"].values[None, :])
    accuracy = result["accuracy"].values
    within = result["relation"].values == "within"
    across = result["relation"].values == "across"
    facts = model_facts(label, FAMILY[0])
    return {
        "model": label, "role": facts["role"], "epoch": facts["epoch"], "drop_rate": facts["drop_rate"],
        "partition": str(Partition(partition)), "k": len(partition), "clean_accuracy": result.attrs["clean_accuracy"],
        "within_accuracy": float(np.nanmean(accuracy[within])) if within.any() else None,
        "across_accuracy": float(np.nanmean(accuracy[across])) if across.any() else None,
        "per_distance": {int(d): {"within": float(np.nanmean(accuracy[within & (distance == d)])) if (within & (distance == d)).any() else None,
                                  "across": float(np.nanmean(accuracy[across & (distance == d)])) if (across & (distance == d)).any() else None}
                         for d in range(1, MAX_DISTANCE + 1)},
        "statistic": observed, "null_mean": float(null.mean()) if null.size else None,
        "null_values": null.round(5).tolist(), "n_null": int(null.size),
        "excess": float(observed - null.mean()) if null.size and np.isfinite(observed) else None,
        "p_rank": float((null >= observed - 1e-12).sum() / null.size) if null.size and np.isfinite(observed) else None,
        "n_phase_images": int(phase_images.size), "n_swap_images": int(swap_images.size),
        "seconds": round(time.perf_counter() - started, 1),
    }


def combine(rows: list[dict]) -> dict:
    family = [row for row in rows if row["role"] == "family"]
    series = sorted((row for row in rows if row["role"] == "series"), key=lambda row: row["epoch"])
    nan = lambda v: np.nan if v is None else v  # noqa: E731
    summary = {
        "family_excess": signed_rank([nan(row["excess"]) for row in family]),
        "family_statistic": signed_rank([nan(row["statistic"]) for row in family]),
        "series_excess_vs_epoch": within_run_trend([row["epoch"] for row in series], [nan(row["excess"]) for row in series]),
        "untrained": next(({key: row[key] for key in ("statistic", "null_mean", "excess", "p_rank", "partition")}
                           for row in rows if row["role"] == "untrained"), None),
    }
    return summary


def draw(rows: list[dict], summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    family = [row for row in rows if row["role"] == "family"]
    series = sorted((row for row in rows if row["role"] == "series"), key=lambda row: row["epoch"])
    untrained = [row for row in rows if row["role"] == "untrained"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [2, 1.1]}, layout="constrained")
    shown = family + untrained
    for position, row in enumerate(shown):
        null = np.asarray(row["null_values"])
        left.scatter(position + np.random.default_rng(position).uniform(-0.2, 0.2, null.size), null, s=6, color="0.6", alpha=0.5,
                     label="contiguous partitions, same k (null)" if position == 0 else None)
        left.scatter(position, row["statistic"], marker="*", s=150, color="crimson", zorder=3,
                     label="max-cut phases" if position == 0 else None)
    left.axhline(0, color="k", linewidth=0.8)
    names = [f"p {row['drop_rate']:g}" + (" s1" if row["model"].endswith("-s1") else "") if row["role"] == "family" else "untrained"
             for row in shown]
    left.set_xticks(range(len(shown)), names, rotation=45, ha="right", fontsize=8)
    left.set_ylabel("across − within accuracy drop at matched |i−j| (≤ 2)")
    test = summary["family_excess"]
    left.set_title(f"Causal layer swap per model (phases on {rows[0]['n_phase_images']} images, swaps scored on {rows[0]['n_swap_images']} others)\n"
                   f"excess over the null, 14 runs: median {test['effect']:+.4f}, Wilcoxon signed-rank {test['p_method']} "
                   f"p = {test['p_value']:.3g} (n = {test['n']} runs)", fontsize=9)
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    epochs = [row["epoch"] for row in series]
    right.plot(epochs, [row["excess"] for row in series], "o-", color="tab:purple", label="excess over the null")
    right.plot(epochs, [row["statistic"] for row in series], "s--", color="tab:orange", label="statistic (max-cut phases)")
    right.axhline(0, color="k", linewidth=0.8)
    right.set(xscale="log", xlabel="training epoch (log)", ylabel="accuracy drop difference")
    right.set_xticks(epochs, [f"{e:g}" for e in epochs])
    right.minorticks_off()
    trend = summary["series_excess_vs_epoch"]
    right.set_title(f"Over-training series: ONE run, {trend['n']} checkpoints (a within-run trend)\nexcess vs epoch: "
                    f"Spearman ρ = {trend['rho']:+.2f},\n{trend['p_method'].split(' (')[0]} p = {trend['p_value']:.3g}", fontsize=9)
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    figure.savefig(path, dpi=110)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="causal-swap", help="scratch folder for the stores")
    parser.add_argument("--docs", default="docs", help="where the JSON and the figure go")
    parser.add_argument("--models", nargs="+", default=FAMILY + SERIES + [RANDOM_INIT])
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0, help="seed of the untrained model's init")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=400, help="images used, class-balanced (ImageSet.head): half find the phases, half are swapped")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out, docs = Path(args.out), Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    rows = []
    for label in args.models:
        cached = out / label / "swap.json"
        if cached.exists():
            rows.append(json.loads(cached.read_text()))
        else:
            rows.append(one_model(label, out, args.eps, args.seed, args.limit))
            cached.write_text(json.dumps(rows[-1]))
        print(f"[{label}] {rows[-1]['partition']}: statistic {rows[-1]['statistic']:+.4f}, excess {rows[-1]['excess']}, "
              f"p_rank {rows[-1]['p_rank']} ({rows[-1]['seconds']} s)", file=sys.stderr, flush=True)
    summary = combine(rows)
    numbers = {"settings": {**vars(args), "max_distance": MAX_DISTANCE}, "models": rows, "summary": summary}
    (docs / "causal_swap.json").write_text(json.dumps(numbers, indent=1, default=float))
    draw(rows, summary, docs / "causal_swap.png")
    return numbers


if __name__ == "__main__":
    main()
