"""Rank correlation over models (analyses.correlation): scipy's rho, a bootstrap interval that resamples pairs, verdicts."""

import numpy as np
import pytest
from scipy.stats import spearmanr

from analyses.correlation import spearman, verdict


def test_rho_is_scipys_and_the_interval_resamples_pairs():
    rng = np.random.default_rng(0)
    x = np.arange(14.0)
    y = x + rng.normal(0, 4, 14)
    result = spearman(x, y, n_bootstrap=500)
    assert result["rho"] == pytest.approx(spearmanr(x, y)[0]) and result["p_value"] == pytest.approx(spearmanr(x, y)[1])
    assert result["low"] < result["rho"] < result["high"] and result["n"] == 14
    # ties: a constant resample has no rho and is dropped, not allowed to void the interval
    tied = spearman(x, np.r_[np.ones(10), np.arange(4.0)], n_bootstrap=500)
    assert np.isfinite(tied["low"]) and np.isfinite(tied["high"])
    assert spearman(x, y, n_bootstrap=500) == result  # seeded


def test_non_finite_pairs_are_dropped_and_too_few_is_nan():
    result = spearman([1, 2, np.nan, 4, 5], [1, 3, 2, np.inf, 4])
    assert result["n"] == 3 and result["rho"] == pytest.approx(spearmanr([1, 2, 5], [1, 3, 4])[0])
    assert np.isnan(spearman([1, 2], [2, 1])["rho"])


def test_verdicts_follow_the_interval_and_the_claimed_sign():
    assert verdict({"low": 0.2, "high": 0.9}, +1) == "reproduced"
    assert verdict({"low": 0.2, "high": 0.9}, -1) == "refuted"
    assert verdict({"low": -0.9, "high": -0.1}, -1) == "reproduced"
    assert verdict({"low": -0.3, "high": 0.6}, +1) == "undecided"
    assert verdict({"low": np.nan, "high": np.nan}, +1) == "undecided"
