"""Phase structure across the zoo's Fashion-MNIST family: stochastic depth, seeds, over-training.

The store-only half of the paper's small-scale study, with the power the digits family lacked:
every 12-block Fashion model (uniform stochastic depth p in {0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9},
seeds 0 and 1: 14 independently trained models), the 24-block model, the over-training series
(one model's checkpoints on 500 training images) and, for reference, the digits models (the
embedded default `vit-digits-reg4` among them). For each:

1. record its trajectories on its bundled held-out images (1,000 Fashion-MNIST test images, or the
   360 digits; `dynamo.record`, resumed on a re-run);
2. the paper's layer dissimilarity, max-cut phases at f = 0.1 and their scores, with bootstrap
   boundary stability over images (`analyses.phases.phase_analysis`);
3. across the 14 models: Spearman's ρ of p with the contrast and with the consensus support, n = 14
   models (each model one independent training run), with a 95% bootstrap interval over models;
   for the series, the same scores against the training epoch.

Writes ``OUT/phases.json`` (one row per model, the correlations) and ``OUT/phases_vs_p.png``,
``OUT/overtraining.png``. Raptor is fitted on the same family by ``examples/stochastic_depth_study.py
--family fashion``.

Usage::

    python examples/fashion_phases.py --out fashion-phases
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import dynamo  # noqa: E402
from analyses import phases as phasing  # noqa: E402
from analyses.statistics import correlation as spearman  # noqa: E402
from dynamo import zoo  # noqa: E402
from dynamo.partition import Partition  # noqa: E402

N_BOOTSTRAP = 100


def model_rows(out: Path, names: list[str], progress: bool) -> list[dict]:
    """Record each zoo model on its own held-out images and read its phases."""
    rows = []
    for name in names:
        card = zoo.model_card(name)
        store = out / "stores" / f"{name.removeprefix(zoo.ZOO_PREFIX)}.zarr"
        ds = dynamo.record(name, zoo.default_images(name), store, batch_size=100, progress=progress)
        summary = phasing.summarize(phasing.phase_analysis(ds, n_bootstrap=N_BOOTSTRAP, progress=False))
        training = card["training"]
        rows.append({
            "model": name,
            "dataset": training.get("dataset", "digits"),
            "depth": training["depth"],
            "p": training["drop_path_rate"],
            "seed": training["seed"],
            "epoch": (card.get("checkpoint") or {}).get("epoch", training["epochs"]),
            "series": bool(card.get("checkpoint")) or (training.get("train_limit") or 10**9) <= 1000,
            "test_accuracy": card["test_accuracy"],
            "train_accuracy": card.get("train_accuracy"),
            "partition": str(Partition(summary["partition"])),
            "contrast": summary["contrast"],
            "consensus_support": summary["consensus_support"],
            "mean_boundary_frequency": float(np.mean(summary["boundary_frequency"])) if summary["boundary_frequency"] else None,
        })
        print(f"{name}: {rows[-1]['partition']} contrast {rows[-1]['contrast']:.4f} "
              f"support {rows[-1]['consensus_support']:.2f} acc {rows[-1]['test_accuracy']}", flush=True)
    return rows


def plot_family(family: list[dict], digits: list[dict], path: Path) -> None:
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, score, label in ((axes[0], "contrast", "max-cut contrast (between − within)"),
                             (axes[1], "consensus_support", "consensus support (bootstrap over images)")):
        for seed, marker in ((0, "o"), (1, "s")):
            rows = [row for row in family if row["seed"] == seed]
            ax.plot([row["p"] for row in rows], [row[score] for row in rows], marker, label=f"Fashion, seed {seed}")
        ax.plot([row["p"] for row in digits], [row[score] for row in digits], "x", color="grey", label="digits (timm's linear p ramp; seed 0)")
        ax.set(xlabel="stochastic-depth rate p", ylabel=label)
        ax.legend(fontsize=8)
    figure.suptitle("vit-fashion-reg4 family (12 blocks): phase structure vs stochastic depth")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_series(series: list[dict], path: Path) -> None:
    series = sorted(series, key=lambda row: row["epoch"])
    figure, left = plt.subplots(figsize=(6, 4))
    epochs = [row["epoch"] for row in series]
    left.plot(epochs, [row["contrast"] for row in series], "o-", label="max-cut contrast")
    left.set(xlabel="training epoch (500 training images)", ylabel="max-cut contrast", xscale="log")
    right = left.twinx()
    right.plot(epochs, [row["test_accuracy"] for row in series], "s--", color="C1", label="test accuracy (%)")
    right.plot(epochs, [row["train_accuracy"] for row in series], "^:", color="C2", label="training-subset accuracy (%)")
    right.set(ylabel="accuracy (%)")
    handles = [*left.get_legend_handles_labels()[0], *right.get_legend_handles_labels()[0]]
    left.legend(handles, [handle.get_label() for handle in handles], loc="center right", fontsize=8)
    left.set_title("vit-fashion-reg4-n500-p0.0: over-training and phase contrast")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("fashion-phases"))
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    names = zoo.list_models()
    fashion = [name for name in names if "vit-fashion" in name]
    digits = [name for name in names if "vit-digits" in name]
    rows = model_rows(args.out, fashion + digits, progress=not args.quiet)
    family = [row for row in rows if row["dataset"] == "fashion" and row["depth"] == 12 and not row["series"]]
    series = [row for row in rows if row["series"]]
    p = np.array([row["p"] for row in family])
    result = {
        "rows": rows,
        "family_n": len(family),
        "p_vs_contrast": spearman(p, np.array([row["contrast"] for row in family])),
        "p_vs_consensus_support": spearman(p, np.array([row["consensus_support"] for row in family])),
        "accuracy_vs_contrast": spearman(np.array([row["test_accuracy"] for row in family]),
                                            np.array([row["contrast"] for row in family])),
    }
    (args.out / "phases.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_family(family, [row for row in rows if row["dataset"] == "digits"], args.out / "phases_vs_p.png")
    if series:
        plot_series(series, args.out / "overtraining.png")
    for key in ("p_vs_contrast", "p_vs_consensus_support", "accuracy_vs_contrast"):
        c = result[key]
        print(f"{key}: rho {c['rho']:.2f} [{c['low']:.2f}, {c['high']:.2f}], p = {c['p_value']:.3g}, n = {c['n']}")


if __name__ == "__main__":
    main()
