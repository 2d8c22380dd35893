"""Update-rank collapse: planted ranks, closed-form spectra, numpy references, and the grouped bootstrap
against the Poisson bootstrap it replaced."""

from __future__ import annotations

import numpy as np
import pytest

import dynamo
from analyses import rank
from analyses.streaming import token_sample
from dynamo import zoo
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
    result = rank.compute(contract_dataset(hidden, KINDS, chunk=8), spaces=("raw",), n_bootstrap=0,
                              progress=False)
    spectrum = result["spectrum"].sel(space="raw").values  # (token_kind, block, component)
    nonzero = (spectrum > 1e-6 * spectrum[..., :1]).sum(axis=-1)
    assert (nonzero == planted).all()
    measures = result["rank"].sel(space="raw")  # (measure, token_kind, block)
    np.testing.assert_allclose(measures.values, planted, rtol=1e-4)


def test_streamed_spectrum_matches_numpy_svd_raw_and_sphere():
    rng = np.random.default_rng(3)
    hidden = rng.normal(size=(10, 3, len(KINDS), 6)) * np.linspace(1, 3, 3)[None, :, None, None]
    result = rank.compute(contract_dataset(hidden, KINDS, chunk=3), n_bootstrap=0, progress=False)
    hidden = hidden.astype(np.float32).astype(np.float64)
    kinds = np.array(KINDS)
    for space, states in (("raw", hidden), ("sphere", _unit(hidden))):
        for kind in ("cls", "register", "patch"):
            for block in (1, 2):
                updates = (states[:, block] - states[:, block - 1])[:, kinds == kind].reshape(-1, 6)
                singular = np.linalg.svd(updates - updates.mean(axis=0), compute_uv=False)
                # each chunk's Gram matrix is formed in float32
                np.testing.assert_allclose(result["spectrum"].sel(token_kind=kind, space=space, block=block).values,
                                           singular**2, rtol=1e-5, atol=1e-6 * singular[0] ** 2)
                stable = (singular**2).sum() / singular[0] ** 2
                assert result["rank"].sel(measure="stable_rank", token_kind=kind, space=space, block=block) == pytest.approx(stable)
    assert (result["rows"].sel(token_kind="patch").values == 10 * 12).all()


def test_bootstrap_is_seeded_chunking_free_and_narrows_with_more_images():
    rng = np.random.default_rng(4)

    def width(n_images, chunk, seed=0):
        hidden = rng.normal(size=(n_images, 3, len(KINDS), 5)) * np.array([3.0, 2.0, 1.0, 1.0, 0.5])
        result = rank.compute(contract_dataset(hidden, KINDS, chunk=chunk), n_bootstrap=40, seed=seed,
                                  progress=False)
        bounds = rank.intervals(result).sel(measure="stable_rank", token_kind="patch", space="raw")
        point = result["rank"].sel(measure="stable_rank", token_kind="patch", space="raw")
        assert ((bounds.sel(bound="low") <= point + 0.05) & (point - 0.05 <= bounds.sel(bound="high"))).all()
        return float((bounds.sel(bound="high") - bounds.sel(bound="low")).mean()), result

    narrow, _ = width(160, 16)
    wide, _ = width(10, 5)
    assert narrow < wide
    hidden = rng.normal(size=(12, 2, len(KINDS), 4))
    a = rank.compute(contract_dataset(hidden, KINDS, chunk=4), n_bootstrap=5, progress=False)
    b = rank.compute(contract_dataset(hidden, KINDS, chunk=4), n_bootstrap=5, progress=False)
    np.testing.assert_array_equal(a["rank_bootstrap"].values, b["rank_bootstrap"].values)


def test_bad_arguments_are_clear_errors():
    dataset = contract_dataset(np.random.default_rng(0).normal(size=(4, 3, len(KINDS), 4)), KINDS)
    with pytest.raises(ValueError, match="spaces"):
        rank.compute(dataset, spaces=("angular",))
    with pytest.raises(ValueError, match="n_bootstrap"):
        rank.compute(dataset, n_bootstrap=-1)
    with pytest.raises(ValueError, match="no bootstrap"):
        rank.intervals(rank.compute(dataset, n_bootstrap=0, progress=False))


def test_a_large_common_drift_costs_no_precision():
    """Updates = a shared drift 1000x their spread: the float32 Grams are of centred rows (uncentred,
    their rounding would be 1e6 times the spread's: about 6% of the spectrum). The reference takes
    the same float32 differences of the states, whose rounding is the store's own."""
    rng = np.random.default_rng(5)
    drift = 1000.0 * rng.normal(size=8)
    steps = drift + rng.normal(size=(20, 1, len(KINDS), 8)) * np.linspace(0.2, 2.0, 8)
    start = rng.normal(size=(20, 1, len(KINDS), 8))
    hidden = np.concatenate([start, start + steps], axis=1)
    result = rank.compute(contract_dataset(hidden, KINDS, chunk=6), spaces=("raw",), n_bootstrap=0, progress=False)
    hidden = hidden.astype(np.float32)
    updates = (hidden[:, 1] - hidden[:, 0])[:, np.array(KINDS) == "patch"].reshape(-1, 8).astype(np.float64)
    singular = np.linalg.svd(updates - updates.mean(axis=0), compute_uv=False)
    np.testing.assert_allclose(result["spectrum"].sel(token_kind="patch", space="raw", block=1).values, singular**2,
                               rtol=1e-5)


def test_token_subsets_are_seeded_per_image_and_match_a_brute_force_reference():
    rng = np.random.default_rng(6)
    hidden = rng.normal(size=(9, 3, len(KINDS), 5)) * np.array([3.0, 2.0, 1.0, 1.0, 0.5])
    result = rank.compute(contract_dataset(hidden, KINDS, chunk=4), spaces=("raw",), n_bootstrap=0,
                              tokens_per_image=4, progress=False)
    assert result.attrs["subsampled_kinds"] == ["patch"] and result.attrs["tokens_per_image"] == 4
    patches = np.flatnonzero(np.array(KINDS) == "patch")
    kind_index = list(result["token_kind"].values).index("patch")
    chosen = patches[token_sample(len(patches), 4, np.arange(9), (0, kind_index))]  # (image, 4), as the analysis draws
    assert len({tuple(row) for row in chosen}) > 1  # each image its own subset
    hidden = hidden.astype(np.float32).astype(np.float64)
    for block in (1, 2):
        updates = np.take_along_axis(hidden[:, block] - hidden[:, block - 1], chosen[..., None], axis=1).reshape(-1, 5)
        singular = np.linalg.svd(updates - updates.mean(axis=0), compute_uv=False)
        np.testing.assert_allclose(result["spectrum"].sel(token_kind="patch", space="raw", block=block).values,
                                   singular**2, rtol=1e-5, atol=1e-6 * singular[0] ** 2)
    assert (result["rows"].sel(token_kind="patch").values == 9 * 4).all()
    assert (result["rows"].sel(token_kind="register").values == 9 * 2).all()  # 2 registers: all of them


def test_sketched_intervals_match_the_exact_grouped_bootstrap_when_the_spectrum_decays():
    rng = np.random.default_rng(7)
    n_features = 48
    scales = 0.7 ** np.arange(n_features)  # a decaying update spectrum: the rank collapse measured here
    start = rng.normal(size=(96, 1, len(KINDS), n_features))
    hidden = np.concatenate([start, start + rng.normal(size=start.shape) * scales], axis=1)
    dataset = contract_dataset(hidden, KINDS, chunk=32)
    exact = rank.compute(dataset, spaces=("raw",), n_bootstrap=60, sketch_size=n_features, progress=False)
    sketched = rank.compute(dataset, spaces=("raw",), n_bootstrap=60, sketch_size=16, progress=False)
    assert exact.attrs["sketch_size"] == 0 and sketched.attrs["sketch_size"] == 16
    xr_exact, xr_sketched = (r["rank_bootstrap"].sel(token_kind="patch", space="raw") for r in (exact, sketched))
    np.testing.assert_allclose(sketched["rank"].values, exact["rank"].values)  # the estimates are exact either way
    for measure in ("stable_rank", "participation_ratio", "effective_rank"):
        a, b = (x.sel(measure=measure).values for x in (xr_exact, xr_sketched))  # the same draws of groups
        np.testing.assert_allclose(b.std(axis=0), a.std(axis=0), rtol=0.15)
        np.testing.assert_allclose(b.mean(axis=0), a.mean(axis=0), atol=0.2 * a.std(axis=0).max())


@pytest.fixture(scope="module")
def zoo_store(tmp_path_factory):
    """The zoo's trained reg4 ViT on 120 of its bundled digits (4 chunks of images)."""
    path = tmp_path_factory.mktemp("rank") / "reg4.zarr"
    dynamo.record("dynamo-zoo/vit-digits-reg4", zoo.default_images(), path, limit=120, progress=False)
    return dynamo.open_trajectories(path)


BLOCKS = [1, 4, 8, 12]


def poisson_bootstrap(dataset, n_bootstrap: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The Poisson bootstrap rank.py used before the grouped one, written plainly (float64).

    Every image gets weight ~ Poisson(1) in each replicate; a replicate's scatter, sums and counts
    are the weighted sums of every image's. Returns the stable rank (token_kind, space, block) on
    all images, for `BLOCKS`, and its replicates (replicate, token_kind, space, block).
    """
    hidden = dataset["hidden"].values.astype(np.float64)
    kinds = np.array([str(k) for k in dataset["token_kind"].values])
    weights = np.concatenate([np.ones((1, len(hidden))),
                              np.random.default_rng(seed).poisson(1.0, size=(n_bootstrap, len(hidden)))])
    stable = np.zeros((n_bootstrap + 1, 3, 2, len(BLOCKS)))
    for k, kind in enumerate(("cls", "register", "patch")):
        states = hidden[:, :, kinds == kind]
        for s, space in enumerate((states, _unit(states))):
            for b, block in enumerate(BLOCKS):
                update = space[:, block] - space[:, block - 1]  # (image, token, feature)
                grams = np.einsum("itf,itg->ifg", update, update)
                scatter = np.einsum("ri,ifg->rfg", weights, grams)
                sums = weights @ update.sum(axis=1)
                counts = weights.sum(axis=1) * update.shape[1]
                centred = scatter - np.einsum("rf,rg->rfg", sums, sums) / counts[:, None, None]
                values = np.clip(np.linalg.eigvalsh(centred), 0, None)
                stable[:, k, s, b] = values.sum(axis=1) / values[:, -1]
    return stable[0], stable[1:]


def test_grouped_bootstrap_agrees_with_the_poisson_bootstrap_on_the_zoo_store(zoo_store):
    result = rank.compute(zoo_store, n_bootstrap=200, progress=False)
    assert result.attrs["n_groups"] == 20 and result.attrs["sketch_size"] == 0  # F = 64: exact replicates
    assert result.attrs["tokens_per_image"] == "all"  # 64 patches: none subsampled by default
    point, poisson = poisson_bootstrap(zoo_store, n_bootstrap=200)
    stable = result.sel(measure="stable_rank", token_kind=["cls", "register", "patch"], space=["raw", "sphere"],
                        block=BLOCKS)
    np.testing.assert_allclose(stable["rank"].values, point, rtol=1e-5)  # the same exact estimates
    grouped = stable["rank_bootstrap"].values
    ratio = grouped.std(axis=0) / poisson.std(axis=0)  # 24 spreads, each from 20 groups: ~16% sampling error
    assert 0.8 < np.median(ratio) < 1.25 and ratio.min() > 0.5 and ratio.max() < 2.0
    shift = np.abs(grouped.mean(axis=0) - poisson.mean(axis=0)) / poisson.std(axis=0)
    assert np.median(shift) < 0.5
    low, high = np.quantile(grouped, [0.025, 0.975], axis=0)
    assert ((low <= point) & (point <= high)).mean() > 0.9


def test_subsampling_patches_moves_the_estimate_by_less_than_its_interval(zoo_store):
    """Why 64 tokens per image suffice: on a trained model, a quarter of the patches (16 of 64)
    moves the patch stable rank by less than the half-width of its 95% interval."""
    full = rank.compute(zoo_store, n_bootstrap=100, progress=False)
    subset = rank.compute(zoo_store, n_bootstrap=0, tokens_per_image=16, progress=False)
    where = dict(measure="stable_rank", token_kind="patch")
    bounds = rank.intervals(full).sel(where)
    half_width = (bounds.sel(bound="high") - bounds.sel(bound="low")) / 2
    moved = abs(subset["rank"].sel(where) - full["rank"].sel(where))
    assert float((moved / half_width).median()) < 0.5  # measured: 0.12 (raw), 0.18 (sphere)
