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
from scipy.stats import spearmanr

__all__ = ["spearman", "verdict"]


def spearman(x, y, n_bootstrap: int = 2000, confidence: float = 0.95, seed: int = 0) -> dict:
    """Spearman's ρ of paired per-model values, its p-value, and a percentile bootstrap interval over models.

    Parameters
    ----------
    x, y : array-like, (n,)
        One value per model; pairs with a non-finite value are dropped.
    n_bootstrap : int
        Resamples of the n pairs (drawn with replacement; percentile interval). A resample whose
        values are all tied on one side has no defined ρ and is left out (`scipy.stats.bootstrap`
        cannot leave such resamples out, which with few models or tied scores leaves no interval).
    confidence : float
        Level of the interval.
    seed : int
        Seed of the resampling.

    Returns
    -------
    dict
        ``rho``, ``p_value`` (two-sided, `scipy.stats.spearmanr`), ``low``, ``high`` and ``n``
        (pairs used). All NaN but ``n`` below 3 pairs.
    """
    x, y = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size < 3:
        return {"rho": np.nan, "p_value": np.nan, "low": np.nan, "high": np.nan, "n": int(x.size)}
    rho, p_value = spearmanr(x, y)
    rng = np.random.default_rng(seed)
    with warnings.catch_warnings():  # a resample of tied values has no defined rho: dropped
        warnings.simplefilter("ignore")
        draws = [spearmanr(x[i], y[i])[0] for i in (rng.integers(0, x.size, x.size) for _ in range(n_bootstrap))]
    low, high = np.nanpercentile(draws, [50 * (1 - confidence), 50 * (1 + confidence)])
    return {"rho": float(rho), "p_value": float(p_value), "low": float(low), "high": float(high),
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
