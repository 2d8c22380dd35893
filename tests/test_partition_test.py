"""The fair partition test (examples/partition_test.py): its alternatives, its per-run statistics, and `Partition.every_contiguous`."""

from __future__ import annotations

import importlib.util
import itertools
import sys
from pathlib import Path

import numpy as np
import pytest

from dynamo.partition import Partition

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "partition_test.py"


@pytest.fixture(scope="module")
def script():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("partition_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("num_blocks, k", [(5, 1), (6, 2), (7, 3), (8, 4), (12, 3)])
def test_every_contiguous_partition_is_enumerated_once(num_blocks, k):
    """Brute force: every labelling of blocks 1..L by phases 0..k-1 that never decreases and uses each phase."""
    brute = set()
    for labels in itertools.product(range(k), repeat=num_blocks):
        if list(labels) == sorted(labels) and set(labels) == set(range(k)):
            brute.add(str(Partition([[b + 1 for b in range(num_blocks) if labels[b] == p] for p in range(k)])))
    found = [str(p) for p in Partition.every_contiguous(num_blocks, k)]
    assert len(found) == len(set(found)) == len(brute) and set(found) == brute


def test_alternatives_are_every_other_partition_at_k2_and_distinct_per_model_draws_above(script):
    maxcut = Partition.from_thresholds([4], 12)
    at_two = script.alternatives(12, 2, maxcut, 10, "model a")
    assert len(at_two) == 10 and maxcut not in at_two.values()
    assert {str(p) for p in at_two.values()} | {str(maxcut)} == {str(p) for p in Partition.every_contiguous(12, 2)}
    draws = {(label, k): script.alternatives(12, k, Partition.from_thresholds([3, 9, 10][: k - 1], 12), 10, label)
             for label in ("model a", "model b") for k in (3, 4)}
    for found in draws.values():
        drawn = [p for name, p in found.items() if name.startswith("random")]
        assert len(drawn) == 10 and len({str(p) for p in drawn}) == 10 and all(p.is_contiguous for p in drawn)
    for k in (3, 4):  # each model draws its own partitions
        assert list(draws["model a", k].values()) != list(draws["model b", k].values())
    assert script.alternatives(12, 3, Partition.uniform(12, 3), 10, "model a") == script.alternatives(12, 3, Partition.uniform(12, 3), 10, "model a")
    with pytest.raises(ValueError, match="only 2 contiguous partitions with 3 phases besides max-cut"):
        script.alternatives(4, 3, Partition.uniform(4, 3), 3, "model a")


def _rows(models: int, maxcut_gain: float, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for m in range(models):
        for k in (2, 3):
            others = list(Partition.every_contiguous(12, k))[:6]
            for i, p in enumerate(others):
                value = 0.8 + 0.01 * rng.standard_normal() + (maxcut_gain if i == 0 else 0.0)
                rows.append({"model": f"m{m}", "k": k, "name": "max-cut" if i == 0 else f"alt {i}", "seed": 0, "partition": str(p),
                             "r2_final": value, "accuracy_ratio": value, "epsilon": 1 - value, "epsilon_strict": 1 - value, "skill": value})
    return rows


def test_per_run_excess_and_exact_wilcoxon_give_the_verdict(script):
    """Max-cut best in every one of 14 runs: excess > 0 and exact p = 2 / 2**14 per claim; no gain: never reproduced."""
    cases = script.per_case(_rows(14, 0.2), seed=0)
    assert all(case["rank"] == 1 and case["excess"] > 0 and case["alternatives"] == 5 for case in cases)
    assert all(case["p_rank"] == pytest.approx(1 / 6) for case in cases)
    found = script.claims(cases)
    assert [claim["n"] for claim in found[:4]] == [14] * 4
    assert all(claim["p_value"] == pytest.approx(2 / 2**14) for claim in found[:4])
    assert all(claim["verdict"] == "reproduced" for claim in found[:4])
    assert "Holm" in found[0]["correction"]
    null = script.claims(script.per_case(_rows(14, 0.0, seed=1), seed=0))
    assert not any(claim["verdict"] == "reproduced" for claim in null)


def test_seed_spread_is_over_the_max_cut_fits_of_several_seeds(script):
    rows = [{"model": "m", "k": 2, "name": "max-cut", "seed": s, "r2_final": v, "accuracy_ratio": v, "epsilon": v, "epsilon_strict": v,
             "skill": v} for s, v in enumerate([0.7, 0.8, 0.9])]
    rows.append({**rows[0], "name": "alt", "seed": 0})
    (entry,) = script.seed_spread(rows)
    assert entry["seeds"] == [0, 1, 2]
    assert entry["r2_final"]["mean"] == pytest.approx(0.8) and entry["r2_final"]["sd"] == pytest.approx(0.1)


def test_the_results_page_carries_the_computed_verdicts(script):
    rows = _rows(14, 0.2)
    cases = script.per_case(rows, seed=0)
    numbers = {"settings": {**vars(script.build_parser().parse_args([])), "ks": [2, 3]}, "cases": cases, "fits": rows,
               "claims": script.claims(cases), "seed_spread": script.seed_spread(rows), "n_runs": 14, "fit_seconds": 3600.0,
               "partitions": {"m0": {2: {"method": "maxcut"}, 3: {"method": "contiguous"}}},
               "stopping_rule": "a rule"}
    page = script.markdown(numbers)
    assert page.count("**reproduced**") == sum(claim["verdict"] == "reproduced" for claim in numbers["claims"]) > 0
    assert "1,000 bundled" in page and "200 scored, 128 of the other 800 for early stopping" in page
    assert "stands in for it (m0 k = 3)" in page


def test_the_smoke_run_fits_every_alternative_and_writes_its_page(script, tmp_path):
    """--fast on one run: k = 2 against all 10 other contiguous partitions, k = 3 against 2 draws and uniform, a second seed."""
    numbers = script.main(["--out", str(tmp_path / "pt"), "--docs", str(tmp_path), "--fast", "--jobs", "1"])
    fits = numbers["fits"]
    assert sum(row["k"] == 2 and row["seed"] == 0 for row in fits) == 11
    assert len({row["partition"] for row in fits if row["k"] == 2}) == 11
    assert sum(row["k"] == 3 and row["seed"] == 0 for row in fits) == 4
    assert sorted(row["seed"] for row in fits if row["name"] == "max-cut") == [0, 0, 1, 1]
    assert {case["alternatives"] for case in numbers["cases"]} == {10, 3}
    assert all(np.isfinite(row["r2_final"]) and np.isfinite(row["epsilon"]) for row in fits)
    assert [claim["n"] for claim in numbers["claims"]] == [1] * len(numbers["claims"])
    assert all(claim["verdict"] == "undecided" for claim in numbers["claims"])  # one run has no test
    assert (tmp_path / "partition-test.md").read_text().startswith("# Results: the fair partition test")
    assert (tmp_path / "partition_test.png").stat().st_size > 10_000
    again = script.main(["--out", str(tmp_path / "pt"), "--docs", str(tmp_path / "again"), "--report-only"])  # no fit
    assert [(c["claim"], c["verdict"], c["n"]) for c in again["claims"]] == [(c["claim"], c["verdict"], c["n"]) for c in numbers["claims"]]
    assert (tmp_path / "again" / "partition-test.md").read_text() == (tmp_path / "partition-test.md").read_text()
