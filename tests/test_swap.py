"""The layer-swap test: exact within tied phases, measurable across them, and clean on the diagonal."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

import dynamo
from analyses import swap
from analyses.swap import phase_relation, summarize
from dynamo.models import weights_sha256
from dynamo.partition import from_result
from tests.conftest import tiny_model
from tests.test_perturbation import exact_raptor, tied_vit

PHASES = [[1, 2], [3, 4, 5]]

pytestmark = pytest.mark.usefixtures("one_thread")


def phase_tied_vit() -> dynamo.LoadedModel:
    """5 blocks in two phases, each phase one block repeated: blocks (A, A, B, B, B), large updates."""
    loaded = tiny_model("cls", img_size=32, embed_dim=32, num_heads=2, depth=2)
    with torch.no_grad():
        for block in loaded.module.blocks:
            block.attn.proj.weight.mul_(20)
            block.mlp.fc2.weight.mul_(20)
    # copies, not one module twice: the recorder hooks each block of the list
    first, second = loaded.module.blocks
    loaded.module.blocks = nn.Sequential(*[copy.deepcopy(b) for b in (first, first, second, second, second)])
    return dataclasses.replace(loaded, weights_sha256=weights_sha256(loaded.module))


@pytest.fixture(scope="module")
def phase_store(digits_folder, tmp_path_factory):
    model = phase_tied_vit()
    path = tmp_path_factory.mktemp("swap") / "phases.zarr"
    return model, dynamo.record(model, dynamo.image_set(digits_folder), path, batch_size=16, progress=False)


@pytest.mark.parametrize("width", [1, 2])
def test_swaps_within_a_tied_phase_change_nothing_and_across_do(phase_store, width):
    model, ds = phase_store
    result = swap.compute(ds, model, width=width, partition=PHASES, progress=False)
    assert result.sizes == {"target": 5 - width + 1, "block": 5, "token_kind": 3}  # all, cls, patch
    assert from_result(result) == PHASES
    relation = result["relation"]
    within, across, clean = (relation == "within"), (relation == "across"), (relation == "clean")
    assert int(clean.sum()) == (5 if width == 1 else 0) and int(within.sum()) > 0 and int(across.sum()) > 0
    # a block swapped for an identical one: the very same run
    np.testing.assert_allclose(result["r2"].where(within | clean).fillna(1).values, 1.0, atol=1e-6)
    assert float(result["agreement"].where(within | clean).min()) == 1.0
    # a block from the other phase: a different map, so the last layer moves
    assert float(result["r2"].sel(token_kind="all").where(across).max()) < 0.999
    summary = summarize(result)
    assert summary["within_r2"] == pytest.approx(1.0, abs=1e-6) and summary["across_r2"] < summary["within_r2"]
    assert summary["within_n_swaps"] + summary["across_n_swaps"] == int((within | across).sum())
    assert summary["partition"] == "[1-2][3-5]" and 0 <= summary["clean_accuracy"] <= 1


def test_phase_relation():
    assert phase_relation(PHASES, [2], 2) == "clean"
    assert phase_relation(PHASES, [1], 2) == "within"
    assert phase_relation(PHASES, [2, 3], 3) == "across"
    assert phase_relation(PHASES, [3, 4], 5) == "within"


def test_phases_default_to_the_stores_own(phase_store):
    """Without a partition, swap uses the phases found in the store: here the model's planted ones."""
    model, ds = phase_store
    assert from_result(swap.compute(ds, model, images=8, progress=False)) == PHASES
    other = [[1], [2, 3, 4, 5]]
    assert from_result(swap.compute(ds, model, partition=other, images=8, progress=False)) == other


def test_clear_errors(phase_store):
    model, ds = phase_store
    with pytest.raises(ValueError, match="cover blocks"):
        swap.compute(ds, model, partition=[[1, 2], [3, 4]], progress=False)
    with pytest.raises(ValueError, match="width"):
        swap.compute(ds, model, width=6, partition=PHASES, progress=False)
    with pytest.raises(ValueError, match="reordered"):
        swap.compute(ds, exact_raptor(tied_vit()), partition=PHASES, progress=False)


def test_near_swaps_only_and_the_matched_drop(phase_store):
    from analyses.swap import matched_drop

    model, ds = phase_store
    full = swap.compute(ds, model, partition=PHASES, progress=False)
    near = swap.compute(ds, model, partition=PHASES, max_distance=1, progress=False)
    distance = abs(near["target"] - near["block"])
    assert (near["relation"].where(distance > 1) == "skipped").sum() == int((distance > 1).sum())
    assert near["agreement"].where(distance > 1).isnull().all()
    np.testing.assert_allclose(near["agreement"].where(distance <= 1), full["agreement"].where(distance <= 1))
    # tied phases: a within-phase swap is the same run (agreement 1), so the matched drop is 1 - mean across agreement
    at = (distance == 1) & (full["relation"] == "across")
    assert matched_drop(near, score="agreement") == pytest.approx(1 - float(full["agreement"].where(at).mean()))
    assert np.isnan(matched_drop(near, [[1, 2, 3, 4, 5]], score="agreement"))  # one phase: nothing across
