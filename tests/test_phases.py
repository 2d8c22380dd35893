"""Phase partitions against independent references, their scores, stability and the CLI."""

from __future__ import annotations

import functools
import itertools
import json

import numpy as np
import pytest
import xarray as xr

import dynamo
from analyses.phases import (
    boundaries,
    boundary_stability,
    choose_k,
    contiguous_partition,
    find_phases,
    maxcut_partition,
    phase_analysis,
    phase_scores,
    summarize,
    thresholds,
)
from analyses.segmentation import exact_maxcut, heuristic_maxcut
from dynamo.partition import from_result
from dynamo.pipeline.cli import main

# --- independent references ------------------------------------------------------------------


def paper_recursive_max_cut(W: np.ndarray, eps: float, min_size: int = 2) -> list[list[int]]:
    """The Raptor notebook's ``recursive_max_cut`` with its brute-force solver, loop for loop."""

    def brute_force(sub):
        n = sub.shape[0]
        best_val, best_side = -np.inf, None
        for bits in itertools.product([0, 1], repeat=n - 1):
            side = np.array((0, *bits), dtype=bool)
            diff = np.logical_xor.outer(side, side)
            val = sub[diff].sum() / 2
            if val > best_val:
                best_val, best_side = val, side
        return best_val, best_side

    clusters = [np.arange(W.shape[0])]
    gains = {0: np.inf}
    while True:
        tgt = max(gains, key=gains.get)
        if gains[tgt] <= eps:
            break
        idx = clusters[tgt]
        if idx.size < 2 * min_size:
            gains[tgt] = -np.inf
            continue
        cut_val, side = brute_force(W[np.ix_(idx, idx)])
        if cut_val <= eps:
            gains[tgt] = -np.inf
            continue
        clusters[tgt] = idx[~side]
        clusters.append(idx[side])
        gains[tgt] = cut_val
        gains[len(clusters) - 1] = cut_val
    return sorted((sorted(int(i) + 1 for i in c) for c in clusters), key=lambda phase: phase[0])


def within_weight(W: np.ndarray, partition) -> float:
    return sum(W[i - 1, j - 1] for phase in partition for i, j in itertools.combinations(phase, 2))


def all_contiguous(n: int, k: int):
    for cuts in itertools.combinations(range(1, n), k - 1):
        edges = (0, *cuts, n)
        yield [list(range(a + 1, b + 1)) for a, b in zip(edges[:-1], edges[1:])]


def random_dissimilarity(rng, n: int) -> np.ndarray:
    W = rng.random((n, n))
    W = (W + W.T) / 2
    np.fill_diagonal(W, 0.0)
    return W


def planted(rng, sizes, within=0.1, between=0.8, noise=0.05, order=None) -> tuple[np.ndarray, list[list[int]]]:
    """A noisy block matrix and its true partition (layers 1..n, optionally permuted)."""
    labels = np.repeat(np.arange(len(sizes)), sizes)
    if order is not None:
        labels = labels[order]
    W = np.where(labels[:, None] == labels[None, :], within, between) + noise * rng.standard_normal((len(labels),) * 2)
    W = np.abs((W + W.T) / 2)
    np.fill_diagonal(W, 0.0)
    truth = sorted((sorted(int(i) + 1 for i in np.flatnonzero(labels == c)) for c in range(len(sizes))), key=lambda p: p[0])
    return W, truth


# --- max-cut ----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [4, 6, 9, 12])
def test_maxcut_equals_the_papers_brute_force_algorithm(n):
    rng = np.random.default_rng(n)
    for trial in range(4 if n == 12 else 10):
        W = random_dissimilarity(rng, n)
        for f in (0.2, 0.1, 0.09, 0.05):
            expected = paper_recursive_max_cut(W, f * W.sum() / 2)
            assert maxcut_partition(W, f) == expected, (n, trial, f)


def test_exact_maxcut_is_the_maximum_over_every_assignment():
    rng = np.random.default_rng(1)
    W = random_dissimilarity(rng, 9)
    values = [
        W[np.logical_xor.outer(side, side)].sum() / 2
        for side in (np.array(bits, dtype=bool) for bits in itertools.product([0, 1], repeat=9))
    ]
    value, side = exact_maxcut(W)
    assert value == pytest.approx(max(values))
    assert not side[0]
    assert W[np.logical_xor.outer(side, side)].sum() / 2 == pytest.approx(value)


def test_heuristic_maxcut_is_a_valid_cut_close_to_the_exact_one():
    rng = np.random.default_rng(2)
    W = random_dissimilarity(rng, 14)
    exact, _ = exact_maxcut(W)
    value, side = heuristic_maxcut(W, restarts=16, seed=0)
    assert W[np.logical_xor.outer(side, side)].sum() / 2 == pytest.approx(value)
    assert 0.95 * exact <= value <= exact + 1e-9


def test_maxcut_on_many_layers_uses_the_heuristic_and_recovers_planted_phases():
    rng = np.random.default_rng(3)
    W, truth = planted(rng, [8, 10, 6, 8])
    assert maxcut_partition(W, k=4, exact_limit=12) == truth


def test_maxcut_recovers_planted_phases_even_when_they_are_not_contiguous():
    rng = np.random.default_rng(4)
    W, truth = planted(rng, [4, 3, 5], order=rng.permutation(12))
    assert maxcut_partition(W, 0.1) == truth
    assert maxcut_partition(W, k=3) == truth
    with pytest.raises(ValueError, match="not contiguous"):
        thresholds(truth)


def test_maxcut_k_and_labels_from_coords():
    rng = np.random.default_rng(5)
    W, truth = planted(rng, [4, 3, 5])
    matrix = xr.DataArray(W, dims=("layer_i", "layer_j"), coords={"layer_i": np.arange(2, 14), "layer_j": np.arange(2, 14)})
    assert maxcut_partition(matrix, k=3) == [[layer + 1 for layer in phase] for phase in truth]
    assert maxcut_partition(W, k=1) == [list(range(1, 13))]
    with pytest.raises(ValueError, match="min_size"):
        maxcut_partition(W, k=12)


# --- contiguous DP ----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [3, 7, 10, 14])
def test_contiguous_dp_equals_exhaustive_search(n):
    rng = np.random.default_rng(10 + n)
    for _ in range(3):
        W = random_dissimilarity(rng, n)
        for k in range(1, min(n, 6) + 1):
            costs = {tuple(map(tuple, p)): within_weight(W, p) for p in all_contiguous(n, k)}
            best = min(costs, key=costs.get)
            found = contiguous_partition(W, k)
            assert within_weight(W, found) == pytest.approx(costs[best])
            assert found == [list(phase) for phase in best]


def test_contiguous_min_size_is_respected_and_optimal():
    rng = np.random.default_rng(20)
    W = random_dissimilarity(rng, 11)
    candidates = [p for p in all_contiguous(11, 3) if min(map(len, p)) >= 3]
    best = min(candidates, key=lambda p: within_weight(W, p))
    assert contiguous_partition(W, 3, min_size=3) == best
    with pytest.raises(ValueError, match="k must be"):
        contiguous_partition(W, 4, min_size=3)


def test_contiguous_and_choose_k_recover_planted_phases():
    rng = np.random.default_rng(21)
    W, truth = planted(rng, [4, 3, 5])
    assert contiguous_partition(W, 3) == truth
    assert choose_k(W, "fraction", eps=0.1) == 3
    assert choose_k(W, "elbow") == 3
    assert thresholds(truth) == [4, 7]


def test_contiguous_dp_on_48_layers_equals_a_plain_recursion():
    """At 48 layers (too many for exhaustive search) the DP's optimum equals a memoised recursion that re-sums each phase."""
    W = random_dissimilarity(np.random.default_rng(22), 48)
    n, k = 48, 8

    @functools.cache
    def best(start: int, phases: int) -> tuple[float, tuple[int, ...]]:  # layers start+1..n in `phases` phases
        if phases == 1:
            return within_weight(W, [range(start + 1, n + 1)]), (n,)
        options = []
        for end in range(start + 1, n - phases + 2):
            cost, ends = best(end, phases - 1)
            options.append((within_weight(W, [range(start + 1, end + 1)]) + cost, (end, *ends)))
        return min(options)

    optimum, ends = best(0, k)
    found = contiguous_partition(W, k)
    assert within_weight(W, found) == pytest.approx(optimum)
    assert [phase[-1] for phase in found] == list(ends)


# --- thresholds, boundaries, scores -----------------------------------------------------------


def test_thresholds_and_boundaries_follow_the_papers_tables():
    assert thresholds([[1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12]]) == [7]
    assert thresholds([[11, 12], [1, 2, 3, 4, 5, 6, 7], [8, 9, 10]]) == [7, 10]
    assert thresholds([[1, 2, 3, 4], [5, 6, 7], [8, 9, 10], [11, 12]]) == [4, 7, 10]
    assert thresholds([list(range(1, 13))]) == []
    assert boundaries([[1, 2, 5], [3, 4]]) == [2, 4]
    with pytest.raises(ValueError, match="overlap"):
        thresholds([[1, 2], [2, 3]])


def test_phase_scores_closed_form_on_four_layers():
    D = np.array([[0, 1, 4, 4], [1, 0, 4, 6], [4, 4, 0, 2], [4, 6, 2, 0]], dtype=float)
    scores = phase_scores(D, [[1, 2], [3, 4]])
    # pairs: within (1,2)=1, (3,4)=2; between 4, 4, 4, 6; total 21
    assert scores["mean_dissimilarity"] == pytest.approx(21 / 6)
    assert scores["contrast"] == pytest.approx(18 / 4 - 3 / 2)
    assert scores["cut_fraction"] == pytest.approx(18 / 21)
    # affinity 1 - D/6: within 5/6 and 4/6; between 2/6, 2/6, 2/6, 0
    cut1, vol1 = 2 / 6 + 2 / 6 + 2 / 6 + 0, 2 * 5 / 6
    cut2, vol2 = cut1, 2 * 4 / 6
    assert scores["normalized_cut"] == pytest.approx((cut1 / (cut1 + vol1) + cut2 / (cut2 + vol2)) / 2)
    # silhouette by hand: a = distance to the other member, b = mean distance to the other phase
    s = [(4 - 1) / 4, (5 - 1) / 5, (4 - 2) / 4, (5 - 2) / 5]
    assert scores["silhouette"] == pytest.approx(np.mean(s))


def test_phase_scores_prefer_the_planted_partition():
    rng = np.random.default_rng(30)
    W, truth = planted(rng, [4, 4, 4])
    shifted = [[1, 2], [3, 4, 5, 6, 7], [8, 9, 10, 11, 12]]
    good, bad = phase_scores(W, truth), phase_scores(W, shifted)
    assert good["contrast"] > bad["contrast"]
    assert good["silhouette"] > bad["silhouette"]
    assert good["normalized_cut"] < bad["normalized_cut"]
    assert np.isnan(phase_scores(W, [list(range(1, 13))])["contrast"])


# --- stability --------------------------------------------------------------------------------


def per_image_matrices(rng, n_images: int, sizes, noise: float) -> xr.DataArray:
    base, _ = planted(rng, sizes, noise=0.0)
    layers = np.arange(1, sum(sizes) + 1)
    values = base + noise * rng.standard_normal((n_images, len(layers), len(layers)))
    values = (values + values.transpose(0, 2, 1)) / 2
    values[:, layers - 1, layers - 1] = 0
    return xr.DataArray(values, dims=("image", "layer_i", "layer_j"), coords={"layer_i": layers, "layer_j": layers})


def test_bootstrap_stability_finds_true_boundaries_and_consensus():
    rng = np.random.default_rng(40)
    per_image = per_image_matrices(rng, 50, [4, 3, 5], noise=0.3)
    stability = boundary_stability(per_image, "contiguous", k=3, n_bootstrap=60, progress=False)
    frequency = stability["boundary_frequency"].to_series()
    assert frequency[4] > 0.9 and frequency[7] > 0.9
    assert frequency.drop([4, 7]).max() < 0.1
    assert from_result(stability) == [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 12]]
    assert stability["coassociation"].sel(layer_i=1, layer_j=4) > 0.9
    assert stability["coassociation"].sel(layer_i=1, layer_j=12) < 0.1


def test_bootstrap_of_identical_images_is_fully_stable():
    rng = np.random.default_rng(41)
    one = per_image_matrices(rng, 1, [3, 3], noise=0.0)
    stability = boundary_stability(xr.concat([one] * 8, "image"), "maxcut", eps=0.1, n_bootstrap=10, progress=False)
    assert stability["boundary_frequency"].values.tolist() == [0, 0, 1, 0, 0]
    assert stability.attrs["consensus_support"] == 1.0


# --- on a real store, and the CLI -------------------------------------------------------------


@pytest.fixture(scope="module")
def zoo_store(tmp_path_factory, digits_folder):
    path = tmp_path_factory.mktemp("phases") / "reg4.zarr"
    dynamo.record("dynamo-zoo/vit-digits-reg4", digits_folder, path, batch_size=16, progress=False)
    return path


def test_find_phases_and_analysis_on_a_zoo_store(zoo_store):
    ds = dynamo.open_trajectories(zoo_store)
    partition = find_phases(ds, "contiguous", k=3)
    assert [layer for phase in partition for layer in phase] == list(range(1, 13))
    result = phase_analysis(ds, "contiguous", k=3, n_bootstrap=20, progress=False)
    assert from_result(result) == partition
    assert summarize(result)["thresholds"] == thresholds(partition)
    assert result["boundary_frequency"].sizes["after_layer"] == 11
    assert result["dissimilarity"].attrs["measure"] == "cosine"


def test_cli_phases_json_and_figure(zoo_store, tmp_path, capsys):
    figure = tmp_path / "heatmap.png"
    assert main(["phases", str(zoo_store), "--k", "3", "--method", "contiguous", "--bootstrap", "10",
                 "--figure", str(figure), "--json", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert len(summary["partition"]) == 3
    assert summary["thresholds"] == thresholds(summary["partition"])
    assert {"contrast", "cut_fraction", "normalized_cut", "silhouette"} <= set(summary)
    assert len(summary["boundary_frequency"]) == len(summary["boundaries"])
    assert figure.stat().st_size > 10_000
    assert main(["phases", str(zoo_store), "--eps", "0.2", "--bootstrap", "0", "--quiet"]) == 0
    assert "maxcut (f=0.2)" in capsys.readouterr().out


def test_cli_phases_errors(zoo_store, tmp_path, capsys):
    assert main(["phases", str(tmp_path / "missing.zarr")]) == 2
    assert "no trajectory store" in capsys.readouterr().err
    assert main(["phases", str(zoo_store), "--tokens", "cls+nothing", "--quiet"]) == 2
    assert "unknown token group 'nothing'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["phases", str(zoo_store), "--k", "3", "--eps", "0.1"])
