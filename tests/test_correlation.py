"""analyses.statistics: exact permutation p-values, intervals that do not degenerate, corrections, three verdicts."""

import itertools
import math

import numpy as np
import pytest
from scipy import stats
from scipy.stats import kendalltau, spearmanr

from analyses.statistics import (
    VERDICTS,
    adjust,
    correlation,
    judge,
    partial_correlation,
    sign_test,
    signed_rank,
    verdict,
    within_run_trend,
)


def test_spearman_exact_p_for_five_perfectly_ordered_runs():
    result = correlation([1, 2, 3, 4, 5], [5, 4, 3, 2, 1])
    assert result["rho"] == -1.0
    assert result["p_value"] == pytest.approx(2 / math.factorial(5))  # 0.0167, not scipy's asymptotic 1.4e-24
    assert round(result["p_value"], 4) == 0.0167
    assert result["p_method"].startswith("exact") and result["unit"] == "training run"
    # a monotone sample has no Fisher-z interval: undefined, never [-1, -1]
    assert np.isnan(result["low"]) and np.isnan(result["high"]) and "undefined" in result["interval"]


def test_a_monotone_sample_of_three_is_undecided():
    result = correlation([1, 2, 3], [2, 5, 9])
    assert result["rho"] == 1.0 and result["p_value"] == pytest.approx(1 / 3)  # 2 of 6 pairings as extreme
    assert verdict(result["p_value"], result["rho"], +1) == "undecided"
    [claim] = judge([{**result, "sign": +1}])
    assert claim["verdict"] == "undecided"


def test_exact_p_matches_brute_force_and_scipys_exact_kendall():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=7), rng.normal(size=7)
    rho = spearmanr(x, y)[0]
    from itertools import permutations

    extreme = sum(abs(spearmanr(x, np.array(p))[0]) >= abs(rho) - 1e-12 for p in permutations(y))
    assert correlation(x, y)["p_value"] == pytest.approx(extreme / math.factorial(7))
    assert correlation(x, y, "kendall")["p_value"] == pytest.approx(kendalltau(x, y, method="exact").pvalue)
    assert correlation(x, y, "kendall")["rho"] == pytest.approx(kendalltau(x, y)[0])


def test_rho_is_scipys_and_the_interval_contains_it():
    rng = np.random.default_rng(0)
    x = np.arange(14.0)
    y = x + rng.normal(0, 4, 14)
    result = correlation(x, y)
    assert result["rho"] == pytest.approx(spearmanr(x, y)[0]) and result["n"] == 14
    assert result["p_value"] == pytest.approx(spearmanr(x, y)[1], abs=0.01)  # Monte Carlo, 9999 resamples
    assert "Monte Carlo" in result["p_method"] and "9999" in result["p_method"]
    assert result["low"] < result["rho"] < result["high"]
    # ties: still a defined interval
    tied = correlation(x, np.r_[np.ones(10), np.arange(4.0)])
    assert np.isfinite(tied["low"]) and np.isfinite(tied["high"])
    assert correlation(x, y) == result  # seeded


def test_non_finite_pairs_are_dropped_and_too_few_is_nan():
    result = correlation([1, 2, np.nan, 4, 5], [1, 3, 2, np.inf, 4])
    assert result["n"] == 3 and result["rho"] == pytest.approx(spearmanr([1, 2, 5], [1, 3, 4])[0])
    assert np.isnan(correlation([1, 2], [2, 1])["rho"])


def test_a_checkpoint_series_is_one_run():
    trend = within_run_trend([5, 10, 20, 40, 100], [0.3, 0.25, 0.2, 0.22, 0.1])
    assert trend["n_runs"] == 1 and trend["unit"] == "checkpoint of one training run" and trend["n"] == 5


def test_partial_correlation_removes_a_shared_confound():
    rng = np.random.default_rng(1)
    accuracy = rng.normal(size=30)
    x, y = accuracy + 0.3 * rng.normal(size=30), accuracy + 0.3 * rng.normal(size=30)
    assert correlation(x, y)["p_value"] < 0.001
    partial = partial_correlation(x, y, accuracy)
    assert abs(partial["rho"]) < 0.4 and partial["p_value"] > 0.05


def test_holm_and_bh():
    p = [0.01, 0.04, 0.03, 0.005]
    np.testing.assert_allclose(adjust(p), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(adjust(p, "bh"), [0.02, 0.04, 0.04, 0.02])
    assert np.isnan(adjust([np.nan, 0.01])[0]) and adjust([np.nan, 0.01])[1] == 0.01
    # the pair: p = 0.008 and 0.014 among 11 claims do not survive Holm
    assert (adjust([0.008, 0.014, *[0.5] * 9])[:2] > 0.05).all()


def test_verdicts_follow_the_corrected_p_and_the_claimed_sign():
    assert verdict(0.01, 0.7, +1) == "reproduced"
    assert verdict(0.01, 0.7, -1) == "refuted"
    assert verdict(0.01, -0.7, -1) == "reproduced"
    assert verdict(0.2, 0.9, +1) == "undecided"
    assert verdict(np.nan, 0.9, +1) == "undecided"
    claims = judge([{"p_value": 0.001, "rho": 0.8, "sign": +1}, {"p_value": 0.03, "rho": 0.8, "sign": +1},
                    {"p_value": 0.001, "rho": 0.8, "sign": +1, "precondition": False}, {"p_value": 0.5, "rho": 0.1, "sign": +1}])
    # Holm over 4 claims: 0.03 is third smallest, 0.03 x 2 = 0.06 > 0.05; a failed premise is undecided whatever its p
    assert [c["verdict"] for c in claims] == ["reproduced", "undecided", "undecided", "undecided"]
    assert {c["verdict"] for c in claims} <= set(VERDICTS)


def test_signed_ranks_with_ties_are_exact_by_enumerating_every_sign():
    """Tied differences (accuracies on a finite image set): p is the share of the 2**n sign assignments whose
    signed-rank sum is at least as extreme, counted here by brute force."""
    values = np.array([0.1, 0.1, 0.2, -0.05, 0.3, 0.1, 0.2, 0.15, 0.1, -0.1])
    result = signed_rank(values)
    ranks = stats.rankdata(np.abs(values))
    observed = ranks[values > 0].sum()
    sums = np.array([ranks[np.array(signs) > 0].sum() for signs in itertools.product([-1, 1], repeat=values.size)])
    centre = ranks.sum() / 2
    brute = np.mean(np.abs(sums - centre) >= abs(observed - centre) - 1e-9)
    assert result["p_value"] == pytest.approx(brute) and "exact sign-flip" in result["p_method"]


def test_sign_and_signed_rank_tests_are_exact():
    assert sign_test(10, 10)["p_value"] == pytest.approx(2 / 2**10)
    result = signed_rank(np.arange(1.0, 7.0))  # six positive differences, distinct ranks
    assert result["p_value"] == pytest.approx(2 / 2**6) and result["p_method"] == "exact"
