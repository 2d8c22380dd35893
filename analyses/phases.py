"""Phases of depth: partitions of a trajectory store's layers (`analyses.segmentation`'s max-cut or contiguous
split), their scores, their bootstrap stability and their gradient null, in one result (`compute`)."""

from __future__ import annotations

import numpy as np
import xarray as xr
from sklearn.metrics import silhouette_score
from tqdm.auto import tqdm

from analyses.phase_null import gradient_null, relative_contrast
from analyses.segmentation import (
    EXACT_MAXCUT_LIMIT,
    as_matrix,
    choose_k,
    contiguous_partition,
    maxcut_is_exact,
    maxcut_partition,
)
from analyses.similarity import PER_IMAGE_MEASURES, layer_similarity
from analyses.streaming import rounded
from dynamo.layout import default_tokens
from dynamo.partition import Partition, assign_phases, from_result

DESCRIPTION = (
    "Phases of depth: the layer dissimilarity partitioned by max-cut or contiguous segmentation, "
    "the partition's phase-structure scores, and its bootstrap stability over images."
)
METHODS = ("maxcut", "contiguous")
GRADIENT_NULL_KEYS = ("score", "score_real", "score_null", "null_partition", "effect", "low", "high", "confidence",
                      "p_value", "n_permutations", "n_bootstrap", "exceeds", "conclusion")

__all__ = ["METHODS", "boundaries", "boundary_stability", "gradient_null", "choose_k", "compute", "contiguous_partition",
           "find_phases", "maxcut_partition", "partition_matrix", "phase_analysis", "phase_scores", "summarize", "thresholds"]


def partition_matrix(
    dissimilarity, method: str = "maxcut", *, eps: float = 0.1, k: int | None = None, min_size: int | None = None
) -> Partition:
    """Partition a dissimilarity matrix by either method, given eps (fraction f) or k.

    For ``"contiguous"`` without k, k is chosen by the fraction rule with the same ``eps`` (`choose_k`).
    ``min_size`` defaults to each method's own (2 for max-cut as the paper, 1 for contiguous).
    """
    if method == "maxcut":
        return maxcut_partition(dissimilarity, eps, k=k, min_size=min_size or 2)
    if method == "contiguous":
        min_size = min_size or 1
        k = k or choose_k(dissimilarity, "fraction", eps=eps, min_size=min_size)
        return contiguous_partition(dissimilarity, k, min_size=min_size)
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


def find_phases(ds: xr.Dataset, method: str = "maxcut", eps: float = 0.1, k: int | None = None, *, measure: str = "cosine",
                tokens: str | None = None, layers=None, progress: bool = False) -> Partition:
    """Phases of a trajectory dataset: its layer dissimilarity (`analyses.similarity.layer_similarity` with
    ``measure``, ``tokens``, ``layers``; the paper's by default) partitioned by `partition_matrix`."""
    matrix = layer_similarity(ds, measure, tokens, layers, progress=progress)
    return partition_matrix(matrix, method, eps=eps, k=k)


def compute(ds: xr.Dataset, method: str = "maxcut", eps: float = 0.1, k: int | None = None, *, measure: str = "cosine",
            tokens: str | None = None, layers=None, n_bootstrap: int = 200, null_permutations: int = 99,
            null_bootstrap: int = 99, seed: int = 0, progress: bool = True) -> xr.Dataset:
    """Everything about a store's phases in one result: matrix, partition, scores, stability, gradient null.

    Parameters are those of `find_phases`, plus ``n_bootstrap`` replicates over images for
    `boundary_stability` (0 to skip), ``null_permutations`` (0 to skip) and ``null_bootstrap`` for
    `analyses.phase_null.gradient_null`, and the ``seed`` of both; neither runs for CKA (no per-image matrices).

    Returns
    -------
    xarray.Dataset
        ``dissimilarity`` (layer_i, layer_j), the partition as coordinate ``phase`` (layer) and its
        ``scores`` (score); with bootstrap, `boundary_stability`'s ``boundary_frequency``,
        ``coassociation``, ``consensus_phase`` and ``consensus_support``; with the gradient null,
        ``null_dissimilarity``, coordinate ``null_phase``, ``null_permutation_effect``,
        ``null_bootstrap_effect`` and attrs ``gradient_null_<name>`` for every attr of `gradient_null`
        (without one, ``gradient_null_conclusion`` says why). attrs: the settings and, for max-cut,
        ``maxcut_exact`` (False when a heuristic cut the layers).
    """
    tokens = default_tokens(ds, tokens)
    bootstrap = n_bootstrap > 0 and measure in PER_IMAGE_MEASURES
    null = null_permutations > 0 and measure in PER_IMAGE_MEASURES and ds.sizes["image"] > 1
    if bootstrap or null:
        per_image = layer_similarity(ds, measure, tokens, layers, per_image=True, progress=progress)
        matrix = per_image.mean("image", keep_attrs=True)
    else:
        matrix = layer_similarity(ds, measure, tokens, layers, progress=progress)
    partition = partition_matrix(matrix, method, eps=eps, k=k)
    scores = phase_scores(matrix, partition)
    result = xr.Dataset(
        {"dissimilarity": matrix, "scores": ("score", list(scores.values()), {"description": "`phase_scores` of the partition"})},
        coords={"layer": matrix["layer_i"].values, "score": list(scores)},
    )
    result = assign_phases(result, partition)
    heuristic = method == "maxcut" and not maxcut_is_exact(len(partition.blocks))
    if null and not heuristic:
        tested = gradient_null(per_image, lambda m, k_: partition_matrix(m, method, eps=eps, k=k if k_ is None else k_),
                               n_permutations=null_permutations, n_bootstrap=null_bootstrap, seed=seed)
        result = result.assign(null_dissimilarity=tested["null_dissimilarity"],
                               null_permutation_effect=tested["permutation_effect"],
                               null_bootstrap_effect=tested["bootstrap_effect"])
        result = result.assign_coords(null_phase=("layer", tested["null_phase"].values,
                                                  {"description": "best partition of the gradient null"}))
        result.attrs.update({f"gradient_null_{name}": value for name, value in tested.attrs.items()})
    elif null:  # max-cut above its exact limit: the null would re-run the heuristic on every draw
        result.attrs["gradient_null_conclusion"] = (f"no gradient null: above {EXACT_MAXCUT_LIMIT} layers max-cut is a "
                                                    "heuristic; the contiguous method's partition can be tested")
    elif null_permutations > 0:
        result.attrs["gradient_null_conclusion"] = (f"no gradient null: {measure} has no per-image matrices to resample"
                                                    if measure not in PER_IMAGE_MEASURES else "no gradient null: one image")
    if bootstrap:
        stability = boundary_stability(per_image, method, eps=eps, k=k, n_bootstrap=n_bootstrap, seed=seed, progress=progress)
        result = result.assign(boundary_frequency=stability["boundary_frequency"], coassociation=stability["coassociation"])
        result = result.assign_coords(consensus_phase=("layer", stability["phase"].values, {"description": "the consensus partition"}))
        result.attrs["consensus_support"] = stability.attrs["consensus_support"]
    result.attrs.update(
        method=method, eps=eps, **({} if k is None else {"k": k}), n_bootstrap=n_bootstrap if bootstrap else 0,
        **({"maxcut_exact": maxcut_is_exact(len(partition.blocks))} if method == "maxcut" else {}),
        seed=seed, measure=measure, tokens=tokens, n_images=int(ds.sizes["image"]),
        model=ds.attrs.get("model", ""), weights_sha256=ds.attrs.get("weights_sha256", ""),
    )
    return result


phase_analysis = compute


def summarize(result: xr.Dataset) -> dict:
    """Headline numbers of a `phase_analysis` result, a flat JSON-able dict: the settings, ``partition``,
    ``thresholds`` (None when the phases are not contiguous), ``boundaries``, every `phase_scores` score; with
    bootstrap, ``boundary_frequency`` (of each boundary), ``consensus`` and ``consensus_support``; with the
    gradient null, ``gradient_null_<name>`` for each of `GRADIENT_NULL_KEYS`."""
    attrs = result.attrs
    partition = from_result(result)
    numbers = {
        **{name: attrs.get(name) for name in ("model", "n_images", "measure", "tokens", "method", "eps", "k", "n_bootstrap")},
        "partition": partition,
        "thresholds": partition.thresholds if partition.is_contiguous else None,
        "boundaries": partition.boundaries,
        **{str(name): rounded(float(value)) for name, value in zip(result["score"].values, result["scores"].values)},
    }
    numbers["n_phases"] = len(partition)
    for name in GRADIENT_NULL_KEYS:
        if f"gradient_null_{name}" in attrs:
            value = attrs[f"gradient_null_{name}"]
            numbers[f"gradient_null_{name}"] = rounded(value) if isinstance(value, float) else value
    if "maxcut_exact" in attrs:
        numbers["maxcut_exact"] = bool(attrs["maxcut_exact"])
    if "consensus_phase" in result.coords:
        numbers["boundary_frequency"] = rounded(result["boundary_frequency"].sel(after_layer=partition.boundaries).values)
        numbers["consensus"] = from_result(result.assign_coords(phase=("layer", result["consensus_phase"].values)))
        numbers["consensus_support"] = rounded(attrs["consensus_support"])
    return numbers


def boundaries(partition) -> list[int]:
    """`Partition.boundaries` of a list of phases: blocks after which a new phase begins."""
    return Partition(partition).boundaries


def thresholds(partition) -> list[int]:
    """`Partition.thresholds` of a list of phases: the Raptor router thresholds (contiguous phases only)."""
    return Partition(partition).thresholds


def phase_scores(dissimilarity, partition) -> dict[str, float]:
    """Scalar phase-structure scores of a partition (of all the matrix's layer labels) of an (n, n) dissimilarity D.

    Over pairs i < j: ``mean_dissimilarity`` (partition-free); ``contrast``, mean D between phases − mean D
    within (NaN without both kinds of pair); ``relative_contrast``, contrast / mean D (the primary score of
    `analyses.phase_null`); ``cut_fraction``, Σ D between / Σ D; ``normalized_cut``, the mean over phases
    of cut(P, rest) / vol(P) on the affinity 1 − D / max D (low = well separated); ``silhouette``,
    scikit-learn's with D as the distance (needs 2 ≤ k < n).
    """
    weights, labels = as_matrix(dissimilarity)
    partition = Partition(partition)
    if partition.blocks.tolist() != sorted(labels.tolist()):
        raise ValueError(f"the partition covers layers {partition.blocks.tolist()}, the matrix {labels.tolist()}")
    phase = partition.phase_of(labels)  # in the matrix's row order
    n, k = len(labels), phase.max() + 1
    upper = np.triu(np.ones((n, n), dtype=bool), 1)
    same = phase[:, None] == phase[None, :]
    within, between = weights[upper & same], weights[upper & ~same]
    total = weights[upper].sum()
    affinity = 1.0 - weights / weights[upper].max() if total > 0 else np.ones_like(weights)
    np.fill_diagonal(affinity, 0.0)
    members = [phase == index for index in range(k)]
    ncut = np.mean([affinity[m][:, ~m].sum() / max(affinity[m].sum(), np.finfo(float).tiny) for m in members])
    distances = weights.copy()
    np.fill_diagonal(distances, 0.0)
    return {
        "n_phases": int(k),
        "mean_dissimilarity": float(weights[upper].mean()),
        "contrast": float(between.mean() - within.mean()) if within.size and between.size else float("nan"),
        "relative_contrast": relative_contrast(dissimilarity, partition),
        "cut_fraction": float(between.sum() / total) if total > 0 else float("nan"),
        "normalized_cut": float(ncut) if k > 1 else float("nan"),
        "silhouette": float(silhouette_score(np.maximum(distances, 0), phase, metric="precomputed")) if 2 <= k < n
        else float("nan"),
    }


def boundary_stability(per_image: xr.DataArray, method: str = "maxcut", *, eps: float = 0.1, k: int | None = None,
                       n_bootstrap: int = 200, seed: int = 0, progress: bool = True) -> xr.Dataset:
    """Bootstrap over images: how often each boundary appears, and a consensus partition.

    Each replicate averages a resample (with replacement) of the per-image (image, layer_i, layer_j) matrices
    and partitions it by `partition_matrix` with ``method``, ``eps``, ``k``.

    Returns
    -------
    xarray.Dataset
        ``boundary_frequency`` (after_layer): fraction of replicates in which a new phase begins after the
        layer; ``coassociation`` (layer_i, layer_j): fraction with i and j in one phase; coordinate ``phase``:
        the consensus, the replicate partition with the least total pair disagreement (Mirkin distance) to
        all replicates; attrs ``consensus_support`` (fraction of replicates equal to it) and the settings.
    """
    if per_image.dims != ("image", "layer_i", "layer_j"):
        raise ValueError(f"expected per-image matrices (image, layer_i, layer_j), got {per_image.dims}")
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be at least 1, got {n_bootstrap}")
    matrices = np.asarray(per_image.values, dtype=float)
    n_images = matrices.shape[0]
    layers = per_image["layer_i"].values
    rng = np.random.default_rng(seed)
    found: dict[tuple, int] = {}
    for _ in tqdm(range(n_bootstrap), desc="bootstrap", unit="replicate", disable=not progress):
        counts = np.bincount(rng.integers(0, n_images, n_images), minlength=n_images)
        replicate = per_image.isel(image=0, drop=True).copy(data=np.tensordot(counts, matrices, 1) / n_images)
        partition = partition_matrix(replicate, method, eps=eps, k=k)
        key = tuple(tuple(phase) for phase in partition)
        found[key] = found.get(key, 0) + 1
    partitions, weights = [Partition(key) for key in found], np.array(list(found.values()), dtype=float)
    labels = np.stack([partition.phase_of(layers) for partition in partitions])
    together = (labels[:, :, None] == labels[:, None, :]).astype(float)
    coassociation = np.tensordot(weights, together, 1) / n_bootstrap
    disagreement = (together * (1 - coassociation) + (1 - together) * coassociation).sum((1, 2))
    best = int(np.argmin(disagreement))
    frequency = np.zeros(len(layers) - 1)
    for partition, weight in zip(partitions, weights):
        frequency[np.searchsorted(layers, partition.boundaries)] += weight
    stability = xr.Dataset(
        {"boundary_frequency": ("after_layer", frequency / n_bootstrap,
                                {"description": "fraction of replicates in which a new phase begins after this layer"}),
         "coassociation": (("layer_i", "layer_j"), coassociation,
                           {"description": "fraction of replicates with both layers in one phase"})},
        coords={"after_layer": layers[:-1], "layer": layers, "layer_i": layers, "layer_j": layers},
        attrs={"consensus_support": float(weights[best] / n_bootstrap), "n_bootstrap": n_bootstrap, "method": method,
               "eps": eps, **({} if k is None else {"k": k}), "seed": seed,
               **{key: per_image.attrs.get(key, "") for key in ("measure", "tokens", "model")}},
    )
    return assign_phases(stability, partitions[best])
