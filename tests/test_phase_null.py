"""The smooth-gradient null of phases (analyses.phase_null): planted blocks are detected, a gradient is not."""

import numpy as np
import pytest
import xarray as xr

from analyses.phase_null import conclusion, gradient_null, relative_contrast, toeplitz
from analyses.phases import partition_matrix, phase_analysis, summarize
from tests.synthetic import contract_dataset, one_blas_thread  # noqa: F401

KINDS = ["cls", "patch", "patch", "patch"]


def gradient_store(n_images=30, noise=0.05, seed=0):
    """Every token turns at one constant angle per block in its own random plane: cos(a_i, a_j) = cos(θ|i - j|)."""
    rng = np.random.default_rng(seed)
    angles = 0.13 * np.arange(13)
    hidden = np.empty((n_images, 13, len(KINDS), 16))
    for image in range(n_images):
        for token in range(len(KINDS)):
            u, v = np.linalg.qr(rng.normal(size=(16, 2)))[0].T
            hidden[image, :, token] = np.cos(angles)[:, None] * u + np.sin(angles)[:, None] * v
    return contract_dataset(hidden + noise * rng.normal(size=hidden.shape), KINDS)


def block_store(n_images=30, noise=0.05, seed=0):
    """Four planted phases (blocks 1-3, 4-6, 7-9, 10-12): one direction per phase, small drift within it."""
    rng = np.random.default_rng(seed)
    phase = np.r_[0, np.repeat([0, 1, 2, 3], 3)]
    hidden = np.empty((n_images, 13, len(KINDS), 16))
    for image in range(n_images):
        for token in range(len(KINDS)):
            bases = np.linalg.qr(rng.normal(size=(16, 4)))[0].T
            hidden[image, :, token] = bases[phase] + 0.1 * rng.normal(size=(13, 16))
    return contract_dataset(hidden + noise * rng.normal(size=hidden.shape), KINDS)


def labelled(matrix):
    layers = np.arange(1, matrix.shape[-1] + 1)
    return xr.DataArray(matrix, dims=("layer_i", "layer_j"), coords={"layer_i": layers, "layer_j": layers})


def test_toeplitz_is_the_diagonal_average():
    D = np.arange(16.0).reshape(4, 4)
    T = toeplitz(D)
    assert T[0, 1] == pytest.approx(np.mean([D[0, 1], D[1, 2], D[2, 3]])) and T[3, 0] == D[3, 0]
    assert T[1, 1] == pytest.approx(np.trace(D) / 4)
    np.testing.assert_allclose(toeplitz(T), T)
    np.testing.assert_allclose(toeplitz(np.stack([D, 2 * D])), np.stack([T, 2 * T]))


def test_relative_contrast_is_scale_free():
    D = np.abs(np.subtract.outer(np.arange(6), np.arange(6))).astype(float)
    partition = [[1, 2, 3], [4, 5, 6]]
    score = relative_contrast(labelled(D), partition)
    within, between = np.mean([1, 2, 1] * 2), np.mean([3, 2, 1, 4, 3, 2, 5, 4, 3])
    assert score == pytest.approx((between - within) / D[np.triu_indices(6, 1)].mean())
    assert relative_contrast(labelled(0.01 * D), partition) == pytest.approx(score)


def test_planted_blocks_exceed_the_gradient():
    result = phase_analysis(block_store(), "maxcut", eps=0.1, n_bootstrap=0, null_permutations=39, null_bootstrap=19, progress=False)
    summary = summarize(result)
    assert summary["partition"] == [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]]
    assert summary["gradient_null_exceeds"] is True
    assert summary["gradient_null_p_value"] == pytest.approx(1 / 40)  # no sign-flip draw reaches it
    assert 0 < summary["gradient_null_low"] <= summary["gradient_null_effect"] <= summary["gradient_null_high"]
    assert summary["gradient_null_conclusion"].startswith("the phases exceed a smooth depth gradient")
    # the null's partition is the method re-run on the diagonal average, with the same k
    null = labelled(result["null_dissimilarity"].values)
    np.testing.assert_allclose(null.values, toeplitz(result["dissimilarity"].values))
    assert str(partition_matrix(null, "maxcut", k=4)) == summary["gradient_null_null_partition"]


def test_a_gradient_does_not():
    summary = summarize(phase_analysis(gradient_store(), "maxcut", eps=0.1, n_bootstrap=0, null_permutations=39,
                                       null_bootstrap=19, progress=False))
    assert summary["n_phases"] >= 2  # max-cut still cuts it ...
    assert summary["gradient_null_exceeds"] is False and summary["gradient_null_p_value"] > 0.2  # ... into nothing special
    assert "do not exceed" in summary["gradient_null_conclusion"]


def test_exactly_toeplitz_matrices_give_p_one():
    D = np.abs(np.subtract.outer(np.arange(12), np.arange(12))) / 12.0
    layers = np.arange(1, 13)
    per_image = xr.DataArray(np.stack([D * s for s in np.linspace(0.8, 1.2, 10)]), dims=("image", "layer_i", "layer_j"),
                             coords={"image": np.arange(10), "layer_i": layers, "layer_j": layers})
    result = gradient_null(per_image, lambda m, k: partition_matrix(m, "maxcut", eps=0.1, k=k), n_permutations=19, n_bootstrap=9)
    assert result.attrs["effect"] == pytest.approx(0) and result.attrs["p_value"] == 1.0 and not result.attrs["exceeds"]
    assert "do not exceed" in conclusion(result.attrs)


def test_cka_and_single_phases_say_why_there_is_no_test():
    ds = gradient_store(n_images=8)
    result = phase_analysis(ds, "maxcut", eps=0.1, measure="cka", n_bootstrap=0, progress=False)
    assert "null_dissimilarity" not in result
    assert "no gradient null" in result.attrs["gradient_null_conclusion"]
    one = phase_analysis(ds, "contiguous", k=1, n_bootstrap=0, null_permutations=9, null_bootstrap=0, progress=False)
    assert one.attrs["gradient_null_conclusion"].startswith("one phase")
