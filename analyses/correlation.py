"""Rank correlation across independent models, with a bootstrap interval and a verdict on a claimed sign.

Studies over a family of models (`examples/stochastic_depth_study.py`, `examples/fashion_phases.py`)
ask whether one per-model number rises with another. Each model is one independent training run,
so n counts models, and the interval resamples models (pairs), not images or model × k rows.

    spearman(p, contrast)            # {"rho", "p_value", "low", "high", "n"}
    verdict(spearman(p, r2), +1)     # "reproduced" / "refuted" / "undecided"
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.stats import bootstrap, spearmanr

__all__ = ["spearman", "verdict"]


def spearman(x, y, n_bootstrap: int = 2000, confidence: float = 0.95, seed: int = 0) -> dict:
    """Spearman's ρ of paired per-model values, its p-value, and a percentile bootstrap interval over models.

    Parameters
    ----------
    x, y : array-like, (n,)
        One value per model; pairs with a non-finite value are dropped.
    n_bootstrap : int
        Resamples of the n pairs (`scipy.stats.bootstrap`, paired, percentile method).
    confidence : float
        Level of the interval.
    seed : int
        Seed of the resampling.

    Returns
    -------
    dict
        ``rho``, ``p_value`` (two-sided, `scipy.stats.spearmanr`), ``low``, ``high`` (NaN where
        a resample has no spread) and ``n`` (pairs used). All NaN but ``n`` below 3 pairs.
    """
    x, y = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size < 3:
        return {"rho": np.nan, "p_value": np.nan, "low": np.nan, "high": np.nan, "n": int(x.size)}
    rho, p_value = spearmanr(x, y)
    with warnings.catch_warnings():  # a resample of few models may repeat one pair: rho undefined there, dropped
        warnings.simplefilter("ignore")
        interval = bootstrap((x, y), lambda a, b: spearmanr(a, b)[0], paired=True, vectorized=False,
                             n_resamples=n_bootstrap, confidence_level=confidence, method="percentile",
                             random_state=np.random.default_rng(seed)).confidence_interval
    return {"rho": float(rho), "p_value": float(p_value), "low": float(interval.low), "high": float(interval.high),
            "n": int(x.size)}


def verdict(correlation: dict, sign: int) -> str:
    """A claimed direction of a correlation, judged by its interval.

    Parameters
    ----------
    correlation : dict
        As `spearman` returns.
    sign : int
        +1 if the claim is that the two rise together, -1 if one falls as the other rises.

    Returns
    -------
    str
        ``"reproduced"`` when the whole interval has the claimed sign, ``"refuted"`` when it has the
        opposite sign, ``"undecided"`` when it contains 0 (or is undefined).
    """
    low, high = sign * correlation["low"], sign * correlation["high"]
    if not (np.isfinite(low) and np.isfinite(high)):
        return "undecided"
    if min(low, high) > 0:
        return "reproduced"
    if max(low, high) < 0:
        return "refuted"
    return "undecided"
