"""Partitions of depth from a layer × layer dissimilarity: the paper's max-cut and an exact DP.

Both return a `dynamo.partition.Partition` of the matrix's layer labels (1-based block indices
when the matrix covers blocks 1..L), e.g. ``[[1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12]]``.

Both methods optimise the same quantity, the weight W[i, j] = D[i, j] of pairs that end up in
different phases (equivalently, they minimise the within-phase dissimilarity, since the two
add up to the total):

- `maxcut_partition`: the paper's recursive bisection (Raptor notebook
  ``000_max_cut_dinov2_base``), contiguity not enforced;
- `contiguous_partition`: the optimal split into k contiguous phases, by dynamic programming.
"""

from __future__ import annotations

import networkx as nx
import numpy as np
import xarray as xr
from networkx.algorithms.approximation import one_exchange

from dynamo.partition import Partition

DESCRIPTION = "Phases of depth from a layer dissimilarity: the paper's recursive max-cut, or the optimal contiguous split."
EXACT_MAXCUT_LIMIT = 20  # brute force over 2^(n-1) assignments up to this many layers


def as_matrix(dissimilarity) -> tuple[np.ndarray, np.ndarray]:
    """A square symmetric float matrix and its layer labels.

    Parameters
    ----------
    dissimilarity : xarray.DataArray or array-like, (n, n)
        A DataArray from `analyses.similarity.layer_similarity` (its ``layer_i`` coords are the
        labels) or a plain array (labels 1..n).

    Raises
    ------
    ValueError
        Not square, not symmetric, not finite, or a similarity (attrs say so).
    """
    if isinstance(dissimilarity, xr.DataArray):
        if dissimilarity.attrs.get("orientation") == "similarity":
            raise ValueError(
                "this matrix is a similarity; partitions need a dissimilarity (1 - similarity, "
                "or layer_similarity's output as it is)"
            )
        if dissimilarity.ndim != 2:
            raise ValueError(f"expected a (layer_i, layer_j) matrix, got dims {dissimilarity.dims}")
        dim = dissimilarity.dims[0]
        labels = np.asarray(dissimilarity[dim].values) if dim in dissimilarity.coords else None
        matrix = np.asarray(dissimilarity.values, dtype=float)
    else:
        matrix = np.asarray(dissimilarity, dtype=float)
        labels = None
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"expected a square matrix, got shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise ValueError("the matrix has NaN or infinite entries")
    if not np.allclose(matrix, matrix.T, rtol=1e-6, atol=1e-9):
        raise ValueError("the matrix is not symmetric; symmetrise it ((D + D.T) / 2) first")
    if labels is None:
        labels = np.arange(1, matrix.shape[0] + 1)
    return (matrix + matrix.T) / 2, labels.astype(int)


def to_partition(groups, labels) -> Partition:
    """Groups of row indices -> the `Partition` of their labels (empty groups dropped)."""
    return Partition(np.asarray(labels)[np.asarray(group, dtype=int)] for group in groups if len(group))


def exact_maxcut(weights: np.ndarray) -> tuple[float, np.ndarray]:
    """Maximum cut by exhaustive search over the 2^(n−1) assignments (vertex 0 pinned).

    Assignments are scanned in the paper's order (``itertools.product([0, 1], repeat=n-1)``)
    and the first maximum is kept, so ties break as in the paper's brute force.

    Parameters
    ----------
    weights : numpy.ndarray, (n, n)
        Symmetric edge weights.

    Returns
    -------
    value : float
        Total weight of the pairs on opposite sides.
    side : numpy.ndarray of bool, (n,)
        True for the vertices on the side without vertex 0.
    """
    n = weights.shape[0]
    degree = weights.sum(1)
    shifts = np.arange(n - 2, -1, -1)
    best_value, best_side = -np.inf, np.zeros(n, dtype=bool)
    chunk = 1 << 16
    for start in range(0, 1 << (n - 1), chunk):
        codes = np.arange(start, min(start + chunk, 1 << (n - 1)))
        sides = np.zeros((len(codes), n))
        sides[:, 1:] = (codes[:, None] >> shifts) & 1
        values = sides @ degree - np.einsum("ai,ai->a", sides @ weights, sides)
        best = int(np.argmax(values))
        if values[best] > best_value:
            best_value, best_side = float(values[best]), sides[best].astype(bool)
    return best_value, best_side


def heuristic_maxcut(weights: np.ndarray, restarts: int = 16, seed: int = 0) -> tuple[float, np.ndarray]:
    """Large max-cut by networkx's one-exchange local search, best of several random starts.

    Returns the same ``(value, side)`` as `exact_maxcut` (vertex 0 on the False side).
    """
    graph = nx.from_numpy_array(weights)
    rng = np.random.default_rng(seed)
    best_value, best_side = -np.inf, None
    for _ in range(restarts):
        value, (first, _) = one_exchange(graph, seed=int(rng.integers(2**31)), weight="weight")
        if value > best_value:
            side = np.ones(len(weights), dtype=bool)
            side[list(first)] = False
            best_value, best_side = float(value), side if not side[0] else ~side
    return best_value, best_side


def maxcut_partition(
    dissimilarity,
    eps: float = 0.1,
    *,
    k: int | None = None,
    min_size: int = 2,
    exact_limit: int = EXACT_MAXCUT_LIMIT,
    restarts: int = 16,
    seed: int = 0,
) -> Partition:
    """The paper's recursive max-cut bisection of layers into phases.

    With edge weights W = D and ε = eps · ΣW / 2: start from one cluster of all layers with gain
    ∞; repeatedly take the cluster of largest gain (stop when it is ≤ ε); a cluster of fewer than
    ``2·min_size`` layers is not split; otherwise solve its max-cut, and if the cut weight is
    > ε replace the cluster by its two sides, each inheriting the cut weight as its gain (else
    mark it final). Contiguity is not enforced. This is the notebook's ``recursive_max_cut``
    with its brute-force solver, for the same matrix the same partition.

    Max-cut favours balanced bisections: with phases of unequal size, a split through the middle
    of a phase can cut more weight than a split between phases, so the bisection may cut a
    phase in two. `contiguous_partition` with the same k is the check.

    Parameters
    ----------
    dissimilarity : xarray.DataArray or array-like, (n, n)
        Layer dissimilarity, e.g. `analyses.similarity.layer_similarity`.
    eps : float
        The fraction f of the total weight below which a split is not worth making. The paper
        uses 0.2 (2 phases on DINOv2-B), 0.1 (3) and 0.09 (4).
    k : int, optional
        Stop at k phases instead (eps is then not used); splits follow the same priority.
    min_size : int
        Clusters smaller than ``2·min_size`` are never split (the paper's 2).
    exact_limit : int
        Clusters up to this many layers are cut exactly by brute force; larger ones by
        networkx's one-exchange heuristic with ``restarts`` random starts from ``seed``.

    Returns
    -------
    Partition
        The phases, as layer labels (the matrix's ``layer_i`` coords, or 1..n).

    Raises
    ------
    ValueError
        Bad matrix, or k phases cannot be reached with this ``min_size``.
    """
    weights, labels = as_matrix(dissimilarity)
    if k is not None and not 1 <= k <= len(labels):
        raise ValueError(f"k must be between 1 and the number of layers ({len(labels)}), got {k}")
    threshold = -np.inf if k is not None else eps * weights.sum() / 2
    clusters = [np.arange(len(labels))]
    gains = [np.inf]
    while k is None or len(clusters) < k:
        target = int(np.argmax(gains))  # first of the largest, as max(dict) in the notebook
        if gains[target] <= threshold:
            break
        members = clusters[target]
        if members.size < 2 * min_size:
            gains[target] = -np.inf
            continue
        block = weights[np.ix_(members, members)]
        if members.size <= exact_limit:
            value, side = exact_maxcut(block)
        else:
            value, side = heuristic_maxcut(block, restarts=restarts, seed=seed)
        if value <= threshold:
            gains[target] = -np.inf
            continue
        clusters[target] = members[~side]
        clusters.append(members[side])
        gains[target] = value
        gains.append(value)
    if k is not None and len(clusters) < k:
        raise ValueError(
            f"the recursive max-cut stops at {len(clusters)} phases: clusters under "
            f"2*min_size={2 * min_size} layers are not split; lower min_size or k"
        )
    return to_partition(clusters, labels)


def segment_costs(weights: np.ndarray) -> np.ndarray:
    """Within-segment weight of every contiguous segment, from 2-D prefix sums.

    Returns
    -------
    numpy.ndarray, (n + 1, n + 1)
        ``cost[a, b]`` = Σ_{a ≤ i < j < b} W[i, j] for a < b (layers a..b−1 by position).
    """
    n = weights.shape[0]
    prefix = np.zeros((n + 1, n + 1))
    prefix[1:, 1:] = weights.cumsum(0).cumsum(1)
    diagonal = np.concatenate([[0.0], np.cumsum(np.diag(weights))])
    a, b = np.arange(n + 1)[:, None], np.arange(n + 1)[None, :]
    block = prefix[b, b] - prefix[a, b] - prefix[b, a] + prefix[a, a]
    return (block - (diagonal[b] - diagonal[a])) / 2


def contiguous_segmentation(weights: np.ndarray, k_max: int, min_size: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Optimal contiguous segmentations into 1..k_max phases by dynamic programming, O(k·n²).

    Returns
    -------
    best : numpy.ndarray, (k_max + 1, n + 1)
        ``best[j, b]`` = least within-phase weight of the first b layers in j phases (inf where
        impossible).
    start : numpy.ndarray of int, (k_max + 1, n + 1)
        Where the last phase of that optimum starts (ties: the earliest start).
    """
    n = weights.shape[0]
    cost = segment_costs(weights)
    lengths = np.arange(n + 1)[None, :] - np.arange(n + 1)[:, None]
    cost = np.where(lengths >= min_size, cost, np.inf)
    best = np.full((k_max + 1, n + 1), np.inf)
    start = np.zeros((k_max + 1, n + 1), dtype=int)
    best[0, 0] = 0.0
    for phases in range(1, k_max + 1):
        candidates = best[phases - 1][:, None] + cost  # (start a, end b)
        start[phases] = np.argmin(candidates, axis=0)
        best[phases] = candidates[start[phases], np.arange(n + 1)]
    return best, start


def contiguous_partition(dissimilarity, k: int, *, min_size: int = 1) -> Partition:
    """The exact best split of the layers, in their order, into k contiguous phases.

    Minimises the total within-phase dissimilarity Σ_phases Σ_{i<j in phase} D[i, j], which is
    the same as maximising the k-way cut between phases (the max-cut objective restricted to
    contiguous partitions). Dynamic programming over segment end points, O(k·n²) time.

    Parameters
    ----------
    dissimilarity : xarray.DataArray or array-like, (n, n)
        Layer dissimilarity; rows in depth order.
    k : int
        Number of phases, 1 ≤ k ≤ n / min_size.
    min_size : int
        Fewest layers in a phase.

    Returns
    -------
    Partition
        The phases as layer labels.
    """
    weights, labels = as_matrix(dissimilarity)
    n = len(labels)
    if not 1 <= k <= n // min_size:
        raise ValueError(f"k must be between 1 and {n // min_size} for {n} layers with min_size={min_size}, got {k}")
    _, start = contiguous_segmentation(weights, k, min_size)
    return to_partition(_trace_back(start, k, n), labels)


def _trace_back(start: np.ndarray, k: int, n: int) -> list[range]:
    segments, end = [], n
    for phases in range(k, 0, -1):
        begin = int(start[phases, end])
        segments.append(range(begin, end))
        end = begin
    return segments[::-1]


def choose_k(dissimilarity, rule: str = "fraction", *, eps: float = 0.1, k_max: int | None = None, min_size: int = 1) -> int:
    """Number of contiguous phases by the paper's fraction rule or by the elbow of the cost curve.

    The optimal within-phase weight C(k) falls as k grows. ``"fraction"`` (the contiguous
    analogue of the max-cut's stopping rule): the smallest k whose next phase would lower C by
    no more than ε = eps · ΣW / 2, the same ε the max-cut uses. ``"elbow"``: the k farthest
    below the chord from (1, C(1)) to (k_max, C(k_max)) (the "kneedle" point).

    Parameters
    ----------
    rule : {"fraction", "elbow"}
    eps : float
        The fraction f for ``"fraction"``.
    k_max : int, optional
        Largest k considered; default n // min_size.

    Returns
    -------
    int
    """
    weights, labels = as_matrix(dissimilarity)
    k_max = min(k_max or len(labels), len(labels) // min_size)
    best, _ = contiguous_segmentation(weights, k_max, min_size)
    costs = best[1:, len(labels)]
    if rule == "fraction":
        gains = costs[:-1] - costs[1:]
        small = np.flatnonzero(gains <= eps * weights.sum() / 2)
        return int(small[0]) + 1 if small.size else k_max
    if rule == "elbow":
        if k_max < 3:
            return k_max
        ks = np.arange(1, k_max + 1)
        chord = costs[0] + (costs[-1] - costs[0]) * (ks - 1) / (k_max - 1)
        return int(ks[np.argmax(chord - costs)])
    raise ValueError(f"unknown rule {rule!r}; choose 'fraction' or 'elbow'")
