"""Concepts through depth: planted concepts recovered with their layer ranges, the boundary test,
the streamed sums against brute force, resume, save/load, and `dynamo concepts` on real stores.

Stores come from tiny random-weight ViTs (mechanics, not findings) recorded on real digits and
photographs; the known answers come from synthetic trajectories with planted concept directions.
"""

from __future__ import annotations

import functools
import itertools
import json
import math

import numpy as np
import pytest
import torch
import xarray as xr
from sklearn.metrics import mutual_info_score

import dynamo
from analyses import concepts
from dynamo.dictionary import ConceptDictionary, SparseAutoencoder, TokenSampler, layer_scales, matched_cosine
from dynamo.metrics import r2_score
from dynamo.partition import Partition
from dynamo.pipeline import profile as profiling
from dynamo.pipeline.cli import main
from dynamo.pipeline.concepts import concepts as concept_stage
from tests.conftest import tiny_model
from tests.synthetic import contract_dataset, one_blas_thread  # noqa: F401  (one BLAS thread for this module)

pytestmark = pytest.mark.usefixtures("one_thread")

# planted concepts: (first layer, last layer) each is present in; phases [1-4][5-8][9-12]
RANGES = [(1, 4), (5, 8), (9, 12), (1, 8), (5, 12), (0, 12), (0, 4), (9, 12)]
PHASES = Partition([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]])
FAST = dict(steps=40, batch_size=128, progress=False)


def planted(n_images=32, n_tokens=16, width=32, n_layers=13, p=0.3, noise=0.02, seed=0):
    """Trajectories made of orthonormal concept directions, each present only in its layer range.

    Each token at each layer carries each present concept with probability ``p``, with an
    amplitude uniform in [0.5, 1.5], plus Gaussian noise; token 0 is ``cls``, the rest patches
    on a 3 x 5 grid.
    """
    rng = np.random.default_rng(seed)
    directions = np.linalg.qr(rng.normal(size=(width, len(RANGES))))[0].T
    present = np.array([[a <= layer <= b for layer in range(n_layers)] for a, b in RANGES])
    fires = rng.random((n_images, n_layers, n_tokens, len(RANGES))) < p
    amplitude = rng.uniform(0.5, 1.5, fires.shape) * fires * present.T[None, :, None, :]
    hidden = amplitude @ directions + noise * rng.normal(size=(n_images, n_layers, n_tokens, width))
    ds = contract_dataset(hidden, ["cls"] + ["patch"] * (n_tokens - 1), labels=np.arange(n_images) % 4, chunk=8)
    grid = np.arange(n_tokens - 1)
    return ds.assign_coords(patch_row=("token", [-1, *grid // 5]), patch_col=("token", [-1, *grid % 5])), directions


@pytest.fixture(scope="module")
def planted_result():
    ds, directions = planted()
    dictionary = ConceptDictionary(concepts=10, k=2, steps=600, batch_size=256, lr=3e-3, progress=False)
    return ds, directions, dictionary, concepts.compute(ds, dictionary, partition=PHASES, progress=False)


def test_planted_concepts_are_recovered_with_their_layer_ranges(planted_result):
    ds, directions, dictionary, result = planted_result
    cosine, match = matched_cosine(directions, dictionary.atoms_)
    assert cosine.min() > 0.9, cosine
    found = [(int(result["birth"][atom]), int(result["death"][atom])) for atom in match]
    assert found == RANGES
    assert float(result["r2"].sel(token_kind="all").min()) > 0.85


def test_the_boundary_test_finds_planted_births_and_deaths_at_the_boundaries(planted_result):
    _, _, _, result = planted_result
    assert result.attrs["boundary_gaps"] == [4, 8]
    both = result.sel(event="both")
    # every eligible birth (layers 5, 9) and death (layers 4, 8) lies at a boundary; of the 55
    # placements of 2 boundaries in the 11 gaps between blocks, only the planted one gives 1
    assert float(both["boundary_fraction"]) == 1.0
    assert int(both["boundary_n_placements"]) == math.comb(11, 2)
    assert float(both["boundary_p_value"]) == pytest.approx(1 / 55)
    numbers = concepts.summarize(result)
    assert numbers["boundary_p_value_both"] == pytest.approx(1 / 55, rel=1e-3)
    assert numbers["concepts_peaking_per_phase"] and sum(numbers["concepts_peaking_per_phase"]) <= 10


def test_streamed_profiles_match_brute_force(planted_result):
    ds, _, dictionary, result = planted_result
    hidden, labels = ds["hidden"].values, ds["label"].values
    kinds = ds["token_kind"].values
    for layer in (0, 6, 12):
        dense = dictionary.transform(hidden[:, layer], layer).reshape(hidden.shape[0], hidden.shape[2], -1)
        _, _, reconstruction, target = dictionary.encode(hidden[:, layer], layer)
        assert float(result["r2"].sel(layer=layer, token_kind="all")) == pytest.approx(r2_score(reconstruction, target), abs=1e-6)
        for kind in ("cls", "patch"):
            values = dense[:, kinds == kind]
            profile = result.sel(layer=layer, token_kind=kind)
            np.testing.assert_allclose(profile["frequency"], (values > 0).mean(axis=(0, 1)), atol=1e-12)
            np.testing.assert_allclose(profile["mean_activation"], values.mean(axis=(0, 1)), rtol=1e-5, atol=1e-7)
            token_labels = np.repeat(labels, values.shape[1])
            for concept in (0, 3):
                active = (values[:, :, concept] > 0).ravel()
                bits = mutual_info_score(active, token_labels) / np.log(2)
                assert float(profile["class_information"].sel(concept=concept)) == pytest.approx(bits, abs=1e-9)


def test_boundary_test_against_enumeration_and_sampling():
    rng = np.random.default_rng(1)
    events = rng.integers(0, 9, 40)
    eligible, boundaries = range(1, 9), [3, 6]
    exact = concepts.boundary_test(events, boundaries, eligible)
    kept = events[np.isin(events, eligible)]
    fractions = [np.isin(kept, pair).mean() for pair in itertools.combinations(eligible, 2)]
    observed = np.isin(kept, boundaries).mean()
    assert exact["exact"] and exact["n_events"] == len(kept) and exact["fraction"] == pytest.approx(observed)
    assert exact["p_value"] == pytest.approx(np.mean(np.array(fractions) >= observed))
    assert exact["null_fraction"] == pytest.approx(np.mean(fractions))
    sampled = concepts.boundary_test(events, boundaries, eligible, n_permutations=20, seed=0)
    assert not sampled["exact"] and sampled["n_placements"] == 20 and 0 < sampled["p_value"] <= 1
    assert math.isnan(concepts.boundary_test([], boundaries, eligible)["p_value"])


def test_lifetimes_follow_the_stated_threshold():
    activation = np.array([[0, 0.2, 1.0, 0.3, 0.1], [0, 0, 0, 0, 0], [0.5, 0.5, 0.5, 0.5, 0.5]])
    birth, peak, death = concepts.lifetimes(activation, np.arange(5), alive_fraction=0.25)
    assert birth.tolist() == [2, -1, 0] and peak.tolist() == [2, -1, 0] and death.tolist() == [3, -1, 4]


def test_matched_cosine_is_the_best_permutation():
    rng = np.random.default_rng(0)
    first, second = rng.normal(size=(5, 6)), rng.normal(size=(5, 6))
    cosine, match = matched_cosine(first, second)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    table = unit(first) @ unit(second).T
    best = max(itertools.permutations(range(5)), key=lambda perm: table[range(5), perm].sum())
    assert list(match) == list(best) and cosine.sum() == pytest.approx(table[range(5), best].sum())


def test_layer_scales_and_the_layer_balanced_sampler():
    ds, _ = planted(n_images=20)
    scale, center = layer_scales(ds, range(13), progress=False)
    hidden = ds["hidden"].values.astype(np.float64)
    brute = 1 / np.sqrt((hidden**2).sum(-1).mean(axis=(0, 2)))
    np.testing.assert_allclose(scale, brute, rtol=1e-6)
    np.testing.assert_allclose(center, (hidden.mean(axis=(0, 2)) * brute[:, None]).mean(0), atol=1e-6)
    sampler = TokenSampler(ds, [0, 5, 12], scale[[0, 5, 12]], center, batch_size=24, seed=3, tokens_per_layer=40)
    assert sampler.per_layer == 40 and sampler.batches_per_round == 5
    first = sampler.round(0)
    # every layer gives the same number of tokens: match each drawn row to its layer
    scaled = {layer: hidden[:, layer].reshape(-1, hidden.shape[-1]) * scale[layer] - center for layer in (0, 5, 12)}
    origin = [next(layer for layer, rows in scaled.items() if np.abs(rows - row).max(axis=1).min() < 1e-5) for row in first]
    assert sorted(np.bincount(origin)[[0, 5, 12]].tolist()) == [40, 40, 40]
    stream = sampler.batches()
    batches = [next(stream) for _ in range(12)]
    resumed = sampler.batches(first_step=7)
    for step in range(7, 12):
        torch.testing.assert_close(next(resumed), batches[step], atol=0, rtol=0)
    # each layer walks every block once per epoch (3 blocks of 8, 8, 4 images)
    orders = [np.random.default_rng([3, 0, layer]).permutation(3) for layer in (0, 5, 12)]
    assert all(sorted(order) == [0, 1, 2] for order in orders)


def test_an_interrupted_fit_resumes_to_the_same_dictionary(tmp_path, monkeypatch):
    ds, _ = planted(n_images=16)
    params = dict(concepts=12, k=2, steps=30, batch_size=64, checkpoint_every=10, progress=False)
    reference = ConceptDictionary(kind="rasae", **params).fit(ds)
    calls = {"n": 0}
    original = SparseAutoencoder.project

    def interrupting(self):
        calls["n"] += 1
        if calls["n"] == 17:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(SparseAutoencoder, "project", interrupting)
    with pytest.raises(KeyboardInterrupt):
        ConceptDictionary(kind="rasae", checkpoint_dir=tmp_path, **params).fit(ds)
    assert json.loads((tmp_path / "checkpoint.json").read_text())["step"] == 10
    monkeypatch.setattr(SparseAutoencoder, "project", original)
    resumed = ConceptDictionary(kind="rasae", checkpoint_dir=tmp_path, **params).fit(ds)
    for name, value in reference.model_.state_dict().items():
        torch.testing.assert_close(resumed.model_.state_dict()[name], value, atol=0, rtol=0)
    assert resumed.history_ == reference.history_
    with pytest.raises(ValueError, match="other parameters"):
        ConceptDictionary(kind="rasae", checkpoint_dir=tmp_path, **{**params, "k": 3}).fit(ds)


def test_save_load_and_the_archetypal_constraints(tmp_path):
    ds, _ = planted(n_images=16)
    fitted = ConceptDictionary(kind="rasae", concepts=12, k=2, delta=0.05, **FAST).fit(ds)
    model = fitted.model_
    mix = model.mix.detach()
    assert (mix >= 0).all() and torch.allclose(mix.sum(1), torch.ones(12))
    assert (model.relax.detach().norm(dim=1) <= 0.05 + 1e-6).all()
    loaded = ConceptDictionary.load(fitted.save(tmp_path / "dictionary"))
    states = ds["hidden"].values[:4, 7]
    np.testing.assert_array_equal(loaded.transform(states, 7), fitted.transform(states, 7))
    np.testing.assert_array_equal(loaded.atoms_, fitted.atoms_)
    with pytest.raises(ValueError, match="not one this dictionary was fitted on"):
        ConceptDictionary(layers=[1, 2], **FAST).fit(ds).transform(states, 7)


def test_per_phase_and_stability_variants(tmp_path):
    ds, _ = planted(n_images=16)
    dictionary = ConceptDictionary(concepts=10, k=2, checkpoint_dir=tmp_path / "checkpoint", **FAST)
    result = concepts.compute(ds, dictionary, partition=PHASES, per_phase=True, stability=True, progress=False)
    assert np.isnan(result["per_phase_r2"].sel(layer=0)).all() and np.isfinite(result["per_phase_r2"].sel(layer=[1, 12])).all()
    assert result["per_phase_match"].sizes["phase_index"] == 3
    assert result["stability_cosine"].shape == (2, 10) and (np.abs(result["stability"]) <= 1).all()
    # every extra fit checkpoints beside the first, so a re-run resumes them all
    assert {p.name for p in (tmp_path / "checkpoint").iterdir()} >= {"phase0", "phase2", "rasae-seed0", "topk-seed1"}
    numbers = concepts.summarize(result)
    assert {"stability_topk", "stability_rasae", "per_phase_match"} <= set(numbers)


# ---- real stores and the command line -------------------------------------------------------------


def _model():
    return tiny_model("cls+4reg", embed_dim=32, num_heads=2, depth=4)


@pytest.fixture(scope="module")
def digits_store(digits_folder, tmp_path_factory):
    path = tmp_path_factory.mktemp("concepts") / "digits.zarr"
    dynamo.record(_model(), dynamo.image_set(digits_folder), path, batch_size=16, progress=False)
    return path


def test_cli_writes_the_result_figures_and_resumes(digits_store, tmp_path, capsys):
    argv = ["concepts", str(digits_store), "--out", str(tmp_path / "out"), "--concepts", "32", "--k", "4", "--steps", "40",
            "--boundaries", "2", "--quiet", "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    out = tmp_path / "out"
    assert {"concept_heatmap.png", "concept_token_kinds.png", "concept_events.png", "concept_quality.png",
            "concept_examples.png", "summary.json"} <= {p.name for p in out.iterdir()}
    assert (out / "dictionary" / "dictionary.safetensors").exists() and (out / "dictionary" / "config.json").exists()
    result = xr.open_zarr(out / "concepts.zarr")
    assert result.attrs["analysis"] == "concepts" and "class_information" in result
    assert result["phase"].values.tolist() == [-1, 0, 0, 1, 1]
    assert len(summary["r2_per_layer"]) == 5 and summary["notes"] == []
    # examples are the model's view of real files, ranked by activation
    top = result["top_activation"].values
    assert (np.diff(top, axis=1) <= 0).all() and all(str(i).endswith(".png") for i in result["top_image_id"].values.ravel())
    assert main(argv) == 0  # the finished fit is resumed from its checkpoint: the same numbers
    again = json.loads(capsys.readouterr().out)
    assert again["r2_per_layer"] == summary["r2_per_layer"] and again["births_per_layer"] == summary["births_per_layer"]


def test_a_store_without_labels_skips_the_class_analyses(photo_folder, tmp_path):
    store = tmp_path / "photos.zarr"
    dynamo.record(_model(), dynamo.image_set(photo_folder), store, batch_size=4, progress=False)
    summary = concept_stage(store, tmp_path / "out", n_concepts=16, k=2, steps=20, boundaries=[2], progress=False)
    assert summary["notes"] == ["class analyses skipped: the store has no labels (record from class sub-folders to get them)"]
    assert "note: class analyses skipped" in summary["text"] and "class_information_max_per_layer" not in summary
    assert "class_information" not in xr.open_zarr(tmp_path / "out" / "concepts.zarr")


def test_a_summaries_only_store_is_refused_in_one_line(digits_folder, tmp_path, capsys):
    store = tmp_path / "views.zarr"
    dynamo.record(_model(), dynamo.image_set(digits_folder), store, batch_size=16, summaries_only=True, progress=False)
    assert main(["concepts", str(store), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "concepts need `hidden`" in error and "--summaries-only" in error
    assert not (tmp_path / "out").exists()


def test_profile_runs_the_concepts_section_when_asked(digits_store, tmp_path, monkeypatch):
    monkeypatch.setattr(profiling, "concept_stage", functools.partial(concept_stage, n_concepts=16, k=2, steps=20))
    summary = profiling.profile_store(digits_store, tmp_path / "profile", only=["tokens"], n_bootstrap=2, concepts=True,
                                      progress=False)
    assert summary["concepts"]["concepts"] == 16 and "concepts (topk, 16)" in summary["text"]
    page = (tmp_path / "profile" / "report.html").read_text()
    assert "Concepts through depth" in page
    assert profiling.profile_store(digits_store, tmp_path / "profile", only=["tokens"], n_bootstrap=2,
                                   progress=False)["concepts"] is None


def test_the_defaults_at_the_real_shape():
    """ViT-B/14 reg4 at 224 px: 261 tokens x 768; default 8 x 768 concepts; encoding in bounded row slices."""
    rng = np.random.default_rng(0)
    kinds = ["cls"] + ["register"] * 4 + ["patch"] * 256
    ds = contract_dataset(rng.normal(size=(4, 2, 261, 768)).astype(np.float32), kinds, chunk=4)
    fitted = ConceptDictionary(steps=2, progress=False).fit(ds)
    assert fitted.atoms_.shape == (6144, 768)
    values, indices, reconstruction, target = fitted.encode(ds["hidden"].values[:, 1], 1)
    assert values.shape == indices.shape == (4 * 261, 8) and reconstruction.shape == target.shape == (4 * 261, 768)
    dense = fitted.transform(ds["hidden"].values[:2, 1], 1)
    np.testing.assert_allclose(dense[np.arange(522)[:, None], indices[:522].numpy()], values[:522].numpy())
