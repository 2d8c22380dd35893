"""Token-specific dynamics: analytic angular speed of rotations, coherence against brute force."""

from __future__ import annotations

import numpy as np
import pytest

from analyses import tokens
from tests.synthetic import contract_dataset, rotation_trajectories

KINDS = ["cls", "register", "register", "patch", "patch", "patch", "patch"]


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_rotation_only_trajectories_give_the_analytic_angular_speed():
    angles = np.radians([20.0, 3.0, 3.0, 8.0, 8.0, 8.0, 8.0])
    hidden = rotation_trajectories(5, 6, 12, angles)
    result = tokens.compute(contract_dataset(hidden, KINDS, chunk=2), progress=False)
    np.testing.assert_allclose(result["speed"].sel(token_kind="cls").values, 20.0, atol=1e-3)
    np.testing.assert_allclose(result["speed"].sel(token_kind="register").values, 3.0, atol=2e-3)
    np.testing.assert_allclose(result["speed"].sel(token_kind="patch").values, 8.0, atol=1e-3)
    # norms grow as 1 + l but speeds are on the sphere
    np.testing.assert_allclose(result["norm"].sel(token_kind="patch").mean("image").values, 1.0 + np.arange(6), rtol=1e-5)
    assert tokens.summarize(result)["speed_deg_cls"] == pytest.approx([20.0] * 5, abs=1e-2)


def test_speed_and_coherence_match_brute_force():
    rng = np.random.default_rng(1)
    hidden = rng.normal(size=(6, 4, len(KINDS), 5)) + rng.normal(size=(1, 4, 1, 5))
    result = tokens.compute(contract_dataset(hidden, KINDS, chunk=4), progress=False)
    hidden = hidden.astype(np.float32).astype(np.float64)
    direction = _unit(hidden)
    step = np.degrees(np.arccos(np.clip(np.sum(direction[:, 1:] * direction[:, :-1], axis=-1), -1, 1)))
    np.testing.assert_allclose(result["speed"].sel(token_kind="patch").values, step[:, :, 3:].mean(axis=2), atol=1e-4)
    patches = hidden[:, :, 3:]
    for image in range(6):
        for layer in range(4):
            mean = patches[image, layer].mean(axis=0)
            expected = np.mean([p @ mean / np.linalg.norm(p) / np.linalg.norm(mean) for p in patches[image, layer]])
            assert result["coherence"].values[image, layer] == pytest.approx(expected, abs=1e-5)
        updates = patches[image, 1:] - patches[image, :-1]
        for block in range(3):
            mean = updates[block].mean(axis=0)
            expected = np.mean([u @ mean / np.linalg.norm(u) / np.linalg.norm(mean) for u in updates[block]])
            assert result["update_coherence"].values[image, block] == pytest.approx(expected, abs=1e-5)


def test_aligned_patches_have_coherence_one():
    rng = np.random.default_rng(2)
    shared = rng.normal(size=(3, 5, 1, 6))
    scales = rng.uniform(0.5, 2.0, size=(3, 5, 4, 1))
    hidden = np.concatenate([rng.normal(size=(3, 5, 1, 6)), shared * scales], axis=2)
    result = tokens.compute(contract_dataset(hidden, ["cls"] + ["patch"] * 4), progress=False)
    np.testing.assert_allclose(result["coherence"].values, 1.0, atol=1e-5)


def test_speed_jump_ratio():
    blocks = np.arange(1, 7)
    speed = np.array([1.0, 1.1, 1.2, 5.0, 5.1, 5.2])  # jump between blocks 3 and 4: boundary after layer 3
    assert tokens.speed_jump_ratio(speed, blocks, [3]) == pytest.approx(3.8 / 0.1, rel=1e-6)
    assert tokens.speed_jump_ratio(speed, blocks, []) is None


def test_too_few_layers_is_a_clear_error():
    hidden = np.random.default_rng(0).normal(size=(2, 1, 3, 4))
    with pytest.raises(ValueError, match="at least two recorded layers"):
        tokens.compute(contract_dataset(hidden, ["cls", "patch", "patch"]), progress=False)
