"""Statistics for a study's claims: permutation correlations with an explicit unit (one point per independent
training run), Fisher-z intervals that are NaN where they would degenerate, Holm / Benjamini–Hochberg corrections
and computed verdicts."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

__all__ = ["EXACT_MAX_N", "VERDICTS", "adjust", "correlation", "judge", "partial_correlation", "sign_test", "signed_rank",
           "verdict", "within_run_trend"]

VERDICTS = ("reproduced", "refuted", "undecided")
EXACT_MAX_N = 9  # 9! = 362,880 pairings, enumerated; beyond, Monte Carlo
SIGN_FLIP_MAX_N = 16  # 2**16 sign assignments, enumerated, for tied signed ranks
RUN = "training run"
CHECKPOINT = "checkpoint of one training run"
# standard errors of Fisher's z of a rank correlation (Fieller, Hartley & Pearson 1957): (scale, dof offset)
FISHER_SE = {"spearman": (1.06, 3), "kendall": (0.437, 4), "pearson": (1.0, 3)}


def _pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r along the last axis (broadcast); NaN where a side is constant."""
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    denominator = np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (a * b).sum(-1) / np.where(denominator > 0, denominator, 1), np.nan)


def _kendall(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Kendall's tau-b along the last axis (broadcast)."""
    sa = np.sign(a[..., :, None] - a[..., None, :])
    sb = np.sign(b[..., :, None] - b[..., None, :])
    concordance = (sa * sb).sum((-1, -2))
    denominator = np.sqrt(np.abs(sa).sum((-1, -2)) * np.abs(sb).sum((-1, -2)))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, concordance / np.where(denominator > 0, denominator, 1), np.nan)


def _statistic(method: str):
    if method == "spearman":
        return lambda a, b: _pearson(stats.rankdata(a, axis=-1), stats.rankdata(b, axis=-1))
    if method == "kendall":
        return _kendall
    if method == "pearson":
        return _pearson
    raise ValueError(f"unknown method {method!r}; choose spearman, kendall or pearson")


def _permutation_p(x: np.ndarray, y: np.ndarray, statistic, alternative: str, n_resamples: int, seed: int) -> tuple[float, str]:
    """p of ``statistic(x, y)`` over the pairings of x with y: exact up to `EXACT_MAX_N`, else Monte Carlo."""
    n = x.size
    exact = n <= EXACT_MAX_N
    result = stats.permutation_test(
        (x,), lambda a, axis: statistic(np.moveaxis(a, axis, -1), y), permutation_type="pairings", vectorized=True,
        n_resamples=np.inf if exact else n_resamples, alternative=alternative, random_state=seed,
        batch=max(1, 2_000_000 // max(1, n * n)),
    )
    method = (f"exact permutation ({math.factorial(n)} pairings)" if exact
              else f"Monte Carlo permutation ({n_resamples} resamples, p = (1 + #)/(resamples + 1))")
    return float(result.pvalue), method


def _fisher_interval(r: float, n: int, method: str, confidence: float, covariates: int = 0) -> tuple[float, float, str]:
    scale, offset = FISHER_SE[method]
    dof = n - offset - covariates
    if not np.isfinite(r):
        return np.nan, np.nan, "undefined: no correlation"
    if dof <= 0:
        return np.nan, np.nan, f"undefined: n = {n} is too few for a Fisher-z interval"
    if abs(r) >= 1:
        return np.nan, np.nan, f"undefined: the sample is exactly monotone (r = {r:+.0f}), a Fisher-z interval degenerates"
    half = stats.norm.ppf(0.5 + confidence / 2) * math.sqrt(scale / dof)
    z = math.atanh(r)
    return math.tanh(z - half), math.tanh(z + half), f"Fisher z, SE sqrt({scale}/(n - {offset + covariates}))"


def _paired(x, y, *others) -> list[np.ndarray]:
    arrays = [np.asarray(a, dtype=float).ravel() for a in (x, y, *others)]
    if len({a.size for a in arrays}) != 1:
        raise ValueError(f"paired values must have one length, got {[a.size for a in arrays]}")
    keep = np.logical_and.reduce([np.isfinite(a) for a in arrays])
    return [a[keep] for a in arrays]


def _correlated(x, y, statistic, method: str, base: dict, constant: str, alternative: str, n_resamples: int,
                confidence: float, seed: int, covariates: int = 0) -> dict:
    """`correlation`'s result for paired values: the coefficient, its permutation p and its Fisher-z interval."""
    rho = float(statistic(x, y))
    if not np.isfinite(rho):
        p_value, p_method = np.nan, f"none: {constant}"
    else:
        p_value, p_method = _permutation_p(x, y, statistic, alternative, n_resamples, seed)
    low, high, how = _fisher_interval(rho, x.size, method, confidence, covariates)
    return {"rho": rho, "p_value": p_value, "p_method": p_method, "low": low, "high": high, "interval": how, **base}


def _too_few(base: dict, what: str) -> dict:
    return {"rho": np.nan, "p_value": np.nan, "p_method": f"none: fewer than {what}", "low": np.nan, "high": np.nan,
            "interval": f"undefined: fewer than {what}", **base}


def correlation(x, y, method: str = "spearman", *, unit: str = RUN, alternative: str = "two-sided", n_resamples: int = 9999,
                confidence: float = 0.95, seed: int = 0) -> dict:
    """A rank (or Pearson) correlation of paired values with a permutation p-value and a Fisher-z interval.

    The p-value is exact over all n! pairings up to `EXACT_MAX_N` points, else Monte Carlo with ``n_resamples``.

    Parameters
    ----------
    x, y : array-like, (n,)
        One value per unit; pairs with a non-finite value are dropped.
    method : {"spearman", "kendall", "pearson"}
    unit : str
        What one point is (default ``"training run"``: one independent run per point).

    Returns
    -------
    dict
        ``rho`` (the coefficient), ``p_value``, ``p_method``, ``low``, ``high`` (NaN when
        undefined), ``interval`` (how it was made or why it is undefined), ``n``, ``unit``,
        ``test``. Below 3 pairs everything but ``n`` is NaN.
    """
    x, y = _paired(x, y)
    base = {"n": int(x.size), "unit": unit, "test": f"{method} correlation, {alternative}"}
    if x.size < 3:
        return _too_few(base, "3 pairs")
    return _correlated(x, y, _statistic(method), method, base, "a side is constant", alternative, n_resamples,
                       confidence, seed)


def within_run_trend(steps, values, method: str = "spearman", **options) -> dict:
    """A trend of ``values`` along the ``steps`` of ONE training run: `correlation` with the checkpoint as its unit
    and ``n_runs`` = 1 (its p tests this run's order; a claim about training in general needs several runs)."""
    return {**correlation(steps, values, method, unit=CHECKPOINT, **options), "n_runs": 1}


def partial_correlation(x, y, covariate, method: str = "spearman", *, unit: str = RUN, alternative: str = "two-sided",
                        n_resamples: int = 9999, confidence: float = 0.95, seed: int = 0) -> dict:
    """The correlation of x and y with a known confound (e.g. accuracy) partialled out.

    For Spearman the values are ranked first; each side is regressed (least squares, with an intercept) on
    the covariate and the residuals are correlated (Pearson), their pairing permuted for p; the Fisher-z
    interval has one dof less. ``method`` is ``"spearman"`` or ``"pearson"``; the rest as `correlation`.
    """
    if method not in ("spearman", "pearson"):
        raise ValueError(f"partial correlation supports spearman or pearson, not {method!r}")
    x, y, z = _paired(x, y, covariate)
    base = {"n": int(x.size), "unit": unit, "test": f"partial {method} correlation given a covariate, {alternative}"}
    if x.size < 4:
        return _too_few(base, "4 points")
    if method == "spearman":
        x, y, z = stats.rankdata(x), stats.rankdata(y), stats.rankdata(z)
    design = np.column_stack([np.ones(x.size), z])
    x, y = (v - design @ np.linalg.lstsq(design, v, rcond=None)[0] for v in (x, y))
    return _correlated(x, y, _pearson, method, base, "a residual is constant", alternative, n_resamples, confidence,
                       seed, covariates=1)


def sign_test(wins: int, cases: int) -> dict:
    """Exact two-sided binomial sign test of ``wins`` among ``cases`` (ties left out) against 1/2; ``effect`` is
    wins / cases − 1/2."""
    if cases == 0:
        return {"wins": wins, "n": 0, "effect": np.nan, "p_value": np.nan, "p_method": "none: no cases", "test": "sign test"}
    return {"wins": int(wins), "n": int(cases), "effect": wins / cases - 0.5, "p_value": float(stats.binomtest(wins, cases).pvalue),
            "p_method": "exact binomial", "test": "sign test, two-sided"}


def signed_rank(values, *, unit: str = RUN, alternative: str = "two-sided") -> dict:
    """Wilcoxon's signed-rank test that per-unit differences centre on 0 (exact distribution where scipy has it).

    ``values`` holds one difference per unit (non-finite dropped; zeros left out by Wilcoxon's rule); ``effect``
    is their median.
    """
    values = np.asarray(values, dtype=float).ravel()
    values = values[np.isfinite(values)]
    base = {"n": int(values.size), "unit": unit, "test": f"Wilcoxon signed-rank, {alternative}"}
    nonzero = values[values != 0]
    if nonzero.size == 0:
        return {"effect": float(np.median(values)) if values.size else np.nan, "statistic": np.nan, "p_value": np.nan,
                "p_method": "none: no non-zero difference", **base}
    distinct = np.unique(np.abs(nonzero)).size == nonzero.size
    if nonzero.size <= 50 and distinct:
        method, named = "exact", "exact"
    elif nonzero.size <= SIGN_FLIP_MAX_N:  # tied ranks: every sign assignment enumerated
        method, named = stats.PermutationMethod(n_resamples=np.inf), f"exact sign-flip permutation ({2 ** nonzero.size:,} assignments; tied ranks)"
    else:
        method, named = "approx", "normal approximation (tied ranks with n > 16, or n > 50)"
    result = stats.wilcoxon(nonzero, alternative=alternative, method=method)
    return {"effect": float(np.median(values)), "statistic": float(result.statistic), "p_value": float(result.pvalue),
            "p_method": named, **base}


def adjust(p_values, method: str = "holm") -> np.ndarray:
    """p-values adjusted for multiple claims: Holm's step-down (family-wise error) or Benjamini–Hochberg (FDR).

    NaN p-values stay NaN and do not count as claims.
    """
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full_like(p, np.nan)
    finite = np.isfinite(p)
    if not finite.any():
        return adjusted
    if method == "bh":
        adjusted[finite] = stats.false_discovery_control(p[finite], method="bh")
    elif method == "holm":
        values = p[finite]
        order = np.argsort(values)
        m = values.size
        steps = np.maximum.accumulate((m - np.arange(m)) * values[order])
        out = np.empty(m)
        out[order] = np.minimum(steps, 1.0)
        adjusted[finite] = out
    else:
        raise ValueError(f"unknown correction {method!r}; choose holm or bh")
    return adjusted


def verdict(p_adjusted: float, effect: float, sign: int, alpha: float = 0.05) -> str:
    """One of `VERDICTS` from a claim's corrected p and its effect's direction.

    ``"reproduced"`` when p < alpha and the effect has the claimed ``sign`` (+1 or -1), ``"refuted"`` when p <
    alpha and it has the opposite sign, else ``"undecided"`` (also for a NaN p or effect).
    """
    if sign not in (-1, 1):
        raise ValueError(f"sign must be +1 or -1, got {sign}")
    if not (np.isfinite(p_adjusted) and np.isfinite(effect)) or p_adjusted >= alpha or effect == 0:
        return "undecided"
    return "reproduced" if np.sign(effect) == sign else "refuted"


def judge(claims: list[dict], *, method: str = "holm", alpha: float = 0.05, effect: str = "rho") -> list[dict]:
    """Correct a study's claims together and give each a verdict.

    Parameters
    ----------
    claims : list of dict
        Each with ``p_value``, ``sign`` (the claimed direction) and its effect under the key ``effect`` or
        its own ``effect_key``; a claim with ``precondition`` = False is judged undecided.
    method : {"holm", "bh"}
        The correction (`adjust`).

    Returns
    -------
    list of dict
        Copies with ``p_adjusted``, ``correction`` and ``verdict`` added.
    """
    adjusted = adjust([claim.get("p_value", np.nan) for claim in claims], method)
    name = {"holm": "Holm", "bh": "Benjamini-Hochberg"}[method]
    judged = []
    for claim, p in zip(claims, adjusted):
        size = claim.get(claim.get("effect_key", effect), np.nan)
        label = verdict(p, size, claim["sign"], alpha) if claim.get("precondition", True) else "undecided"
        judged.append({**claim, "p_adjusted": float(p), "correction": f"{name} over {int(np.isfinite(adjusted).sum())} claims",
                       "verdict": label})
    return judged
