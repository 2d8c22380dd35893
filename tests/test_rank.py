"""Update-rank collapse: planted ranks, closed-form spectra and numpy references."""

from __future__ import annotations

import numpy as np
import pytest

from analyses import rank
from tests.synthetic import contract_dataset, one_blas_thread  # noqa: F401 (autouse fixture)

KINDS = ["cls", "register", "register"] + ["patch"] * 12


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_spectrum_measures_closed_forms():
    flat = rank.spectrum_measures(np.array([0.0, 2.0, 2.0, 2.0, 0.0]))
    for name in ("stable_rank", "effective_rank", "participation_ratio", "n_directions"):
        assert flat[name] == pytest.approx(3.0)
    spectrum = np.array([4.0, 1.0, 0.5, 0.25])
    measures = rank.spectrum_measures(spectrum[::-1], variance=0.9)
    p = spectrum / spectrum.sum()
    assert measures["stable_rank"] == pytest.approx(5.75 / 4)
    assert measures["effective_rank"] == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    assert measures["participation_ratio"] == pytest.approx(5.75**2 / (spectrum**2).sum())
    assert measures["n_directions"] == 3  # 4/5.75 = 0.70, 5/5.75 = 0.87, 5.5/5.75 = 0.96
    assert np.isnan(rank.spectrum_measures(np.zeros(3))["stable_rank"])


def test_planted_rank_r_updates_give_rank_r():
    rng = np.random.default_rng(0)
    n_images, n_layers, n_features, planted = 40, 4, 16, 3
    start = rng.normal(size=(n_images, 1, len(KINDS), n_features))
    kinds = np.array(KINDS)
    steps = []
    for _ in range(n_layers - 1):
        basis = np.linalg.qr(rng.normal(size=(n_features, planted)))[0]  # a new planted subspace per block
        coefficients = np.zeros((n_images, 1, len(KINDS), planted))
        for kind in ("cls", "register", "patch"):  # centred, whitened coefficients: σ² exactly equal
            rows = rng.normal(size=(n_images * (kinds == kind).sum(), planted))
            whitened = np.linalg.qr(rows - rows.mean(axis=0))[0]
            coefficients[:, 0, kinds == kind] = whitened.reshape(n_images, -1, planted)
        steps.append(coefficients @ basis.T)
    hidden = np.concatenate([start, start + np.cumsum(np.concatenate(steps, axis=1), axis=1)], axis=1)
    result = rank.update_rank(contract_dataset(hidden, KINDS, chunk=8), spaces=("raw",), n_bootstrap=0,
                              progress=False)
    spectrum = result["spectrum"].sel(space="raw").values  # (token_kind, block, component)
    nonzero = (spectrum > 1e-6 * spectrum[..., :1]).sum(axis=-1)
    assert (nonzero == planted).all()
    measures = result["rank"].sel(space="raw")  # (measure, token_kind, block)
    np.testing.assert_allclose(measures.values, planted, rtol=1e-4)


def test_streamed_spectrum_matches_numpy_svd_raw_and_sphere():
    rng = np.random.default_rng(3)
    hidden = rng.normal(size=(10, 3, len(KINDS), 6)) * np.linspace(1, 3, 3)[None, :, None, None]
    result = rank.update_rank(contract_dataset(hidden, KINDS, chunk=3), n_bootstrap=0, progress=False)
    hidden = hidden.astype(np.float32).astype(np.float64)
    kinds = np.array(KINDS)
    for space, states in (("raw", hidden), ("sphere", _unit(hidden))):
        for kind in ("cls", "register", "patch"):
            for block in (1, 2):
                updates = (states[:, block] - states[:, block - 1])[:, kinds == kind].reshape(-1, 6)
                singular = np.linalg.svd(updates - updates.mean(axis=0), compute_uv=False)
                np.testing.assert_allclose(
                    result["spectrum"].sel(token_kind=kind, space=space, block=block).values, singular**2, atol=1e-8
                )
                stable = (singular**2).sum() / singular[0] ** 2
                assert result["rank"].sel(measure="stable_rank", token_kind=kind, space=space, block=block) == pytest.approx(stable)
    assert (result["rows"].sel(token_kind="patch").values == 10 * 12).all()


def test_bootstrap_is_seeded_chunking_free_and_narrows_with_more_images():
    rng = np.random.default_rng(4)

    def width(n_images, chunk, seed=0):
        hidden = rng.normal(size=(n_images, 3, len(KINDS), 5)) * np.array([3.0, 2.0, 1.0, 1.0, 0.5])
        result = rank.update_rank(contract_dataset(hidden, KINDS, chunk=chunk), n_bootstrap=40, seed=seed,
                                  progress=False)
        bounds = rank.intervals(result).sel(measure="stable_rank", token_kind="patch", space="raw")
        point = result["rank"].sel(measure="stable_rank", token_kind="patch", space="raw")
        assert ((bounds.sel(bound="low") <= point + 0.05) & (point - 0.05 <= bounds.sel(bound="high"))).all()
        return float((bounds.sel(bound="high") - bounds.sel(bound="low")).mean()), result

    narrow, _ = width(160, 16)
    wide, _ = width(10, 5)
    assert narrow < wide
    hidden = rng.normal(size=(12, 2, len(KINDS), 4))
    a = rank.update_rank(contract_dataset(hidden, KINDS, chunk=4), n_bootstrap=5, progress=False)
    b = rank.update_rank(contract_dataset(hidden, KINDS, chunk=4), n_bootstrap=5, progress=False)
    np.testing.assert_array_equal(a["rank_bootstrap"].values, b["rank_bootstrap"].values)


def test_bad_arguments_are_clear_errors():
    dataset = contract_dataset(np.random.default_rng(0).normal(size=(4, 3, len(KINDS), 4)), KINDS)
    with pytest.raises(ValueError, match="spaces"):
        rank.update_rank(dataset, spaces=("angular",))
    with pytest.raises(ValueError, match="n_bootstrap"):
        rank.update_rank(dataset, n_bootstrap=-1)
    with pytest.raises(ValueError, match="no bootstrap"):
        rank.intervals(rank.update_rank(dataset, n_bootstrap=0, progress=False))
