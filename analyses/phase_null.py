"""Do a store's phases exceed a smooth gradient? Its partition's structure against a gradient null.

The null is the diagonal average T(D) of the layer dissimilarity D (each entry the mean of D at the
same depth distance: the same decay with distance, no blocks). The primary score is the **relative
contrast**, (mean D between phases − mean D within) / mean D over all pairs: the contrast is what a
phase partition promises and what max-cut favours, and dividing by the mean makes it invariant to
D → cD, so uniformly more alike layers do not score as weaker phases. The effect Δ is the score of
the real matrix's best partition minus that of the best same-k partition *of the null* (the method
re-run on it). Its interval is a percentile bootstrap over images; its p-value a one-sided sign-flip
test over images, which assumes each image's deviation from its own diagonal average, D_img − T(D_img),
is symmetric about 0 under the null: flipping the signs and adding the mean back to T(D) draws null
matrices with the real noise, re-partitioned each time, and p = (1 + #{Δ_null ≥ Δ}) / (1 + draws).
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from analyses.segmentation import as_matrix
from dynamo.partition import Partition

__all__ = ["ALPHA", "SCORE", "conclusion", "excess", "gradient_null", "relative_contrast", "toeplitz"]

SCORE = "relative_contrast"
ALPHA = 0.05


def toeplitz(matrix) -> np.ndarray:
    """The diagonal average of (a stack of) square matrices (..., n, n): each entry the mean of its diagonal."""
    matrix = np.asarray(matrix, dtype=float)
    n = matrix.shape[-1]
    offsets = np.arange(n)[None, :] - np.arange(n)[:, None]
    out = np.empty_like(matrix)
    for offset in range(-(n - 1), n):
        mask = offsets == offset
        out[..., mask] = matrix[..., mask].mean(-1, keepdims=True)
    return out


def relative_contrast(dissimilarity, partition) -> float:
    """(mean D between phases − mean D within phases) / mean D, over pairs i < j; NaN without both kinds of pair."""
    weights, labels = as_matrix(dissimilarity)
    phase = Partition(partition).phase_of(labels)
    upper = np.triu(np.ones(weights.shape, dtype=bool), 1)
    same = phase[:, None] == phase[None, :]
    within, between, everything = weights[upper & same], weights[upper & ~same], weights[upper]
    if not (within.size and between.size) or everything.mean() <= 0:
        return float("nan")
    return float((between.mean() - within.mean()) / everything.mean())


def excess(matrix: np.ndarray, layers, partition_of) -> tuple[float, float, float, Partition, Partition]:
    """Δ of one (n, n) matrix with row labels ``layers``: its best partition's score minus the best same-k
    partition's score on its Toeplitz null, as (effect, score, null_score, partition, null_partition).

    ``partition_of(DataArray, k)`` → Partition; k None means the method's own rule.
    """
    real = _labelled(matrix, layers)
    partition = partition_of(real, None)
    if len(partition) < 2:
        return 0.0, float("nan"), float("nan"), partition, partition
    null = _labelled(toeplitz(matrix), layers)
    null_partition = partition_of(null, len(partition))
    score, null_score = relative_contrast(real, partition), relative_contrast(null, null_partition)
    return score - null_score, score, null_score, partition, null_partition


def gradient_null(per_image: xr.DataArray, partition_of, *, n_permutations: int = 99, n_bootstrap: int = 99,
                  confidence: float = 0.95, seed: int = 0) -> xr.Dataset:
    """The store's phases against the smooth-gradient null: effect, bootstrap interval, sign-flip p-value.

    Parameters
    ----------
    per_image : xarray.DataArray, (image, layer_i, layer_j)
        One dissimilarity matrix per image (``layer_similarity(..., per_image=True)``).
    partition_of : callable
        ``partition_of(matrix, k)`` → Partition: the method that found the phases, with k None
        for its own rule (e.g. max-cut's fraction f), else exactly k phases.
    n_permutations : int
        Sign-flip draws for the p-value (its smallest value is 1 / (draws + 1)).
    n_bootstrap : int
        Bootstrap resamples of the images for the interval (0: none).

    Returns
    -------
    xarray.Dataset
        ``null_dissimilarity`` (layer_i, layer_j), the Toeplitz matrix, with its best partition as
        coordinate ``null_phase`` (layer); ``permutation_effect`` (draw) and
        ``bootstrap_effect`` (replicate). attrs: ``score`` (`SCORE`), ``score_real``,
        ``score_null``, ``effect``, ``low``, ``high``, ``p_value``, ``n_permutations``,
        ``n_bootstrap``, ``confidence``, ``exceeds`` (p < `ALPHA` and effect > 0) and
        ``conclusion`` (a sentence, `conclusion`).
    """
    if per_image.dims != ("image", "layer_i", "layer_j"):
        raise ValueError(f"the gradient null needs per-image matrices (image, layer_i, layer_j), got {per_image.dims}")
    matrices = np.asarray(per_image.values, dtype=float)
    n_images = matrices.shape[0]
    if n_images < 2:
        raise ValueError(f"the gradient null needs at least 2 images to resample, got {n_images}")
    layers = per_image["layer_i"].values
    mean = matrices.mean(0)
    effect, score, null_score, partition, null_partition = excess(mean, layers, partition_of)
    rng = np.random.default_rng(seed)
    single = len(partition) < 2
    deviations = (matrices - toeplitz(matrices)).reshape(n_images, -1)
    gradient = toeplitz(mean)
    flipped = np.full(0 if single else n_permutations, np.nan)
    for draw in range(flipped.size):
        signs = rng.choice([-1.0, 1.0], n_images)
        flipped[draw] = excess(gradient + (signs @ deviations).reshape(mean.shape) / n_images, layers, partition_of)[0]
    booted = np.full(0 if single else n_bootstrap, np.nan)
    for replicate in range(booted.size):
        counts = np.bincount(rng.integers(0, n_images, n_images), minlength=n_images)
        booted[replicate] = excess(np.tensordot(counts, matrices, 1) / n_images, layers, partition_of)[0]
    p_value = float((1 + np.sum(flipped >= effect - 1e-12)) / (1 + flipped.size)) if flipped.size else float("nan")
    low, high = (np.percentile(booted, [50 * (1 - confidence), 50 * (1 + confidence)]) if booted.size
                 else (np.nan, np.nan))
    attrs = {"score": SCORE, "score_real": score, "score_null": null_score, "effect": float(effect), "low": float(low),
             "high": float(high), "p_value": p_value, "n_permutations": int(flipped.size), "n_bootstrap": int(booted.size),
             "confidence": confidence, "seed": seed, "n_phases": len(partition), "null_partition": str(null_partition),
             "exceeds": bool(np.isfinite(p_value) and p_value < ALPHA and effect > 0)}
    attrs["conclusion"] = conclusion(attrs)
    return xr.Dataset(
        {
            "null_dissimilarity": (("layer_i", "layer_j"), gradient, {"description": "diagonal average (Toeplitz) of the dissimilarity"}),
            "permutation_effect": ("draw", flipped, {"description": "effect on sign-flipped null matrices"}),
            "bootstrap_effect": ("replicate", booted, {"description": "effect on bootstrap resamples of the images"}),
        },
        coords={"layer_i": layers, "layer_j": layers, "layer": layers, "null_phase": ("layer", null_partition.phase_of(layers))},
        attrs=attrs,
    )


def conclusion(null: dict) -> str:
    """One sentence, in words, of what a `gradient_null` result's attrs conclude."""
    if null["n_phases"] < 2:
        return "one phase: no phase structure to test against a smooth gradient"
    numbers = (f"{SCORE.replace('_', ' ')} {null['score_real']:.3f} vs {null['score_null']:.3f} for the gradient null's best "
               f"{null['n_phases']}-phase partition; excess {null['effect']:+.3f} "
               f"[{null['low']:+.3f}, {null['high']:+.3f}], p = {null['p_value']:.3g}")
    if null["exceeds"]:
        return f"the phases exceed a smooth depth gradient ({numbers})"
    return f"the phases do not exceed a smooth depth gradient: they may be cuts through a gradient ({numbers})"


def _labelled(matrix: np.ndarray, layers) -> xr.DataArray:
    return xr.DataArray(matrix, dims=("layer_i", "layer_j"), coords={"layer_i": layers, "layer_j": layers})
