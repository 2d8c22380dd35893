"""Phases of depth: partitions of a trajectory store's layers, their scores and their stability.

A partition is a ``list[list[int]]`` of layer numbers (1-based block indices for the default
layers 1..L), e.g. ``[[1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12]]``. The partitioning methods
live in `analyses.segmentation` and are re-exported here:

- `maxcut_partition`: the paper's recursive max-cut (``eps`` = its fraction f, or ``k``);
- `contiguous_partition`: the exact optimal contiguous split into k phases.

Example::

    ds = dynamo.open_trajectories("reg4.zarr")
    partition = find_phases(ds, method="maxcut", eps=0.1)
    thresholds(partition)          # Raptor router thresholds
    phase_summary(phase_analysis(ds))["text"]   # matrix, partition, scores, bootstrap stability
"""

from __future__ import annotations

import json

import numpy as np
import xarray as xr
from sklearn.metrics import silhouette_score
from tqdm.auto import tqdm

from analyses.segmentation import as_matrix, choose_k, contiguous_partition, maxcut_partition
from analyses.similarity import PER_IMAGE_MEASURES, layer_similarity

METHODS = ("maxcut", "contiguous")

__all__ = [
    "METHODS",
    "boundaries",
    "boundary_stability",
    "choose_k",
    "contiguous_partition",
    "find_phases",
    "maxcut_partition",
    "partition_labels",
    "partition_matrix",
    "phase_analysis",
    "phase_scores",
    "phase_summary",
    "thresholds",
]


def partition_matrix(
    dissimilarity, method: str = "maxcut", *, eps: float = 0.1, k: int | None = None, min_size: int | None = None
) -> list[list[int]]:
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
) -> list[list[int]]:
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
    list of list of int
    """
    matrix = layer_similarity(ds, measure, tokens, layers, progress=progress)
    return partition_matrix(matrix, method, eps=eps, k=k)


def phase_analysis(
    ds: xr.Dataset,
    method: str = "maxcut",
    eps: float = 0.1,
    k: int | None = None,
    *,
    measure: str = "cosine",
    tokens: str = "cls+patch_mean",
    layers=None,
    n_boot: int = 200,
    seed: int = 0,
    progress: bool = True,
) -> xr.Dataset:
    """Everything about a store's phases in one result: matrix, partition, scores, stability.

    Parameters are those of `find_phases`, plus ``n_boot`` bootstrap replicates over images for
    `boundary_stability` (0 to skip; CKA has no per-image matrices, so it is skipped there too)
    and its ``seed``.

    Returns
    -------
    xarray.Dataset
        ``dissimilarity`` (layer_i, layer_j); ``phase`` (layer), the phase index of each layer;
        with bootstrap, ``boundary_frequency``, ``coassociation`` and ``consensus_phase`` as in
        `boundary_stability`. attrs: ``partition``, ``thresholds`` (null when the partition is
        not contiguous), ``boundaries``, ``scores`` (JSON text, so the result saves to zarr or
        netCDF), and the settings.
    """
    bootstrap = n_boot > 0 and measure in PER_IMAGE_MEASURES
    if bootstrap:
        per_image = layer_similarity(ds, measure, tokens, layers, per_image=True, progress=progress)
        matrix = per_image.mean("image", keep_attrs=True)
    else:
        matrix = layer_similarity(ds, measure, tokens, layers, progress=progress)
    partition = partition_matrix(matrix, method, eps=eps, k=k)
    try:
        cuts = thresholds(partition)
    except ValueError:
        cuts = None
    result = xr.Dataset({"dissimilarity": matrix})
    result["phase"] = ("layer", partition_labels(partition)[1])
    result = result.assign_coords(layer=matrix["layer_i"].values)
    if bootstrap:
        stability = boundary_stability(per_image, method, eps=eps, k=k, n_boot=n_boot, seed=seed, progress=progress)
        for name in ("boundary_frequency", "coassociation", "consensus_phase"):
            result[name] = stability[name]
        result.attrs.update(consensus=stability.attrs["consensus"], consensus_support=stability.attrs["consensus_support"])
    result.attrs.update(
        partition=json.dumps(partition),
        thresholds=json.dumps(cuts),
        boundaries=json.dumps(boundaries(partition)),
        scores=json.dumps(phase_scores(matrix, partition)),
        method=method,
        eps=eps,
        k=-1 if k is None else k,
        n_boot=n_boot if bootstrap else 0,
        seed=seed,
        measure=measure,
        tokens=tokens,
        n_images=int(ds.sizes["image"]),
        model=ds.attrs.get("model", ""),
        weights_sha256=ds.attrs.get("weights_sha256", ""),
    )
    return result


def phase_summary(result: xr.Dataset) -> dict:
    """A `phase_analysis` result as plain JSON-able values, with a human ``text`` summary.

    Returns
    -------
    dict
        ``partition``, ``thresholds``, ``boundaries``, ``scores``, ``boundary_frequency``
        ({layer: fraction}, with bootstrap), ``consensus``, ``consensus_support``, the
        settings, and ``text``.
    """
    attrs = result.attrs
    summary = {
        "model": attrs["model"],
        "n_images": attrs["n_images"],
        "measure": attrs["measure"],
        "tokens": attrs["tokens"],
        "layers": result["layer"].values.tolist(),
        "method": attrs["method"],
        "eps": attrs["eps"],
        "k": None if attrs["k"] == -1 else attrs["k"],
        "partition": json.loads(attrs["partition"]),
        "thresholds": json.loads(attrs["thresholds"]),
        "boundaries": json.loads(attrs["boundaries"]),
        "scores": json.loads(attrs["scores"]),
        "n_boot": attrs["n_boot"],
    }
    setting = f"k={summary['k']}" if summary["k"] else f"f={summary['eps']}"
    phases = " ".join(_span(phase) for phase in summary["partition"])
    lines = [
        f"{summary['model']}: {summary['n_images']} images, {summary['measure']} dissimilarity of "
        f"{summary['tokens']}, layers {_span(summary['layers'])}",
        f"{summary['method']} ({setting}): {len(summary['partition'])} phases {phases}",
        f"Raptor thresholds: {summary['thresholds']}" if summary["thresholds"] is not None
        else "Raptor thresholds: none (the phases are not contiguous in depth)",
        "scores: " + ", ".join(f"{name} {value:.3g}" for name, value in summary["scores"].items()),
    ]
    if "boundary_frequency" in result:
        frequency = result["boundary_frequency"]
        summary["boundary_frequency"] = {int(layer): float(value) for layer, value in zip(frequency["after_layer"].values, frequency.values)}
        summary["consensus"] = json.loads(attrs["consensus"])
        summary["consensus_support"] = attrs["consensus_support"]
        seen = {layer: value for layer, value in summary["boundary_frequency"].items() if value > 0}
        lines.append(
            f"boundary stability over {summary['n_boot']} bootstrap resamples of the images: "
            + (", ".join(f"after {layer}: {value:.2f}" for layer, value in seen.items()) or "no boundary")
        )
        lines.append(
            f"consensus: {' '.join(_span(phase) for phase in summary['consensus'])} "
            f"(exactly this partition in {summary['consensus_support']:.0%} of resamples)"
        )
    summary["text"] = "\n".join(lines)
    return summary


def _span(layers) -> str:
    """[1, 2, 3, 5] -> '[1-3,5]'."""
    runs, layers = [], list(layers)
    for layer in layers:
        if runs and layer == runs[-1][1] + 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    return "[" + ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs) + "]"


def _checked(partition) -> list[list[int]]:
    phases = [sorted(int(layer) for layer in phase) for phase in partition]
    if not phases or any(not phase for phase in phases):
        raise ValueError(f"a partition is a non-empty list of non-empty phases, got {partition!r}")
    layers = [layer for phase in phases for layer in phase]
    if len(set(layers)) != len(layers):
        raise ValueError(f"phases overlap in {partition!r}")
    return sorted(phases, key=lambda phase: phase[0])


def partition_labels(partition) -> tuple[np.ndarray, np.ndarray]:
    """Layers in depth order and the phase index (0..k−1) of each."""
    phases = _checked(partition)
    layers = np.array(sorted(layer for phase in phases for layer in phase))
    phase_of = {layer: index for index, phase in enumerate(phases) for layer in phase}
    return layers, np.array([phase_of[layer] for layer in layers])


def boundaries(partition) -> list[int]:
    """Layers after which a new phase begins (in depth order), for lines on depth plots.

    For a contiguous partition these are the Raptor thresholds; for a non-contiguous one every
    change of phase between consecutive layers counts.
    """
    layers, labels = partition_labels(partition)
    return [int(layer) for layer, change in zip(layers[:-1], labels[1:] != labels[:-1]) if change]


def thresholds(partition) -> list[int]:
    """Raptor router thresholds of a contiguous partition (length k − 1).

    Layer t goes to block i if t ≤ thresholds[i] (first such i), otherwise to the last block:
    ``[[1..7], [8..10], [11, 12]]`` → ``[7, 10]``.

    Raises
    ------
    ValueError
        If a phase is not a contiguous run of layers.
    """
    phases = _checked(partition)
    layers, labels = partition_labels(phases)
    if np.any(np.diff(labels) < 0) or len(boundaries(phases)) != len(phases) - 1:
        raise ValueError(
            f"partition {phases} is not contiguous in depth; Raptor thresholds need contiguous "
            "phases (use method='contiguous')"
        )
    return [phase[-1] for phase in phases[:-1]]


def phase_scores(dissimilarity, partition) -> dict[str, float]:
    """Scalar phase-structure scores of a partition of a dissimilarity matrix.

    The paper reports that "phase-structure metrics correlate with" Raptor's fit but gives no
    formula; these are defined here (pairs i < j, diagonal excluded, D the dissimilarity):

    - ``mean_dissimilarity``: mean D over all pairs; partition-free (low = layers alike, the
      paper's "mean off-diagonal similarity" turned around);
    - ``contrast``: mean D between phases − mean D within phases (high = crisp phases; NaN when
      there is one phase or no within-phase pair);
    - ``cut_fraction``: Σ D between phases / Σ D, the max-cut objective normalised (in [0, 1]);
    - ``normalized_cut``: the mean over phases of cut(P, rest) / vol(P) on the affinity
      A = 1 − D / max D (Shi & Malik's k-way normalised cut divided by k; in [0, 1], low =
      phases well separated);
    - ``silhouette``: scikit-learn's silhouette score with D as the precomputed distance
      (in [−1, 1], high = each layer closer to its phase than to the next; needs 2 ≤ k < n).

    Parameters
    ----------
    dissimilarity : xarray.DataArray or array-like, (n, n)
    partition : list of list of int
        Phases of the matrix's layer labels (all of them).

    Returns
    -------
    dict of str to float
    """
    weights, labels = as_matrix(dissimilarity)
    layers, phase = partition_labels(partition)
    if sorted(layers.tolist()) != sorted(labels.tolist()):
        raise ValueError(f"the partition covers layers {layers.tolist()}, the matrix {labels.tolist()}")
    phase = phase[np.searchsorted(layers, labels)]  # in the matrix's row order
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
    n_boot: int = 200,
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
    n_boot : int
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
        - ``consensus_phase`` (layer): phase index per layer of the consensus partition, the
          replicate partition with the least total pair disagreement (Mirkin distance) to all
          replicates (a medoid: always a partition the method itself produced);
        - attrs ``consensus`` (JSON of the partition), ``consensus_support`` (fraction of
          replicates equal to it), ``n_boot``, ``method``, ``eps``, ``k``.
    """
    if per_image.dims != ("image", "layer_i", "layer_j"):
        raise ValueError(f"expected per-image matrices (image, layer_i, layer_j), got {per_image.dims}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    matrices = np.asarray(per_image.values, dtype=float)
    n_images = matrices.shape[0]
    layers = per_image["layer_i"].values
    rng = np.random.default_rng(seed)
    found: dict[tuple, int] = {}
    for _ in tqdm(range(n_boot), desc="bootstrap", unit="replicate", disable=not progress):
        counts = np.bincount(rng.integers(0, n_images, n_images), minlength=n_images)
        replicate = per_image.isel(image=0, drop=True).copy(data=np.tensordot(counts, matrices, 1) / n_images)
        partition = partition_matrix(replicate, method, eps=eps, k=k)
        key = tuple(tuple(phase) for phase in partition)
        found[key] = found.get(key, 0) + 1
    partitions, weights = list(found), np.array(list(found.values()), dtype=float)
    together = np.stack([_comembership(partition, layers) for partition in partitions]).astype(float)
    coassociation = np.tensordot(weights, together, 1) / n_boot
    disagreement = (together * (1 - coassociation) + (1 - together) * coassociation).sum((1, 2))
    best = int(np.argmin(disagreement))
    consensus = [list(phase) for phase in partitions[best]]
    frequency = np.zeros(len(layers) - 1)
    for partition, weight in zip(partitions, weights):
        frequency[np.searchsorted(layers, boundaries(partition))] += weight
    _, consensus_phase = partition_labels(consensus)
    return xr.Dataset(
        {
            "boundary_frequency": (
                "after_layer",
                frequency / n_boot,
                {"description": "fraction of replicates in which a new phase begins after this layer"},
            ),
            "coassociation": (
                ("layer_i", "layer_j"),
                coassociation,
                {"description": "fraction of replicates with both layers in one phase"},
            ),
            "consensus_phase": ("layer", consensus_phase, {"description": "phase index of the consensus partition"}),
        },
        coords={"after_layer": layers[:-1], "layer": layers, "layer_i": layers, "layer_j": layers},
        attrs={
            "consensus": json.dumps(consensus),
            "consensus_support": float(weights[best] / n_boot),
            "n_boot": n_boot,
            "method": method,
            "eps": eps,
            "k": -1 if k is None else k,
            "seed": seed,
            "measure": per_image.attrs.get("measure", ""),
            "tokens": per_image.attrs.get("tokens", ""),
            "model": per_image.attrs.get("model", ""),
        },
    )


def _comembership(partition, layers: np.ndarray) -> np.ndarray:
    ordered, phase = partition_labels(partition)
    phase = phase[np.searchsorted(ordered, layers)]
    return phase[:, None] == phase[None, :]
