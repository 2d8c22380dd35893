"""Phase structure across the zoo's Fashion-MNIST family: stochastic depth, seeds, over-training.

The store-only half of the paper's small-scale study, with the power the digits family lacked:
every 12-block Fashion model (uniform stochastic depth p in {0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9},
seeds 0 and 1: 14 independently trained models), the 24-block model, the over-training series
(one model's checkpoints on 500 training images) and, for reference, the digits models (the
embedded default `vit-digits-reg4` among them). For each:

1. record its trajectories on its bundled held-out images (1,000 Fashion-MNIST test images, or the
   360 digits; `dynamo.record`, resumed on a re-run);
2. the paper's layer dissimilarity, max-cut phases at f = 0.1 and their scores (raw contrast and
   the scale-free relative contrast, contrast / mean dissimilarity), with bootstrap boundary
   stability over images and the smooth-gradient null (`analyses.phases.phase_analysis`);
3. across the 14 models (one point per independent training run, `analyses.statistics`): Spearman's
   ρ of p with each score (exact/Monte Carlo permutation p, Fisher-z interval), the relative contrast
   with ViT accuracy partialled out, and Wilcoxon's signed-rank test of the null excess; for the
   series (checkpoints of one run), the same scores as a within-run trend against the epoch.

Writes ``OUT/phases.json`` (one row per model, the statistics) and ``OUT/phases_vs_p.png``,
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
from analyses import statistics  # noqa: E402
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
            "mean_dissimilarity": summary["mean_dissimilarity"],
            "relative_contrast": summary["relative_contrast"],
            **{key.removeprefix("gradient_"): value for key, value in summary.items() if key.startswith("gradient_null_")},
            "consensus_support": summary["consensus_support"],
            "mean_boundary_frequency": float(np.mean(summary["boundary_frequency"])) if summary["boundary_frequency"] else None,
        })
        print(f"{name}: {rows[-1]['partition']} contrast {rows[-1]['contrast']:.4f} relative {rows[-1]['relative_contrast']:.3f} "
              f"support {rows[-1]['consensus_support']:.2f} acc {rows[-1]['test_accuracy']}; {rows[-1].get('null_conclusion')}", flush=True)
    return rows


def _text(entry: dict) -> str:
    """ρ, its interval, the permutation p and n with its unit, for a panel title."""
    interval = f"[{entry['low']:.2f}, {entry['high']:.2f}]" if np.isfinite(entry["low"]) else "(interval undefined)"
    how = "exact" if entry["p_method"].startswith("exact") else "perm."
    unit = "checkpoints of ONE run" if entry["unit"].startswith("checkpoint") else f"{entry['unit']}s"
    return f"ρ = {entry['rho']:.2f} {interval}, {how} p = {entry['p_value']:.2g}, n = {entry['n']} {unit}"


def plot_family(family: list[dict], result: dict, path: Path) -> None:
    """Raw contrast, relative contrast and the null's excess against p, one point per training run."""
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    for ax, score, label, key in ((axes[0], "contrast", "max-cut contrast (between − within)", "p_vs_contrast"),
                                  (axes[1], "relative_contrast", "relative contrast (contrast / mean dissimilarity)",
                                   "p_vs_relative_contrast"),
                                  (axes[2], "null_effect", "excess over the gradient null (relative contrast)", None)):
        for seed, marker in ((0, "o"), (1, "s")):
            rows = [row for row in family if row["seed"] == seed]
            jitter = -0.008 if seed == 0 else 0.008
            ax.plot([row["p"] + jitter for row in rows], [row[score] for row in rows], marker, label=f"seed {seed}")
            if score == "null_effect":
                ax.errorbar([row["p"] + jitter for row in rows], [row[score] for row in rows], fmt="none", color=f"C{seed}",
                            yerr=[[row[score] - row["null_low"] for row in rows], [row["null_high"] - row[score] for row in rows]])
                for row in rows:
                    if row["null_exceeds"]:
                        ax.plot(row["p"] + jitter, row[score], "*", color="k", markersize=6)
        ax.set(xlabel="stochastic-depth rate p", ylabel=label)
        if key:
            ax.set_title(_text(result[key]), fontsize=8)
        else:
            ax.axhline(0, color="k", linewidth=0.8)
            test = result["null_excess"]
            ax.set_title(f"95% bootstrap intervals over images; *: p < 0.05 (sign flips)\nmedian {test['effect']:+.3f}, "
                         f"Wilcoxon signed-rank {test['p_method']} p = {test['p_value']:.2g}, n = {test['n']} {test['unit']}s",
                         fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.suptitle("vit-fashion-reg4 family (12 blocks, one point per training run): max-cut phases (f = 0.1) vs stochastic depth")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_series(series: list[dict], result: dict, path: Path) -> None:
    """Raw and relative contrast and accuracy over the checkpoints of the one over-training run."""
    series = sorted(series, key=lambda row: row["epoch"])
    figure, left = plt.subplots(figsize=(7.2, 5.2))
    epochs = [row["epoch"] for row in series]
    left.plot(epochs, [row["contrast"] for row in series], "o-", label="max-cut contrast")
    left.plot(epochs, [row["relative_contrast"] for row in series], "D-", color="C4", label="relative contrast")
    left.set(xlabel="training epoch (log; 500 training images)", ylabel="phase score", xscale="log")
    right = left.twinx()
    right.plot(epochs, [row["test_accuracy"] for row in series], "s--", color="C1", label="test accuracy (%)")
    right.plot(epochs, [row["train_accuracy"] for row in series], "^:", color="C2", label="training-subset accuracy (%)")
    right.set(ylabel="accuracy (%)")
    handles = [*left.get_legend_handles_labels()[0], *right.get_legend_handles_labels()[0]]
    left.legend(handles, [handle.get_label() for handle in handles], loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8)
    left.set_xticks(epochs, [f"{epoch:g}" for epoch in epochs])
    left.minorticks_off()
    left.set_title(f"vit-fashion-reg4-n500-p0.0: {len(series)} checkpoints of ONE training run (a within-run trend)\n"
                   f"contrast vs epoch: {_text(result['epoch_vs_contrast'])}\n"
                   f"relative contrast vs epoch: {_text(result['epoch_vs_relative_contrast'])}", fontsize=8)
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
    column = lambda rows, key: np.array([row[key] for row in rows], dtype=float)  # noqa: E731
    result = {"rows": rows, "family_n": len(family)}
    for score in ("contrast", "relative_contrast", "mean_dissimilarity", "consensus_support"):
        result[f"p_vs_{score}"] = statistics.correlation(p, column(family, score))
    result["accuracy_vs_contrast"] = statistics.correlation(column(family, "test_accuracy"), column(family, "contrast"))
    result["p_vs_relative_contrast_given_accuracy"] = statistics.partial_correlation(
        p, column(family, "relative_contrast"), column(family, "test_accuracy"))
    result["null_excess"] = statistics.signed_rank(column(family, "null_effect"))
    result["null_exceeds"] = int(sum(bool(row["null_exceeds"]) for row in family))
    digits_family = [row for row in rows if row["dataset"] == "digits" and "reg4" not in row["model"]]
    if len(digits_family) >= 3:  # the digits stochastic-depth runs (timm's linear p ramp), one point per run
        for score in ("contrast", "relative_contrast", "mean_dissimilarity"):
            result[f"digits_p_vs_{score}"] = statistics.correlation(column(digits_family, "p"), column(digits_family, score))
    if len(series) >= 3:
        for score in ("contrast", "relative_contrast"):
            result[f"epoch_vs_{score}"] = statistics.within_run_trend(column(series, "epoch"), column(series, score))
    (args.out / "phases.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    plot_family(family, result, args.out / "phases_vs_p.png")
    if len(series) >= 3:
        plot_series(series, result, args.out / "overtraining.png")
    for key, value in result.items():
        if isinstance(value, dict):
            print(f"{key}: {json.dumps(value, default=float)}")


if __name__ == "__main__":
    main()
