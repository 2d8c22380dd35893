"""A fair partition test of Raptor on the Fashion-MNIST family, and the spread of its fit over seeds.

The paper's Fig. 3 asks whether Raptor fits better on the max-cut phases than on random partitions of depth.
This script asks it so that the answer can be trusted, on the 14 stochastic-depth models (14 independent
training runs, the unit of every test here), each on its 1,000 bundled held-out test images:

1. one held-out split per model (`dynamo.surrogates.base.split_images`, seed ``--split-seed``) shared by every fit;
   the max-cut phases (f = ``--eps``, or the exact contiguous split where max-cut is not k contiguous phases)
   are found on the training images alone;
2. the alternatives, per model and k: at k = 2 every contiguous partition (11 for 12 blocks, enumerated);
   at k >= 3, ``--draws`` distinct random contiguous partitions drawn for this model and k alone (seeded by
   both), none equal to max-cut, plus the uniform split;
3. every fit follows one recipe with a per-layer step budget (`RaptorFitter(step_budget="layer")`): a phase of
   n blocks trains n x ``--steps`` stage-1 steps, so every partition with the same k gets the same stage-1
   budget and unbalanced phases are not penalised; stage 2 trains ``--stage2-steps`` for all;
4. per model and k: max-cut's held-out final-layer R² and accuracy ratio minus the median of the
   alternatives (its excess) and its exact rank p; across the 14 runs an exact Wilcoxon signed-rank test
   of the excesses; Holm across the claims (`analyses.statistics.judge`);
5. the spread over fit seeds: max-cut fits with ``--seeds`` seeds on ``--seed-models`` (same split), their
   ε (`dynamo.surrogates.measures.epsilon`: max over layers of the mean relative error, the strict form, and
   the skill over the identity), R² and accuracy ratio — the noise floor any partition difference must clear.

Every fit is saved under ``OUT/<model>/`` and reused on a re-run with the same settings (resumable).

Usage::

    python examples/partition_test.py --out partition-test --docs docs      # the study (hours on two cores)
    python examples/partition_test.py --out /tmp/pt-fast --fast             # smoke run, a minute
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import multiprocessing
import re
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from causal_swap import FAMILY  # noqa: E402
from stochastic_depth_study import fitted, raptor_partition  # noqa: E402

import dynamo  # noqa: E402
from analyses import phases as phasing  # noqa: E402
from analyses import statistics  # noqa: E402
from dynamo import zoo  # noqa: E402
from dynamo.partition import Partition  # noqa: E402
from dynamo.serialize import derived_seed  # noqa: E402
from dynamo.store import positions_of  # noqa: E402
from dynamo.surrogates.base import split_images  # noqa: E402
from dynamo.surrogates.measures import epsilon  # noqa: E402
from dynamo.surrogates.raptor import RaptorFitter  # noqa: E402
from dynamo.surrogates.raptor.train import stopping_rule  # noqa: E402

NUMBERS = ("r2_final", "accuracy_ratio")
EPSILONS = ("epsilon", "epsilon_strict", "skill")
MAXCUT = "max-cut"
DEFAULT_IMAGES = 1000  # the bundled Fashion-MNIST test images of every zoo model


def alternatives(num_blocks: int, k: int, maxcut: Partition, draws: int, label: str) -> dict[str, Partition]:
    """The partitions max-cut is tested against, by name: every contiguous one at k = 2, else ``draws`` distinct random ones and uniform.

    The draws are seeded by the model's ``label`` and k, so no two models or ks share them, and none equals max-cut.
    """
    if k == 2:
        return {f"cut {p[0][-1]}": p for p in Partition.every_contiguous(num_blocks, k) if p != maxcut}
    possible = math.comb(num_blocks - 1, k - 1) - 1
    if draws > possible:
        raise ValueError(f"--draws {draws}: only {possible} contiguous partitions with {k} phases besides max-cut")
    rng = np.random.default_rng(derived_seed("partition test", label, k))
    found: dict[str, Partition] = {}
    while len(found) < draws:
        partition = Partition.random_contiguous(num_blocks, k, int(rng.integers(2**31)))
        if partition != maxcut and partition not in found.values():
            found[f"random {len(found)}"] = partition
    uniform = Partition.uniform(num_blocks, k)
    if uniform != maxcut and uniform not in found.values():
        found["uniform"] = uniform
    return found


@functools.lru_cache(maxsize=2)
def _model(label: str):
    return dynamo.load_model(zoo.ZOO_PREFIX + label)


def fit_one(task: dict) -> dict:
    """One fit of a task (model, k, name, partition, seed): fitted or reloaded, scored on the held-out images."""
    torch.set_num_threads(1)
    started = time.perf_counter()
    loaded = _model(task["model"])
    folder = Path(task["out"]) / task["model"]
    store = folder / "trajectories.zarr"
    ds = dynamo.open_trajectories(store)
    partition = Partition(task["partition"])
    recipe = {**task["recipe"], "seed": task["seed"]}
    fitter = fitted(store, folder / "raptor" / f"k{task['k']}-{task['name'].replace(' ', '')}-s{task['seed']}", loaded, partition, recipe)
    report = fitter.evaluate(ds, probe=False)
    held_out, _ = fitter.held_out_positions(ds)
    errors = epsilon(fitter.model_, ds, images=held_out, n_bootstrap=0).sel(token_kind="all")
    return {**{key: task[key] for key in ("model", "k", "name", "seed")}, "partition": str(partition),
            **{name: float(report.attrs[name]) for name in NUMBERS},
            **{name: float(errors[name]) for name in EPSILONS},
            "stopped_early": sum("stop" in entry for entry in fitter.history_),
            "seconds": round(time.perf_counter() - started, 1)}


def plan(args) -> tuple[list[dict], dict]:
    """Record every model, find its max-cut phases on its training images, and list the fits (max-cut and seed fits first)."""
    recipe = {"steps": args.steps, "step_budget": "layer", "stage2_steps": args.stage2_steps, "validate_every": args.validate_every,
              "patience": args.patience, "tol": args.tol, "split_seed": args.split_seed, "progress": False}
    first, seeds, rest, partitions = [], [], [], {}
    for label in args.models:
        loaded = _model(label)
        folder = Path(args.out) / label
        ds = dynamo.record(loaded, zoo.default_images(label), folder / "trajectories.zarr", limit=args.limit, batch_size=100,
                           progress=False)
        training, _ = split_images(ds["image"].values, RaptorFitter().validation_fraction, args.split_seed)
        matrix = phasing.compute(ds.isel(image=positions_of(ds, training)), "maxcut", eps=args.eps, n_bootstrap=0,
                                 null_permutations=0, progress=False)["dissimilarity"]
        recipe_here = {**recipe, "stage1_cache": str(folder / "stage1")}
        partitions[label] = {}
        for k in args.ks:
            maxcut, method = raptor_partition(matrix, k)
            others = alternatives(loaded.num_blocks, k, maxcut, args.draws, label)
            partitions[label][k] = {"method": method, MAXCUT: str(maxcut), **{name: str(p) for name, p in others.items()}}
            task = {"model": label, "k": k, "out": args.out, "recipe": recipe_here}
            first.append({**task, "name": MAXCUT, "partition": maxcut, "seed": args.seed})
            if label in args.seed_models:
                seeds += [{**task, "name": MAXCUT, "partition": maxcut, "seed": seed} for seed in range(args.seed + 1, args.seed + args.seeds)]
            rest += [{**task, "name": name, "partition": p, "seed": args.seed} for name, p in others.items()]
    # the alternatives in rounds over models, so that a study stopped early has the first of every model
    rest.sort(key=lambda task: (list(partitions[task["model"]][task["k"]]).index(task["name"]), task["k"], args.models.index(task["model"])))
    return first + seeds + rest, partitions


def run_fits(tasks: list[dict], out: Path, jobs: int) -> list[dict]:
    """Every task's row, in ``jobs`` parallel processes (in this one for 1); each row is appended to ``OUT/fits.jsonl`` as it finishes."""
    rows, log = [], out / "fits.jsonl"
    log.write_text("")
    print(f"partition test: {len(tasks)} fits on {jobs} processes", file=sys.stderr, flush=True)
    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) if jobs > 1 else None
    finished = as_completed([pool.submit(fit_one, task) for task in tasks]) if pool else (fit_one(task) for task in tasks)
    for done, result in enumerate(finished, 1):
        row = result.result() if pool else result
        rows.append(row)
        with log.open("a") as stream:
            stream.write(json.dumps(row) + "\n")
        if done % max(1, len(tasks) // 20) == 0 or done == len(tasks):
            print(f"partition test: {done}/{len(tasks)} fits", file=sys.stderr, flush=True)
    if pool:
        pool.shutdown()
    return rows


def per_case(rows: list[dict], seed: int) -> list[dict]:
    """Per (model, k, number): max-cut's value, the alternatives' median and spread, its excess and exact rank p."""
    cases = []
    for model in sorted({row["model"] for row in rows}):
        for k in sorted({row["k"] for row in rows}):
            fits = [row for row in rows if row["model"] == model and row["k"] == k and row["seed"] == seed]
            best = [row for row in fits if row["name"] == MAXCUT]
            others = [row for row in fits if row["name"] != MAXCUT]
            if not best or not others:
                continue
            for number in NUMBERS:
                value, values = best[0][number], np.array([row[number] for row in others])
                blocks = max(int(block) for block in re.findall(r"\d+", best[0]["partition"]))
                uniform = [row[number] for row in others if row["partition"] == str(Partition.uniform(blocks, k))]
                cases.append({"model": model, "k": k, "number": number, "maxcut": value, "partition": best[0]["partition"],
                              "alternatives": int(values.size), "median": float(np.median(values)), "min": float(values.min()),
                              "max": float(values.max()), "excess": float(value - np.median(values)),
                              "excess_over_uniform": float(value - uniform[0]) if uniform else np.nan,
                              "rank": int((values >= value).sum()) + 1,
                              "p_rank": float((1 + (values >= value).sum()) / (values.size + 1))})
    return cases


def claims(cases: list[dict]) -> list[dict]:
    """Max-cut beats the alternatives (per k and number) and the uniform split: one excess per training run, Wilcoxon, Holm."""
    found = []
    for number in NUMBERS:
        for k in sorted({case["k"] for case in cases}):
            excess = [case["excess"] for case in cases if case["k"] == k and case["number"] == number]
            against = "every other contiguous partition" if k == 2 else "distinct random contiguous partitions and the uniform split"
            found.append({"claim": f"max-cut phases beat {against} at k = {k} ({number})",
                          "measure": f"per run: max-cut's held-out {number} minus the alternatives' median", "k": k, "number": number,
                          **statistics.signed_rank(excess), "sign": +1, "effect_key": "effect"})
    by_model: dict[str, list[float]] = {}
    for case in cases:
        if case["number"] == "r2_final" and np.isfinite(case["excess_over_uniform"]):
            by_model.setdefault(case["model"], []).append(case["excess_over_uniform"])
    found.append({"claim": "max-cut phases beat the uniform split (r2_final)", "number": "r2_final",
                  "measure": "per run: max-cut's held-out R² minus the uniform split's, mean over the k where they differ",
                  **statistics.signed_rank([np.mean(v) for v in by_model.values()]), "sign": +1, "effect_key": "effect"})
    return statistics.judge(found)


def judged(rows: list[dict], seed: int) -> dict:
    """``cases``, ``claims`` and ``seed_spread`` of a test's fit rows."""
    cases = per_case(rows, seed)
    return {"cases": cases, "claims": claims(cases), "seed_spread": seed_spread(rows)}


def seed_spread(rows: list[dict]) -> list[dict]:
    """Per (model, k) fitted with several seeds: mean, sd, min and max over seeds of each number and ε."""
    spread = []
    for model in sorted({row["model"] for row in rows}):
        for k in sorted({row["k"] for row in rows}):
            fits = [row for row in rows if row["model"] == model and row["k"] == k and row["name"] == MAXCUT]
            if len(fits) < 2:
                continue
            entry = {"model": model, "k": k, "seeds": sorted(row["seed"] for row in fits)}
            for name in (*NUMBERS, *EPSILONS):
                values = np.array([row[name] for row in fits])
                entry[name] = {"mean": float(values.mean()), "sd": float(values.std(ddof=1)), "min": float(values.min()),
                               "max": float(values.max())}
            spread.append(entry)
    return spread


def draw(cases: list[dict], path: Path) -> Path:
    """One panel per k: each run's alternatives (grey) and max-cut (red), held-out final-layer R²."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({case["k"] for case in cases})
    models = sorted({case["model"] for case in cases}, key=FAMILY.index)
    figure, axes = plt.subplots(1, len(ks), figsize=(4.2 * len(ks), 4.2), sharey=True, squeeze=False)
    for axis, k in zip(axes[0], ks):
        for x, model in enumerate(models):
            case = next((c for c in cases if c["model"] == model and c["k"] == k and c["number"] == "r2_final"), None)
            if case is None:
                continue
            axis.plot([x, x], [case["min"], case["max"]], color="0.7", lw=4, solid_capstyle="round")
            axis.plot(x, case["median"], "_", color="0.3", ms=12)
            axis.plot(x, case["maxcut"], "o", color="tab:red", ms=5)
        axis.set_xticks(range(len(models)), [m.removeprefix("vit-fashion-reg4-") for m in models], rotation=90, fontsize=7)
        axis.set_title(f"k = {k}")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out R² at the last layer")
    axes[0][0].plot([], [], color="0.7", lw=4, label="alternatives (range)")
    axes[0][0].plot([], [], "_", color="0.3", ms=12, label="alternatives (median)")
    axes[0][0].plot([], [], "o", color="tab:red", label="max-cut")
    axes[0][0].legend(fontsize=7, loc="lower left")
    figure.suptitle(f"Raptor on max-cut phases vs other contiguous partitions, per-layer step budget ({len(models)} Fashion runs)",
                    fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _number(value, digits: int = 3) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{value:.{digits}g}"


def markdown(numbers: dict) -> str:
    """The results page of a finished test (``docs/partition-test.md``): settings, claims with verdicts, per k, seed spread."""
    settings, cases = numbers["settings"], numbers["cases"]
    fits = numbers["fits"]
    partition_fits = [row for row in fits if row["seed"] == settings["seed"]]
    recipe = RaptorFitter()
    images = settings["limit"] or DEFAULT_IMAGES
    scored = round(recipe.validation_fraction * images)
    stopping = min(recipe.validation_images, round(recipe.validation_fraction * (images - scored)))
    lines = [
        "# Results: the fair partition test of Raptor on the Fashion-MNIST family",
        "",
        "Does Raptor fit a ViT better on its max-cut phases than on other partitions of its depth (the paper's Fig. 3)?",
        f"Generated by `python examples/partition_test.py --out partition-test --docs docs` ({len(fits)} fits, "
        f"{numbers['fit_seconds'] / 3600:.1f} CPU hours on one thread per fit).",
        "",
        "## What was measured, on what",
        "",
        f"- **Models**: the {numbers['n_runs']} stochastic-depth Fashion-MNIST models of the zoo (p in {{0, 0.1, 0.2, 0.3, 0.5, 0.7, "
        "0.9}, seeds 0 and 1), each one independent training run: the unit of every test below.",
        f"- **Images**: each model's {images:,} bundled held-out Fashion-MNIST test images; one split per model shared by every fit "
        f"(seed {settings['split_seed']}): {scored} scored, {stopping} of the other {images - scored} for early stopping, the rest "
        f"trained on. The max-cut phases (f = {settings['eps']}) are found on the {images - scored} training images only.",
        f"- **Alternatives**: at k = 2 every other contiguous partition (10 of 11); at k = 3 and 4, {settings['draws']} distinct random "
        "contiguous partitions drawn for that model and k alone (seeded by both; none equal to max-cut) and the uniform split.",
        f"- **One recipe for every fit** with a per-layer step budget (`RaptorFitter(step_budget=\"layer\")`): {numbers['stopping_rule']}. "
        f"Stage 2 trains {settings['stage2_steps']} steps over all layers. Every partition of a k gets the same stage-1 budget, so "
        "unbalanced phases are not penalised.",
        "- **Numbers**: held-out R² of the rollout at the last layer (all tokens, teacher variance) and the accuracy ratio "
        "(teacher embedding → Raptor → teacher head, over the ViT's accuracy), on the 200 scored images.",
        "- **Test**: per run and k, max-cut's number minus the median of its alternatives (its excess); across the runs an exact "
        "Wilcoxon signed-rank test (two-sided); Holm's correction across the claims below; a verdict from the corrected p and "
        "the direction (`analyses.statistics.judge`).",
        "",
        f"**Budget, said plainly**: these fits are small and far from converged (median R² {np.median([r['r2_final'] for r in partition_fits]):.2f}, "
        f"median accuracy ratio {np.median([r['accuracy_ratio'] for r in partition_fits]):.2f}): the test asks which partition "
        "trains best at an equal small budget, not which converges to the better surrogate.",
        "",
        "## Verdicts",
        "",
        "| # | claim | unit, n | median excess | p (exact) | Holm p | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for index, claim in enumerate(numbers["claims"], 1):
        lines.append(f"| {index} | {claim['claim']} | {claim['unit']}, {claim['n']} | {claim['effect']:+.4f} | {_number(claim['p_value'])} | "
                     f"{_number(claim['p_adjusted'])} | **{claim['verdict']}** |")
    fallback = [f"{label.removeprefix('vit-fashion-reg4-')} k = {k}" for label, per_k in numbers["partitions"].items()
                for k, entry in per_k.items() if entry["method"] != "maxcut"]
    lines += ["", "Where max-cut's own partition is not k contiguous phases, the exact contiguous split into k phases stands in "
              f"for it ({', '.join(fallback) if fallback else 'never here'}).",
              "", "![max-cut against the alternatives](partition_test.png)", "", "## Per k", "",
              "| k | number | runs where max-cut beats the median | max-cut rank 1 | median max-cut | median of the alternatives' medians | median rank p |",
              "|---|---|---|---|---|---|---|"]
    for k in settings["ks"]:
        for number in NUMBERS:
            rows = [case for case in cases if case["k"] == k and case["number"] == number]
            if rows:
                lines.append(f"| {k} | {number} | {sum(case['excess'] > 0 for case in rows)} of {len(rows)} | "
                             f"{sum(case['rank'] == 1 for case in rows)} | {np.median([c['maxcut'] for c in rows]):.3f} | "
                             f"{np.median([c['median'] for c in rows]):.3f} | {np.median([c['p_rank'] for c in rows]):.2f} |")
    lines += ["", "## The spread over fit seeds", "",
              f"Max-cut fits with seeds {settings['seed']}..{settings['seed'] + settings['seeds'] - 1} (same split) on "
              f"{', '.join(settings['seed_models'])}: ε is the ε-BRH's max over layers of the mean relative error "
              "(`dynamo.surrogates.measures.epsilon`, all tokens, scored images), ε strict the mean over images of the max over layers, "
              "skill 1 − ε / ε of the identity rung.", "",
              "| model | k | R² mean ± sd | accuracy ratio mean ± sd | ε mean ± sd | ε strict mean ± sd | skill mean ± sd |",
              "|---|---|---|---|---|---|---|"]
    for entry in numbers["seed_spread"]:
        cells = [f"{entry[name]['mean']:.3f} ± {entry[name]['sd']:.3f}" for name in (*NUMBERS, *EPSILONS)]
        lines.append(f"| {entry['model'].removeprefix('vit-fashion-reg4-')} | {entry['k']} | " + " | ".join(cells) + " |")
    sds = [entry["r2_final"]["sd"] for entry in numbers["seed_spread"]]
    excess = [abs(case["excess"]) for case in cases if case["number"] == "r2_final"]
    if sds and excess:
        lines += ["", f"The seed sd of R² (median {np.median(sds):.4f}) against the median |excess| of max-cut over its alternatives "
                  f"({np.median(excess):.4f}): a per-run difference smaller than the seed spread is noise of one fit."]
    return "\n".join(lines) + "\n"


DOCS_FILES = ("partition_test.json", "partition_test.png", "partition-test.md")


def write_docs(numbers: dict, out: Path, docs: str | None = None) -> None:
    """`DOCS_FILES` into ``out``, and copies of them into ``docs`` when given."""
    (out / "partition_test.json").write_text(json.dumps(numbers, indent=2))
    draw(numbers["cases"], out / "partition_test.png")
    (out / "partition-test.md").write_text(markdown(numbers))
    if docs:
        Path(docs).mkdir(parents=True, exist_ok=True)
        for name in DOCS_FILES:
            shutil.copyfile(out / name, Path(docs) / name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="partition-test", help="output folder (fits reused on a re-run)")
    parser.add_argument("--docs", default=None, help="also write partition_test.json and partition_test.png here")
    parser.add_argument("--models", nargs="+", default=FAMILY, help="zoo models (one training run each)")
    parser.add_argument("--ks", nargs="+", type=int, default=[2, 3, 4], help="Raptor block counts")
    parser.add_argument("--draws", type=int, default=10, help="distinct random contiguous partitions per model at k >= 3")
    parser.add_argument("--steps", type=int, default=8, help="stage-1 steps per block of a phase (the per-layer budget)")
    parser.add_argument("--stage2-steps", type=int, default=48, help="stage-2 steps, the same for every fit")
    parser.add_argument("--validate-every", type=int, default=16, help="early-stopping R² every this many steps")
    parser.add_argument("--patience", type=int, default=3, help="stop a segment after this many validations without gain")
    parser.add_argument("--tol", type=float, default=1e-3, help="the early-stopping R² gain that counts")
    parser.add_argument("--eps", type=float, default=0.1, help="max-cut fraction f")
    parser.add_argument("--seed", type=int, default=0, help="the fit seed of the partition test")
    parser.add_argument("--seeds", type=int, default=3, help="fit seeds of the seed spread (seed, seed + 1, ...)")
    parser.add_argument("--seed-models", nargs="*", default=["vit-fashion-reg4-p0.0", "vit-fashion-reg4-p0.5", "vit-fashion-reg4-p0.9"],
                        help="models of the seed spread")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the held-out split every fit of a model shares")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N images (default all 1,000)")
    parser.add_argument("--jobs", type=int, default=2, help="fits in parallel processes (one thread each)")
    parser.add_argument("--report-only", action="store_true", help="recompute the statistics from OUT/partition_test.json and "
                        "rewrite OUT's and --docs' pages, no fit")
    parser.add_argument("--fast", action="store_true", help="smoke run: one model, k = 2 and 3, two draws, 1 step per layer, 64 images")
    return parser


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.fast:
        args.models, args.ks, args.draws, args.steps, args.stage2_steps, args.limit = FAMILY[:1], [2, 3], 2, 1, 2, args.limit or 64
        args.seed_models, args.seeds = FAMILY[:1], 2
    out = Path(args.out)
    if args.report_only:  # the statistics recomputed from the saved fits, with this code
        numbers = json.loads((out / "partition_test.json").read_text())
        numbers.update(judged(numbers["fits"], numbers["settings"]["seed"]))
        write_docs(numbers, out, args.docs)
        return _printed(numbers)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tasks, partitions = plan(args)
    rows = run_fits(tasks, out, args.jobs)
    rule = stopping_rule(RaptorFitter(steps=args.steps, step_budget="layer", stage2_steps=args.stage2_steps,
                                      validate_every=args.validate_every, patience=args.patience, tol=args.tol))
    numbers = {"settings": {key: value for key, value in vars(args).items() if key not in ("out", "docs")},
               "stopping_rule": rule, "unit": "training run", "n_runs": len(args.models), "partitions": partitions,
               **judged(rows, args.seed), "fits": rows,
               "seconds": round(time.perf_counter() - started, 1),
               "fit_seconds": round(sum(row["seconds"] for row in rows), 1)}
    write_docs(numbers, out, args.docs)
    return _printed(numbers)


def _printed(numbers: dict) -> dict:
    for claim in numbers["claims"]:
        print(f"{claim['verdict']:>10}  {claim['claim']}: median excess {claim['effect']:+.4f}, n = {claim['n']}, "
              f"p = {claim['p_value']:.3g}, Holm {claim['p_adjusted']:.3g}")
    return numbers


if __name__ == "__main__":
    main()
