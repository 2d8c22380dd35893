"""Phases of depth: partitions of a trajectory store's layers, their scores and their stability.

A partition is a `dynamo.partition.Partition` of layer numbers (1-based block indices for the
default layers 1..L), e.g. ``[[1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12]]``. The partitioning
methods live in `analyses.segmentation` and are re-exported here:

- `maxcut_partition`: the paper's recursive max-cut (``eps`` = its fraction f, or ``k``);
- `contiguous_partition`: the exact optimal contiguous split into k phases.

Example::

    ds = dynamo.open_trajectories("reg4.zarr")
    partition = find_phases(ds, method="maxcut", eps=0.1)
    thresholds(partition)                  # Raptor router thresholds
    summarize(phase_analysis(ds))          # partition, thresholds, scores, bootstrap stability
"""

from __future__ import annotations

import numpy as np
import xarray as xr
from sklearn.metrics import silhouette_score
from tqdm.auto import tqdm

from analyses.phase_null import gradient_null, relative_contrast
from analyses.segmentation import as_matrix, choose_k, contiguous_partition, maxcut_is_exact, maxcut_partition
from analyses.similarity import PER_IMAGE_MEASURES, layer_similarity
from analyses.streaming import rounded
from dynamo.partition import Partition, assign_phases, from_result

DESCRIPTION = (
    "Phases of depth: the layer dissimilarity partitioned by max-cut or contiguous segmentation, "
    "the partition's phase-structure scores, and its bootstrap stability over images."
)
METHODS = ("maxcut", "contiguous")
GRADIENT_NULL_KEYS = ("score", "score_real", "score_null", "null_partition", "effect", "low", "high", "confidence",
                      "p_value", "n_permutations", "n_bootstrap", "exceeds", "conclusion")

__all__ = [
    "METHODS",
    "boundaries",
    "boundary_stability",
    "gradient_null",
    "choose_k",
    "compute",
    "contiguous_partition",
    "find_phases",
    "maxcut_partition",
    "partition_matrix",
    "phase_analysis",
    "phase_scores",
    "summarize",
    "thresholds",
]


def partition_matrix(
    dissimilarity, method: str = "maxcut", *, eps: float = 0.1, k: int | None = None, min_size: int | None = None
) -> Partition:
    """Partition a dissimilarity matrix by either method, given eps (fraction f) or k.

    For ``"contiguous"`` without k, k is chosen by the fraction rule with the same ``eps``
    (`choose_k`). ``min_size`` defaults to each method's own (2 for max-cut as the paper, 1
    for contiguous).
    """
    if method == "maxcut":
        return maxcut_partition(dissimilarity, eps, k=k, min_size=min_size or 2)
    if method == "contiguous":
        min_size = min_size or 1
        k = k or choose_k(dissimilarity, "fraction", eps=eps, min_size=min_size)
        return contiguous_partition(dissimilarity, k, min_size=min_size)
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


def find_phases(
    ds: xr.Dataset,
    method: str = "maxcut",
    eps: float = 0.1,
    k: int | None = None,
    *,
    measure: str = "cosine",
    tokens: str = "cls+patch_mean",
    layers=None,
    progress: bool = False,
) -> Partition:
    """Phases of a trajectory dataset: its layer dissimilarity, partitioned.

    Parameters
    ----------
    ds : xarray.Dataset
        A trajectory dataset (`dynamo.open_trajectories`).
    method : {"maxcut", "contiguous"}
    eps : float
        The paper's fraction f (0.2, 0.1, 0.09 gave 2, 3, 4 phases on DINOv2-B); for
        ``"contiguous"`` it chooses k by the same rule (`choose_k`).
    k : int, optional
        Number of phases (overrides eps).
    measure, tokens, layers
        Passed to `analyses.similarity.layer_similarity`; the defaults are the paper's.

    Returns
    -------
    Partition
    """
    matrix = layer_similarity(ds, measure, tokens, layers, progress=progress)
    return partition_matrix(matrix, method, eps=eps, k=k)


def compute(
    ds: xr.Dataset,
    method: str = "maxcut",
    eps: float = 0.1,
    k: int | None = None,
    *,
    measure: str = "cosine",
    tokens: str = "cls+patch_mean",
    layers=None,
    n_bootstrap: int = 200,
    null_permutations: int = 99,
    null_bootstrap: int = 99,
    seed: int = 0,
    progress: bool = True,
) -> xr.Dataset:
    """Everything about a store's phases in one result: matrix, partition, scores, stability, gradient null.

    Parameters are those of `find_phases`, plus ``n_bootstrap`` replicates over images for
    `boundary_stability` (0 to skip; CKA has no per-image matrices, so it is skipped there too),
    ``null_permutations`` and ``null_bootstrap`` for the smooth-gradient null
    (`analyses.phase_null.gradient_null`; on by default, 0 permutations to skip; not for CKA) and
    the ``seed`` of both.

    Returns
    -------
    xarray.Dataset
        ``dissimilarity`` (layer_i, layer_j); coordinate ``phase`` (layer), the partition
        (`dynamo.partition.assign_phases`; read it back with `dynamo.partition.from_result`);
        ``scores`` (score), the `phase_scores`; with bootstrap, ``boundary_frequency``
        (after_layer), ``coassociation`` (layer_i, layer_j), the coordinate ``consensus_phase``
        (layer) and attr ``consensus_support``, as in `boundary_stability`. attrs: the settings;
        for max-cut, ``maxcut_exact`` (False when the layers exceed the exact limit and the cuts
        came from a heuristic, `analyses.segmentation.maxcut_is_exact`). With the gradient null:
        ``null_dissimilarity`` (layer_i, layer_j), its best partition as coordinate
        ``null_phase``, ``null_permutation_effect`` (draw), ``null_bootstrap_effect``
        (replicate) and attrs ``gradient_null_<name>`` for every attr of `gradient_null`
        (``effect``, ``low``, ``high``, ``p_value``, ``exceeds``, ``conclusion``, ...); for CKA,
        ``gradient_null_conclusion`` says why there is none.
    """
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
    if null:
        tested = gradient_null(per_image, lambda m, k_: partition_matrix(m, method, eps=eps, k=k if k_ is None else k_),
                               n_permutations=null_permutations, n_bootstrap=null_bootstrap, seed=seed)
        result = result.assign(null_dissimilarity=tested["null_dissimilarity"],
                               null_permutation_effect=tested["permutation_effect"],
                               null_bootstrap_effect=tested["bootstrap_effect"])
        result = result.assign_coords(null_phase=("layer", tested["null_phase"].values,
                                                  {"description": "best partition of the gradient null"}))
        result.attrs.update({f"gradient_null_{name}": value for name, value in tested.attrs.items()})
    elif null_permutations > 0:
        result.attrs["gradient_null_conclusion"] = (f"no gradient null: {measure} has no per-image matrices to resample"
                                                    if measure not in PER_IMAGE_MEASURES else "no gradient null: one image")
    if bootstrap:
        stability = boundary_stability(per_image, method, eps=eps, k=k, n_bootstrap=n_bootstrap, seed=seed, progress=progress)
        result = result.assign(boundary_frequency=stability["boundary_frequency"], coassociation=stability["coassociation"])
        result = result.assign_coords(consensus_phase=("layer", stability["phase"].values, {"description": "the consensus partition"}))
        result.attrs["consensus_support"] = stability.attrs["consensus_support"]
    result.attrs.update(
        method=method,
        eps=eps,
        **({} if k is None else {"k": k}),
        n_bootstrap=n_bootstrap if bootstrap else 0,
        **({"maxcut_exact": maxcut_is_exact(len(partition.blocks))} if method == "maxcut" else {}),
        seed=seed,
        measure=measure,
        tokens=tokens,
        n_images=int(ds.sizes["image"]),
        model=ds.attrs.get("model", ""),
        weights_sha256=ds.attrs.get("weights_sha256", ""),
    )
    return result


phase_analysis = compute


def summarize(result: xr.Dataset) -> dict:
    """Headline numbers of a `phase_analysis` result, a flat JSON-able dict.

    Returns
    -------
    dict
        The settings (``model``, ``n_images``, ``measure``, ``tokens``, ``method``, ``eps``,
        ``k``, ``n_bootstrap``; for max-cut ``maxcut_exact``, False when a heuristic cut the
        layers); ``partition`` (list of phases), ``thresholds`` (None when the
        phases are not contiguous), ``boundaries``; every `phase_scores` score; with
        bootstrap, ``boundary_frequency`` (of each of ``boundaries``, in their order),
        ``consensus`` (list of phases) and ``consensus_support``; with the gradient null,
        ``gradient_null_<name>`` for each of `GRADIENT_NULL_KEYS` (``conclusion`` also without one).
    """
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
    """Scalar phase-structure scores of a partition of a dissimilarity matrix.

    The paper reports that "phase-structure metrics correlate with" Raptor's fit but gives no
    formula; these are defined here (pairs i < j, diagonal excluded, D the dissimilarity):

    - ``mean_dissimilarity``: mean D over all pairs; partition-free (low = layers alike, the
      paper's "mean off-diagonal similarity" turned around);
    - ``contrast``: mean D between phases − mean D within phases (high = crisp phases; NaN when
      there is one phase or no within-phase pair);
    - ``relative_contrast``: contrast / mean_dissimilarity, the scale-free contrast (the primary
      score of `analyses.phase_null`);
    - ``cut_fraction``: Σ D between phases / Σ D, the max-cut objective normalised (in [0, 1]);
    - ``normalized_cut``: the mean over phases of cut(P, rest) / vol(P) on the affinity
      A = 1 − D / max D (Shi & Malik's k-way normalised cut divided by k; in [0, 1], low =
      phases well separated);
    - ``silhouette``: scikit-learn's silhouette score with D as the precomputed distance
      (in [−1, 1], high = each layer closer to its phase than to the next; needs 2 ≤ k < n).

    Parameters
    ----------
    dissimilarity : xarray.DataArray or array-like, (n, n)
    partition : Partition or list of list of int
        Phases of the matrix's layer labels (all of them).

    Returns
    -------
    dict of str to float
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
        "silhouette": float(silhouette_score(np.maximum(distances, 0), phase, metric="precomputed"))
        if 2 <= k < n
        else float("nan"),
    }


def boundary_stability(
    per_image: xr.DataArray,
    method: str = "maxcut",
    *,
    eps: float = 0.1,
    k: int | None = None,
    n_bootstrap: int = 200,
    seed: int = 0,
    progress: bool = True,
) -> xr.Dataset:
    """Bootstrap over images: how often each boundary appears, and a consensus partition.

    Each replicate draws the images with replacement, averages their matrices (so a replicate
    is the store's matrix on a resampled image set) and partitions it with the same method and
    settings.

    Parameters
    ----------
    per_image : xarray.DataArray, (image, layer_i, layer_j)
        From ``layer_similarity(..., per_image=True)``.
    method, eps, k
        As `partition_matrix`.
    n_bootstrap : int
        Number of bootstrap replicates.
    seed : int
        Seed of the resampling.

    Returns
    -------
    xarray.Dataset
        - ``boundary_frequency`` (after_layer): fraction of replicates in which a new phase
          begins after this layer (every layer but the last);
        - ``coassociation`` (layer_i, layer_j): fraction of replicates with i and j in the
          same phase;
        - coordinate ``phase`` (layer): the consensus partition (`dynamo.partition.assign_phases`),
          the replicate partition with the least total pair disagreement (Mirkin distance) to
          all replicates (a medoid: always a partition the method itself produced);
        - attrs ``consensus_support`` (fraction of replicates equal to it), ``n_bootstrap``,
          ``method``, ``eps``, ``k`` (when given).
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
        {
            "boundary_frequency": (
                "after_layer",
                frequency / n_bootstrap,
                {"description": "fraction of replicates in which a new phase begins after this layer"},
            ),
            "coassociation": (
                ("layer_i", "layer_j"),
                coassociation,
                {"description": "fraction of replicates with both layers in one phase"},
            ),
        },
        coords={"after_layer": layers[:-1], "layer": layers, "layer_i": layers, "layer_j": layers},
        attrs={
            "consensus_support": float(weights[best] / n_bootstrap),
            "n_bootstrap": n_bootstrap,
            "method": method,
            "eps": eps,
            **({} if k is None else {"k": k}),
            "seed": seed,
            "measure": per_image.attrs.get("measure", ""),
            "tokens": per_image.attrs.get("tokens", ""),
            "model": per_image.attrs.get("model", ""),
        },
    )
    return assign_phases(stability, partitions[best])
