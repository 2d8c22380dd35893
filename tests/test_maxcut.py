"""The exact max-cut above 20 layers against an independent brute force, ties included."""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest

import dynamo
from analyses.phases import phase_analysis, summarize
from analyses.segmentation import EXACT_MAXCUT_LIMIT, exact_maxcut, maxcut_is_exact, maxcut_partition
from tests.conftest import tiny_model

# --- independent reference ---------------------------------------------------------------------


def bits(count: int, width: int) -> np.ndarray:
    """Rows 0..count−1 written in binary over ``width`` columns, most significant first, (count, width)."""
    return ((np.arange(count)[:, None] >> np.arange(width - 1, -1, -1)) & 1).astype(float)


def brute_force(W: np.ndarray, tie_tolerance: float = 0.0) -> tuple[float, np.ndarray, int]:
    """Every assignment x ∈ {0, 1}^n with x_0 = 0, in the paper's order (``itertools.product``
    over x_1..x_{n−1}, x_1 most significant): the first whose cut Σ_{i<j} W_ij [x_i ≠ x_j] is
    within ``tie_tolerance`` of the largest, its side x (bool), and how many reach that largest.

    All 2^(n−1) cut values are laid out as a grid, rows the first vertices' bits and columns
    the last 12's, so row-major order is the paper's order: cut(x) = Σ_i d_i x_i − xᵀWx with
    d the row sums, split into each half's own terms and the cross term 2 x_highᵀ W x_low.
    """
    W = np.array(W, dtype=float)
    np.fill_diagonal(W, 0.0)
    n = len(W)
    low = min(n - 1, 12)
    split = n - low
    high = np.hstack([np.zeros((1 << (split - 1), 1)), bits(1 << (split - 1), split - 1)])  # x_0 = 0
    tail = bits(1 << low, low)
    degree = W.sum(1)

    def own(x, block, d):
        return x @ d - np.einsum("ai,ij,aj->a", x, block, x)

    values = (
        own(high, W[:split, :split], degree[:split])[:, None]
        + own(tail, W[split:, split:], degree[split:])[None, :]
        - 2 * (high @ W[:split, split:]) @ tail.T
    ).ravel()
    best = values.max()
    first = int(np.flatnonzero(values >= best - tie_tolerance)[0])
    side = np.array([False, *((first >> np.arange(n - 2, -1, -1)) & 1).astype(bool)])
    return float(values[first]), side, int((values == best).sum())


def paper_recursion(W: np.ndarray, eps: float, cut, min_size: int = 2) -> list[list[int]]:
    """The Raptor notebook's ``recursive_max_cut`` loop; ``cut(members)`` solves the max-cut of
    ``W[np.ix_(members, members)]`` (members a tuple of row indices)."""
    clusters = [np.arange(W.shape[0])]
    gains = {0: np.inf}
    while True:
        target = max(gains, key=gains.get)
        if gains[target] <= eps:
            break
        members = clusters[target]
        if members.size < 2 * min_size:
            gains[target] = -np.inf
            continue
        value, side = cut(tuple(members.tolist()))
        if value <= eps:
            gains[target] = -np.inf
            continue
        clusters[target] = members[~side]
        clusters.append(members[side])
        gains[target] = value
        gains[len(clusters) - 1] = value
    return sorted((sorted(int(i) + 1 for i in c) for c in clusters), key=lambda phase: phase[0])


def matrix(kind: str, n: int) -> np.ndarray:
    """A symmetric zero-diagonal test matrix: ``"real"`` uniform weights; ``"integer"`` weights
    0..3 with twin layers (equal rows: a cut that parts twins ties with its swap) and a layer
    of zero weights (its side never matters), so maxima tie; ``"decimal"`` the same in tenths,
    whose tied cuts differ by rounding."""
    rng = np.random.default_rng(1000 * n + len(kind))
    if kind == "real":
        W = rng.random((n, n))
    else:
        W = rng.integers(0, 4, (n, n)).astype(float)
        W = np.triu(W, 1) + np.triu(W, 1).T
        for a, b in [(2, 5), (7, 8), (11, n - 1)]:  # twins: b copies a's weights
            W[b], W[:, b] = W[a], W[a]
            W[a, b] = W[b, a] = 3.0  # the heaviest weight, so twins tend to be cut apart
        W[4], W[:, 4] = 0.0, 0.0  # a layer at distance 0 from all: its side never matters
        W = W / 10 if kind == "decimal" else W
    W = (W + W.T) / 2
    np.fill_diagonal(W, 0.0)
    return W


@functools.cache
def reference(kind: str, n: int) -> tuple[float, tuple[bool, ...], int]:
    W = matrix(kind, n)
    tolerance = 1e-9 * np.triu(W, 1).sum() if kind == "decimal" else 0.0
    value, side, n_best = brute_force(W, tolerance)
    return value, tuple(side.tolist()), n_best


# --- exact max-cut -----------------------------------------------------------------------------


def test_brute_force_reference_on_a_small_case():
    W = np.ones((6, 6))
    value, side, n_best = brute_force(W)
    assert value == 9 and n_best == 10  # every 3-3 split, vertex 0 pinned: C(5, 2)
    assert side.tolist() == [False, False, False, True, True, True]  # x_1..x_5 = 00111: the first 3-3 split
    assert exact_maxcut(W)[1].tolist() == side.tolist()


@pytest.mark.parametrize("n", [21, 22, 23, 24])
@pytest.mark.parametrize("kind", ["real", "integer", "decimal"])
def test_exact_maxcut_equals_brute_force_with_its_tie_breaking(n, kind):
    value, side, n_best = reference(kind, n)
    found, found_side = exact_maxcut(matrix(kind, n))
    assert found == pytest.approx(value, rel=1e-12)
    assert found_side.tolist() == list(side)
    if kind == "integer":
        assert n_best > 1  # the twins make ties, so the first-of-the-maxima rule is tested


@pytest.mark.parametrize("n", [21, 22, 23, 24])
@pytest.mark.parametrize("kind", ["real", "integer"])
def test_recursive_maxcut_equals_the_papers_recursion_on_brute_force(n, kind):
    W = matrix(kind, n)

    @functools.cache  # clusters recur across the values of f
    def cut(members: tuple[int, ...]) -> tuple[float, np.ndarray]:
        if len(members) == n:  # the root: the cached brute force
            value, side, _ = reference(kind, n)
            return value, np.array(side)
        return brute_force(W[np.ix_(members, members)])[:2]

    for f in (0.2, 0.1, 0.05):
        assert maxcut_partition(W, f) == paper_recursion(W, f * W.sum() / 2, cut), (n, kind, f)


def test_forty_layers_are_cut_exactly_without_a_warning():
    """ViT-g's depth (40 blocks) is within the exact limit; a random matrix is the slow case."""
    assert EXACT_MAXCUT_LIMIT >= 40 and maxcut_is_exact(40) and not maxcut_is_exact(EXACT_MAXCUT_LIMIT + 1)
    W = matrix("real", 40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        partition = maxcut_partition(W, k=4)
    assert sorted(layer for phase in partition for layer in phase) == list(range(1, 41))


# --- above the exact limit ---------------------------------------------------------------------


def test_above_the_limit_the_heuristic_warns_and_the_summary_says_so(tmp_path, digits_folder, one_thread):
    path = tmp_path / "deep.zarr"
    dynamo.record(tiny_model("cls", depth=EXACT_MAXCUT_LIMIT + 2), digits_folder, path, limit=8, batch_size=8, progress=False)
    ds = dynamo.open_trajectories(path)
    with pytest.warns(UserWarning, match="heuristic"):
        deep = phase_analysis(ds, "maxcut", k=3, n_bootstrap=0, progress=False)
    assert deep.attrs["maxcut_exact"] is False and summarize(deep)["maxcut_exact"] is False
    assert "heuristic" in deep.attrs["gradient_null_conclusion"] and "null_dissimilarity" not in deep  # not re-run per draw
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shallow = phase_analysis(ds, "maxcut", k=3, layers=range(1, 25), n_bootstrap=0, progress=False)
    assert summarize(shallow)["maxcut_exact"] is True
    assert "maxcut_exact" not in summarize(phase_analysis(ds, "contiguous", k=3, n_bootstrap=0, progress=False))
    with pytest.raises(ValueError, match="exact_limit"):
        maxcut_partition(np.ones((4, 4)), k=2, exact_limit=65)
