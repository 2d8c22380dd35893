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


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", help="a study.json")
    parser.add_argument("--json", help="write the new claims here")
    parser.add_argument("--markdown", help="write the before -> after table here")
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
            "# Verdicts of the Fashion-MNIST study, before and after the statistics of issue 30\n\n"
            f"Re-judged from `{args.study}` (no refit) by `python examples/rejudge_study.py {args.study} --json "
            f"{args.json} --markdown {args.markdown}`. After: exact permutation p where n <= 9 (Monte Carlo, 9999 resamples, "
            "beyond), Fisher-z intervals (undefined on monotone samples), one point per independent training run (the 14 "
            "stochastic-depth models; the over-training series is one run, a within-run trend), relative contrast "
            "(contrast / mean dissimilarity) as the scale-free phase score, ViT accuracy partialled out where it "
            "confounds, Holm's correction across all claims, and a verdict computed from the corrected p and the "
            "effect's direction. Claims whose premise or design fails are undecided whatever their p (the reason is given).\n\n"
            + text + "\n")
    print(text)
    return after


if __name__ == "__main__":
    main()
