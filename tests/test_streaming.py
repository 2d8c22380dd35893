"""The one pass over `hidden` (`analyses.streaming.stream`): each chunk read once, the same numbers
as each analysis alone, and a damaged chunk named."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr

from analyses import basins, export, rank, streaming, tokens
from tests.synthetic import contract_dataset, one_blas_thread  # noqa: F401 (autouse fixture)

KINDS = ["cls", "register", "register"] + ["patch"] * 9


@pytest.fixture
def dataset():
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(14, 5, len(KINDS), 6)) + rng.normal(size=(1, 5, 1, 6))
    return contract_dataset(hidden, KINDS, labels=np.arange(14) % 3, chunk=4)


def accumulators(dataset):
    return {"basins": basins.Convergence(dataset, progress=False), "tokens": tokens.TokenDynamics(dataset),
            "rank": rank.UpdateRank(dataset, n_bootstrap=6, tokens_per_image=5)}


def test_one_pass_reads_each_chunk_once_and_equals_each_analysis_alone(dataset, monkeypatch, tmp_path):
    reads = []
    read_values = streaming._read_values

    def counted(block, index):
        reads.append((int(block["image"][0]), index))
        return read_values(block, index)

    monkeypatch.setattr(streaming, "_read_values", counted)
    together = streaming.stream(dataset, {**accumulators(dataset), "export": export.Export(dataset, tmp_path, "patch")},
                                progress=False)
    chunks = [(start, layer) for start in (0, 4, 8, 12) for layer in range(5)]
    assert sorted(reads) == chunks  # 4 blocks x 5 layers, each once (the last layer first, for basins)
    alone = {
        "basins": basins.compute(dataset, progress=False),
        "tokens": tokens.compute(dataset, progress=False),
        "rank": rank.compute(dataset, n_bootstrap=6, tokens_per_image=5, progress=False),
    }
    for name, result in alone.items():
        xr.testing.assert_identical(together[name], result)
    np.testing.assert_array_equal(np.load(together["export"][0]), export.trajectories(dataset, "patch").values)


def test_the_one_pass_export_is_the_dask_export(dataset, tmp_path):
    written = export.export_trajectories(dataset, tmp_path, "patch", sphere=True, progress=False)
    assert export.in_one_pass("patch") and not export.in_one_pass("patch", n_components=3)
    assert not export.in_one_pass("cls")  # a reduced view: no `hidden` to read
    reference = export.trajectories(dataset, "patch", sphere=True)
    np.testing.assert_allclose(np.load(written[0]), reference.values, rtol=1e-6, atol=1e-7)
    description = json.loads(written[1].read_text())
    assert description["shape"] == list(reference.shape) and description["token"] == reference["token"].values.tolist()


def test_a_non_finite_chunk_is_named_not_computed(dataset):
    hidden = dataset["hidden"].values.copy()
    hidden[5, 3, 2, 1] = np.nan
    damaged = dataset.assign(hidden=(dataset["hidden"].dims, hidden)).chunk({"image": 4})
    with pytest.raises(ValueError, match=r"`hidden` at layer\(s\) 3, images 5-5 \(1 images\)"):
        streaming.stream(damaged, accumulators(damaged), progress=False)


def test_token_sample_is_seeded_by_image_not_by_block():
    a = streaming.token_sample(10, 3, np.array([4, 5, 6]), (0, 2))
    b = streaming.token_sample(10, 3, np.array([5]), (0, 2))
    np.testing.assert_array_equal(a[1], b[0])
    assert a.shape == (3, 3) and (np.diff(a, axis=1) > 0).all()
    assert streaming.token_sample(10, 10, np.array([1]), 0) is None
