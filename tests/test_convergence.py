"""Directional convergence and angular basins, against closed forms and brute force."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.decomposition import PCA

from analyses import basins
from tests.synthetic import contract_dataset, rotation_trajectories

KINDS = ["cls", "register", "register", "patch", "patch", "patch"]


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _random_dataset(chunk=4, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), 5)
    means = rng.normal(size=(3, 1, 1, 8))
    hidden = rng.normal(size=(15, 5, len(KINDS), 8)) + np.linspace(0, 2, 5)[None, :, None, None] * means[labels]
    return contract_dataset(hidden, KINDS, labels, chunk=chunk), hidden.astype(np.float32).astype(np.float64), labels


def test_gamma_of_rotating_tokens_is_cosine_of_remaining_turn():
    angles = np.array([0.3, 0.1, 0.1, 0.05, 0.05, 0.05])
    hidden = rotation_trajectories(6, 7, 10, angles)
    result = basins.compute(contract_dataset(hidden, KINDS), progress=False)
    remaining = (6 - np.arange(7))[None, :] * np.array([0.3, 0.1, 0.05])[:, None]  # (kind, layer)
    np.testing.assert_allclose(result["gamma"].mean("image").values, np.cos(remaining), atol=1e-5)
    np.testing.assert_allclose(result["gamma"].sel(layer=6).values, 1.0, atol=1e-6)


def test_gamma_matches_brute_force_per_token_mean():
    dataset, hidden, _ = _random_dataset()
    result = basins.compute(dataset, progress=False)
    cosine = np.sum(_unit(hidden) * _unit(hidden[:, -1:]), axis=-1)  # (image, layer, token)
    kinds = np.array(KINDS)
    for kind in ("cls", "register", "patch"):
        expected = cosine[:, :, kinds == kind].mean(axis=2)
        np.testing.assert_allclose(result["gamma"].sel(token_kind=kind).values, expected, atol=1e-5)


def test_class_angles_and_centroid_accuracy_match_pairwise_brute_force():
    dataset, hidden, labels = _random_dataset()
    result = basins.compute(dataset, progress=False)
    cls = _unit(hidden[:, :, 0])  # (image, layer, feature)
    same = labels[:, None] == labels[None, :]
    off_diagonal = ~np.eye(len(labels), dtype=bool)
    for layer in range(cls.shape[1]):
        gram = cls[:, layer] @ cls[:, layer].T
        within = gram[same & off_diagonal].mean()
        between = gram[~same].mean()
        assert result["within_class_cosine"].sel(view="cls", layer=layer) == pytest.approx(within, abs=1e-6)
        assert result["between_class_cosine"].sel(view="cls", layer=layer) == pytest.approx(between, abs=1e-6)
        assert result["within_class_angle"].sel(view="cls", layer=layer) == pytest.approx(
            np.degrees(np.arccos(within)), abs=1e-4
        )
        for reference_layer, name in ((-1, "final_centroid_accuracy"), (layer, "layer_centroid_accuracy")):
            correct = 0
            for i in range(len(labels)):
                others = np.arange(len(labels)) != i
                centroids = np.stack([cls[others & (labels == c), reference_layer].mean(axis=0) for c in range(3)])
                correct += np.argmax(_unit(centroids) @ cls[i, layer]) == labels[i]
            assert result[name].sel(view="cls", layer=layer) == pytest.approx(correct / len(labels))


def test_projection_matches_pca_of_all_layers_unit_cls():
    dataset, hidden, _ = _random_dataset()
    result = basins.compute(dataset, progress=False)
    rows = _unit(hidden[:, :, 0]).reshape(-1, 8)
    pca = PCA(n_components=2).fit(rows)
    expected = pca.transform(rows).reshape(15, 5, 2)
    signs = np.sign(np.sum(expected * result["projection"].values, axis=(0, 1)))
    np.testing.assert_allclose(result["projection"].values, expected * signs, atol=1e-5)
    np.testing.assert_allclose(result["explained_variance_ratio"].values, pca.explained_variance_ratio_, atol=1e-6)


def test_result_does_not_depend_on_chunking():
    whole = basins.compute(_random_dataset(chunk=15)[0], progress=False)
    chunked = basins.compute(_random_dataset(chunk=2)[0], progress=False)
    for name in ("gamma", "within_class_cosine", "final_centroid_accuracy", "projection"):
        np.testing.assert_allclose(whole[name].values, chunked[name].values, atol=1e-5)


def test_half_rise_layer_and_unlabelled_store():
    assert basins.half_rise_layer(np.array([0.0, 0.2, 0.6, 1.0]), np.arange(4)) == pytest.approx(1.75)
    dataset, _, _ = _random_dataset()
    result = basins.compute(dataset.drop_vars(["label", "label_name"]), progress=False)
    assert "gamma" in result and "final_centroid_accuracy" not in result
    assert "basin_accuracy" not in basins.summarize(result)
    with pytest.raises(ValueError, match="fit_layers"):
        basins.compute(dataset, fit_layers="middle")


def test_identical_directions_score_chance_accuracy():
    rng = np.random.default_rng(5)
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2])
    hidden = rng.normal(size=(9, 3, 2, 4))
    hidden[:, 0, 0] = rng.normal(size=4)  # layer 0 cls: one vector for every image, like a learned cls token
    result = basins.compute(contract_dataset(hidden, ["cls", "patch"], labels), progress=False)
    for name in ("final_centroid_accuracy", "layer_centroid_accuracy"):
        assert result[name].sel(view="cls", layer=0) == pytest.approx(1 / 3)
