"""Partitions of depth from a layer × layer dissimilarity: the paper's recursive max-cut (exact by
branch and bound up to ``EXACT_MAXCUT_LIMIT`` layers) and the optimal contiguous split by DP.
"""

from __future__ import annotations

import warnings

import networkx as nx
import numpy as np
import xarray as xr
from networkx.algorithms.approximation import one_exchange
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from dynamo.partition import Partition

DESCRIPTION = "Phases of depth from a layer dissimilarity: the paper's recursive max-cut, or the optimal contiguous split."
EXACT_MAXCUT_LIMIT = 48  # exact max-cut (branch and bound) up to this many layers, a heuristic above
TIE_TOLERANCE = 1e-9  # cut values closer than this fraction of the total weight are ties
LEAF_VERTICES = 10  # the exact search enumerates the last this many vertices together (2^10 per node)
SEARCH_CHUNK = 2048  # nodes per batch of the exact search
DIVE_WIDTH = 32  # nodes kept per batch by its first, beam dive
NEWTON_STEPS = 8  # per bound of the exact search (each node's own best eigenvalue shift)


def as_matrix(dissimilarity) -> tuple[np.ndarray, np.ndarray]:
    """A square symmetric float matrix and its layer labels (``layer_i`` of a DataArray, else 1..n).

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
    """Maximum cut of symmetric (n, n) ``weights`` (n ≤ 64, diagonal ignored), exactly, by branch and bound.

    Among tied maxima (within ``TIE_TOLERANCE`` · Σ_{i<j} |W[i, j]|) the first in the order of
    ``itertools.product([0, 1], repeat=n-1)``, as the paper's brute force keeps. Nodes are pruned by
    an eigenvalue bound (Poljak & Rendl, `_SearchTree.bounds`); the worst case is exponential.

    Returns
    -------
    value : float
        Total weight of the pairs on opposite sides.
    side : numpy.ndarray of bool, (n,)
        True for the vertices on the side without vertex 0.
    """
    weights = np.array(weights, dtype=float)
    np.fill_diagonal(weights, 0.0)
    n = weights.shape[0]
    if n < 2:
        return 0.0, np.zeros(n, dtype=bool)
    if n > 64:
        raise ValueError(f"exact max-cut takes at most 64 vertices (assignments are 63-bit codes), got {n}")
    with threadpool_limits(limits=1, user_api="blas"):  # small products: threads only contend
        tree = _SearchTree(weights)
        known = tree.search(-np.inf, "max", width=DIVE_WIDTH)
        best = tree.search(known, "max")
        code = tree.search(best - tree.tol, "first")
    side = np.concatenate([[False], (code >> np.arange(n - 2, -1, -1)) & 1]).astype(bool)
    ones = side.astype(float)
    return float(ones @ weights @ (1 - ones)), side


class _SearchTree:
    """The branch and bound of `exact_maxcut` over one weight matrix (zero diagonal).

    A batch of nodes at depth d (vertices 0..d−1 fixed, vertex 0 on side 0) is ``to_one`` (N, n),
    each vertex's weight to the fixed vertices on side 1; ``cut`` (N,); ``code`` (N,) int64, the bits x₁…x_{d−1}.
    """

    def __init__(self, weights: np.ndarray):
        self.weights = weights
        n = self.n = weights.shape[0]
        self.tol = TIE_TOLERANCE * max(np.abs(np.triu(weights, 1)).sum(), np.finfo(float).tiny)
        self.to_fixed = np.cumsum(weights, axis=0)  # [d − 1, v]: weight of v to vertices 0..d−1
        self.leaf_depth = max(n - LEAF_VERTICES, 1)
        tail = n - self.leaf_depth
        self.leaf_bits = ((np.arange(1 << tail)[:, None] >> np.arange(tail - 1, -1, -1)) & 1).astype(float)
        last = weights[self.leaf_depth :, self.leaf_depth :]
        self.leaf_cuts = np.einsum("ai,ij,aj->a", self.leaf_bits, last, 1 - self.leaf_bits)
        self.spectra = {}
        if self.leaf_depth > 1:
            shift = _dual_diagonal(weights[1:, 1:])
            for depth in range(2, self.leaf_depth + 1):
                free, diagonal = weights[depth:, depth:], shift[depth - 1 :]
                eigenvalues, vectors = np.linalg.eigh(np.diag(diagonal) - free / 4)
                top = eigenvalues[-1]
                constant = len(free) * top - diagonal.sum() + self.to_fixed[depth - 1, depth:].sum() / 2 + free.sum() / 4
                self.spectra[depth] = (top - eigenvalues, vectors, constant)

    def bounds(self, depth: int, to_one: np.ndarray, cut: np.ndarray) -> np.ndarray:
        """Upper bounds (N,) on the best cut completing each node at ``depth`` (≥ 2).

        A completion cuts C + ½ δ·y − ¼ yᵀ W_R y over spins y of the free vertices R; for any diagonal
        shift this is at most (k + 1)·λ_max of the bordered matrix M = [[u₀, δᵀ/4], [δ/4, diag(u) − W_R/4]]
        minus the shifts. Choosing u₀ so that λ_max + t is M's top eigenvalue, any t > 0 gives a valid
        bound; the least is where Σ cᵢ / (t + gᵢ)² = k, reached by Newton steps on a concave, increasing
        function of t, which climb to the root without overshooting it.
        """
        gaps, vectors, constant = self.spectra[depth]
        k = len(gaps)
        c = (((self.to_fixed[depth - 1, depth:] - 2 * to_one[:, depth:]) / 4) @ vectors) ** 2
        start = self.tol / self.n  # t > 0, small against the weights
        t = np.full(len(cut), start)
        for _ in range(NEWTON_STEPS):
            inverse = 1 / (t[:, None] + gaps)
            phi, slope = (c * inverse**2).sum(1), np.maximum((c * inverse**3).sum(1), np.finfo(float).tiny)
            t = np.maximum(t + phi * (np.sqrt(phi / k) - 1) / slope, start)
        return cut + constant + k * t + (c / (t[:, None] + gaps)).sum(1)

    def search(self, floor: float, mode: str, width: int | None = None):
        """Depth-first search, nodes batched.

        ``mode="max"``: the largest cut value beating ``floor`` by more than tol, best bound first; with
        ``width``, a beam dive keeping the best ``width`` nodes of each batch. ``"first"``: the code of
        the first assignment, in the paper's order, whose cut reaches ``floor``.
        """
        best = floor
        if mode == "max":
            floor = best + self.tol
        tail = self.n - self.leaf_depth
        stack = [(1, np.zeros((1, self.n)), np.zeros(1), np.zeros(1, dtype=np.int64))]
        while stack:
            depth, to_one, cut, code = stack.pop()
            if depth == self.leaf_depth:
                values = (
                    (cut + to_one[:, depth:].sum(1))[:, None]
                    + (self.to_fixed[depth - 1, depth:] - 2 * to_one[:, depth:]) @ self.leaf_bits.T
                    + self.leaf_cuts
                )
                if mode == "first":
                    hits = np.flatnonzero(values.ravel() >= floor)
                    if hits.size:
                        node, rest = divmod(int(hits[0]), values.shape[1])
                        return (int(code[node]) << tail) | rest
                else:
                    best = max(best, float(values.max()))
                    floor = best + self.tol
                continue
            pivot = to_one[:, depth]  # the next vertex's weight to fixed side 1
            to_one = np.stack([to_one, to_one + self.weights[depth]], 1).reshape(-1, self.n)
            cut = np.stack([cut + pivot, cut + self.to_fixed[depth - 1, depth] - pivot], 1).ravel()
            code = np.stack([code << 1, (code << 1) | 1], 1).ravel()  # children in the paper's order
            bound = self.bounds(depth + 1, to_one, cut)
            keep = np.flatnonzero(bound >= floor)
            if mode == "max":
                keep = keep[np.argsort(-bound[keep], kind="stable")][:width]
            for start in range((len(keep) - 1) // SEARCH_CHUNK * SEARCH_CHUNK, -1, -SEARCH_CHUNK):
                batch = keep[start : start + SEARCH_CHUNK]
                stack.append((depth + 1, to_one[batch], cut[batch], code[batch]))
        return best if mode == "max" else None


def _dual_diagonal(weights: np.ndarray) -> np.ndarray:
    """The diagonal u minimising k·λ_max(diag(u) − W/4) − Σu (the SDP dual of max-cut), by L-BFGS."""
    k = weights.shape[0]

    def objective(shift):
        eigenvalues, vectors = np.linalg.eigh(np.diag(shift) - weights / 4)
        return k * eigenvalues[-1] - shift.sum(), k * vectors[:, -1] ** 2 - 1

    return minimize(objective, weights.sum(1) / 4, jac=True, method="L-BFGS-B", options={"maxiter": 100}).x


def maxcut_is_exact(n_layers: int, exact_limit: int = EXACT_MAXCUT_LIMIT) -> bool:
    """Whether `maxcut_partition` of ``n_layers`` layers cuts every cluster exactly."""
    return n_layers <= exact_limit


def heuristic_maxcut(weights: np.ndarray, restarts: int = 16, seed: int = 0) -> tuple[float, np.ndarray]:
    """Large max-cut by networkx's one-exchange local search, best of several random starts; as `exact_maxcut`."""
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


def maxcut_partition(dissimilarity, eps: float = 0.1, *, k: int | None = None, min_size: int = 2,
                     exact_limit: int = EXACT_MAXCUT_LIMIT, restarts: int = 16, seed: int = 0) -> Partition:
    """The paper's recursive max-cut bisection of layers into phases (the notebook's ``recursive_max_cut``).

    The cluster of largest gain is split by its max-cut while the cut weight exceeds ε = eps · ΣW / 2
    (or until ``k`` phases); clusters of fewer than ``2·min_size`` layers are not split. Contiguity is
    not enforced and max-cut favours balanced bisections: `contiguous_partition` is the check.
    Clusters above ``exact_limit`` (≤ 64) layers are cut by `heuristic_maxcut` (``restarts``,
    ``seed``) with a `UserWarning`. Returns the phases as layer labels.
    """
    weights, labels = as_matrix(dissimilarity)
    if k is not None and not 1 <= k <= len(labels):
        raise ValueError(f"k must be between 1 and the number of layers ({len(labels)}), got {k}")
    if exact_limit > 64:
        raise ValueError(f"exact_limit is at most 64 layers (the exact max-cut's limit), got {exact_limit}")
    heuristic = []
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
            heuristic.append(members.size)
        if value <= threshold:
            gains[target] = -np.inf
            continue
        clusters[target] = members[~side]
        clusters.append(members[side])
        gains[target] = value
        gains.append(value)
    if k is not None and len(clusters) < k:
        raise ValueError(
            f"k={k} phases cannot be reached: the recursive max-cut stops at {len(clusters)} phases, as it never "
            f"splits a run of fewer than {2 * min_size} layers (min_size={min_size}, the paper's rule); ask for at most "
            f"{len(clusters)} phases, or use the contiguous method (method='contiguous', --method contiguous)"
        )
    if heuristic:
        warnings.warn(
            f"max-cut of {max(heuristic)} layers is above the exact limit of {exact_limit}: cut by "
            "networkx's one-exchange heuristic, which may miss the maximum (not the paper's partition)",
            stacklevel=2,
        )
    return to_partition(clusters, labels)


def segment_costs(weights: np.ndarray) -> np.ndarray:
    """``cost[a, b]`` = Σ_{a ≤ i < j < b} W[i, j], the within-segment weight of layers a..b−1, (n + 1, n + 1)."""
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
        ``best[j, b]``: least within-phase weight of the first b layers in j phases (inf where impossible).
    start : numpy.ndarray of int, (k_max + 1, n + 1)
        Where the last phase of that optimum starts (ties: the earliest).
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

    Minimises the within-phase dissimilarity (the max-cut objective restricted to contiguous
    partitions); ``k`` is 1..n / ``min_size``.
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

    ``"fraction"``: the smallest k whose next phase would lower the optimal within-phase weight by no
    more than ε = eps · ΣW / 2; ``"elbow"``: the k farthest below the chord of the cost curve up to
    ``k_max`` (default n // min_size).
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
