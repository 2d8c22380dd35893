"""Re-judge a finished study's claims with `analyses.statistics`, without refitting: a before -> after verdict table.

Reads a ``study.json`` written by ``examples/stochastic_depth_study.py`` (its per-model numbers and its
old claims), recomputes the claims with the study script's own `claims` (exact permutation p,
explicit units, scale-free scores, Holm across the claims) and writes the new claims as JSON and the
table as Markdown.

Usage::

    python examples/rejudge_study.py docs/fashion_study.json --json docs/fashion_verdicts.json --markdown docs/verdicts.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import xarray as xr

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stochastic_depth_study import claims, correlations, table_from_numbers  # noqa: E402


def _number(value) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _old(claim: dict) -> str:
    parts = [f"{key} {_number(claim[key])}" for key in ("rho", "p_value", "difference", "wins", "p_better") if key in claim]
    if "low" in claim:
        parts.append(f"interval [{_number(claim['low'])}, {_number(claim['high'])}]")
    return f"{', '.join(parts)}, n = {claim.get('n', claim.get('cases'))}"


def _new(claim: dict) -> str:
    key = claim["effect_key"]
    parts = [f"{key} {_number(claim.get(key))}"]
    if "low" in claim:
        parts.append("interval undefined" if not np.isfinite(claim["low"]) else f"[{_number(claim['low'])}, {_number(claim['high'])}]")
    parts.append(f"p {_number(claim.get('p_value'))} ({claim.get('p_method', 'no test')})")
    parts.append(f"Holm p {_number(claim['p_adjusted'])}")
    return ", ".join(parts)


def table(before: list[dict], after: list[dict]) -> str:
    """The Markdown before -> after table, claim by claim in the new order (old claims matched by their order)."""
    lines = ["| # | claim (after) | before: verdict | before: numbers | after: unit, n | after: test | after: numbers | after: verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for number, (old, new) in enumerate(zip(before, after), 1):
        note = f" ({new['precondition_note']})" if new.get("precondition") is False else ""
        lines.append(f"| {number} | {new['claim']} | {old['verdict']} | {_old(old)} | {new.get('unit', '')}, n = {new.get('n')} | "
                     f"{new.get('test', '')} | {_new(new)} | **{new['verdict']}**{note} |")
    return "\n".join(lines)


def partition_table(numbers: dict, source: str) -> str:
    """The fair partition test's claims (``partition_test.json``) as a Markdown section: they supersede the study's partition claims."""
    lines = ["", "## The fair partition test (supersedes the partition claims above)", "",
             f"From `{source}`, written by `python examples/partition_test.py --out partition-test --docs docs` "
             f"([its page](partition-test.md)): {numbers['n_runs']} training runs, every contiguous partition at k = 2, "
             f"{numbers['settings']['draws']} distinct random contiguous partitions per run at k >= 3, a per-layer step budget; "
             "Holm's correction over these claims.", "",
             "| # | claim | unit, n | test | median excess | p | Holm p | verdict |", "|---|---|---|---|---|---|---|---|"]
    for number, claim in enumerate(numbers["claims"], 1):
        lines.append(f"| {number} | {claim['claim']} | {claim['unit']}, n = {claim['n']} | {claim['test']} ({claim.get('p_method', '')}) | "
                     f"{_number(claim['effect'])} | {_number(claim['p_value'])} | {_number(claim['p_adjusted'])} | **{claim['verdict']}** |")
    return "\n".join(lines) + "\n"


def study_from_numbers(numbers: dict, correlation: dict) -> xr.Dataset:
    """The part of the study Dataset that `study_figures` draws, rebuilt from a ``study.json`` (dims ``model``, ``k``, ``fit``).

    Per model: ``role``, ``drop_rate``, ``seed``, ``epoch``, ``partition_test`` (coordinates), ``vit_accuracy``,
    ``raptor_k1_r2_final``, ``phase_<score>`` and ``phase_relative_contrast``; per model and k: ``raptor_r2_final``,
    ``raptor_accuracy_ratio``, ``raptor_accuracy_surrogate``, ``partition_<score>``; per model, k and fit:
    ``baseline_r2_final`` (NaN where a fit was not made). ``correlation`` goes to the attribute ``correlations``.
    """
    models = numbers["models"]
    labels = list(models)
    ks = sorted({int(key.split("=")[1]) for row in models.values() for key in row["raptor"]})
    fits = sorted({fit for row in models.values() for per_k in row["raptor"].values() for fit in per_k["baselines_r2_final"]},
                  key=lambda fit: (fit != "fitted", fit))
    nan = lambda value: np.nan if value is None else float(value)  # noqa: E731
    per_model = lambda key: ("model", np.array([nan(models[label].get(key)) for label in labels]))  # noqa: E731
    per_k = lambda key: (("model", "k"), np.array([[nan(models[label]["raptor"][f"k={k}"].get(key)) for k in ks]  # noqa: E731
                                                   for label in labels]))
    scores = ("contrast", "cut_fraction", "normalized_cut", "silhouette", "mean_dissimilarity")
    tested = {entry["model"] for cases in (numbers.get("partition_test") or {}).values() for per in cases.values() for entry in per}
    study = xr.Dataset(
        {"vit_accuracy": per_model("vit_accuracy"), "raptor_k1_r2_final": per_model("raptor_k1_r2_final"),
         **{f"phase_{name}": per_model(f"phase_{name}") for name in scores},
         "raptor_r2_final": per_k("r2_final"), "raptor_accuracy_ratio": per_k("accuracy_ratio"),
         "raptor_accuracy_surrogate": per_k("accuracy_surrogate"),
         **{f"partition_{name}": per_k(name) for name in scores},
         "baseline_r2_final": (("model", "k", "fit"), np.array([[[nan(models[label]["raptor"][f"k={k}"]["baselines_r2_final"].get(fit))
                                                                   for fit in fits] for k in ks] for label in labels])),
         "n_heldout": numbers["n_heldout"], "n_images": numbers["n_images"]},
        coords={"model": labels, "k": ks, "fit": fits, "role": ("model", [models[label]["role"] for label in labels]),
                **{name: per_model(name) for name in ("drop_rate", "seed", "epoch")},
                "partition_test": ("model", [label in tested for label in labels])},
        attrs={"correlations": json.dumps(correlation, default=float)})
    return study.assign(phase_relative_contrast=study["phase_contrast"] / study["phase_mean_dissimilarity"])


def draw(study: xr.Dataset, out: Path, prefix: str = "") -> dict:
    """The study's figures from `study_from_numbers` as PNGs ``out/<prefix><name>.png``; returns their paths by name."""
    import matplotlib

    matplotlib.use("Agg")
    import study_figures

    from figures.output import save_figures

    def by_role(*roles):
        return study.sel(model=np.isin(study["role"].values, roles))

    figures = {
        "r2_vs_drop_rate": study_figures.plot_raptor_vs_drop_rate(study),
        "accuracy_vs_drop_rate": study_figures.plot_accuracy_vs_drop_rate(by_role("family", "untrained")),
        "score_vs_r2": study_figures.plot_score_vs_r2(by_role("family", "series"), "relative_contrast"),
        "overtraining": study_figures.plot_overtraining(study),
    }
    out.mkdir(parents=True, exist_ok=True)
    return {name: str(path) for name, path in save_figures(figures, out, prefix=prefix, dpi=120).items()}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", help="a study.json")
    parser.add_argument("--json", help="write the new claims here")
    parser.add_argument("--markdown", help="write the before -> after table here")
    parser.add_argument("--figures", help="redraw the study's figures from the JSON into this folder")
    parser.add_argument("--partition-test", help="a partition_test.json (examples/partition_test.py): its claims in a second table")
    parser.add_argument("--prefix", default="", help="file-name prefix of the figures (e.g. fashion_study_)")
    args = parser.parse_args(argv)
    numbers = json.loads(Path(args.study).read_text())
    model_table = table_from_numbers(numbers)
    correlation = correlations(model_table)
    after = claims(model_table, correlation, numbers.get("partition_test"))
    if args.json:
        Path(args.json).write_text(json.dumps({"correlations": correlation, "claims": after}, indent=1, default=float))
    text = table(numbers["claims"], after)
    if args.markdown:
        Path(args.markdown).write_text(
            "# Verdicts of the Fashion-MNIST study: before and after exact tests, units and Holm's correction\n\n"
            f"Re-judged from `{args.study}` (no refit) by `python examples/rejudge_study.py {args.study} --json "
            f"{args.json} --markdown {args.markdown}"
            f"{f' --partition-test {args.partition_test}' if args.partition_test else ''}`. After: exact permutation p where n <= 9 (Monte Carlo, 9999 resamples, "
            "beyond), Fisher-z intervals (undefined on monotone samples), one point per independent training run (the 14 "
            "stochastic-depth models; the over-training series is one run, a within-run trend), relative contrast "
            "(contrast / mean dissimilarity) as the scale-free phase score, ViT accuracy partialled out where it "
            "confounds, Holm's correction across all claims, and a verdict computed from the corrected p and the "
            "effect's direction. Claims whose premise or design fails are undecided whatever their p (the reason is given).\n\n"
            + text + "\n" + (partition_table(json.loads(Path(args.partition_test).read_text()), args.partition_test)
                             if args.partition_test else ""))
    if args.figures:
        for name, path in draw(study_from_numbers(numbers, correlation), Path(args.figures), args.prefix).items():
            print(f"{name}: {path}")
    print(text)
    return after


if __name__ == "__main__":
    main()
