"""Phases under several lenses: the Jacobian lens's closed form on a tied-block ViT, the agreement
metrics against hand-computed values, the knee segmentation on exact corners, and `dynamo phases --lens`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import xarray as xr
from scipy.linalg import subspace_angles
from torch import nn

import dynamo
from analyses import lenses as lensing
from analyses.lenses import (
    adjusted_rand,
    agreement,
    boundary_f1,
    jacobian_similarity,
    knee_partition,
    subspace_overlap,
    summarize,
)
from analyses.phases import partition_matrix
from dynamo import zoo
from dynamo.pipeline.cli import main
from tests.conftest import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
RANK = 3
N_ITER = 12  # 13 Krylov blocks of 9 probes nearly span the 120-dim state: exact to rounding (the default 6
# leaves errors of about 1e-2 at the random state B below)


def test_subspace_overlap_is_the_mean_squared_cosine_of_the_principal_angles():
    rng = np.random.default_rng(0)
    a, b = (np.linalg.qr(rng.standard_normal((2, 40, 5)))[0][i] for i in range(2))
    expected = np.mean(np.cos(subspace_angles(a, b)) ** 2)
    assert subspace_overlap(torch.tensor(a), torch.tensor(b)).item() == pytest.approx(expected, rel=1e-12)
    rotation = np.linalg.qr(rng.standard_normal((5, 5)))[0]  # another basis of the same subspace
    assert subspace_overlap(torch.tensor(a), torch.tensor(a @ rotation)).item() == pytest.approx(1.0, rel=1e-12)


def _exact_subspaces(block, state: torch.Tensor, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-rank left and right singular vectors of the full Jacobian of ``block`` at one state."""
    jacobian = torch.autograd.functional.jacobian(lambda z: block(z[None])[0], state.double())
    u, _, vt = np.linalg.svd(jacobian.reshape(state.numel(), state.numel()).numpy())
    return u[:, :rank], vt[:rank].T


def test_tied_blocks_on_two_states_give_a_constant_off_diagonal_block(digits_folder, tmp_path):
    """All blocks one module f (tied): block l's Jacobian is Df(X_(l-1)), so blocks whose input
    states coincide share it. With state A at layers 0-1 and B at layers 2-4, the matrix is 1 on
    blocks {1, 2} and {3, 4} and one constant c between them, c the subspace overlap of Df(A)
    and Df(B) from their full Jacobians; both segmentations split exactly there."""
    loaded = tiny_model("cls", img_size=32, embed_dim=24, num_heads=2, depth=4)
    store = dynamo.record(loaded, dynamo.image_set(digits_folder), tmp_path / "t.zarr", limit=3, progress=False)
    module = loaded.module.double()
    module.blocks = nn.Sequential(*[module.blocks[0]] * 4)  # tied: one module four times
    hidden = store["hidden"].values.astype(np.float64)
    # A real; B a random state (on this random-weight model real states all give nearly one subspace)
    a, b = hidden[:, 0], np.random.default_rng(0).standard_normal(hidden[:, 0].shape)
    hidden = np.stack([a, a, b, b, b], axis=1)  # layers 0..4: blocks 1, 2 see A; blocks 3, 4 see B
    ds = store.assign(hidden=(store["hidden"].dims, hidden))
    result = jacobian_similarity(ds, module, rank=RANK, images=None, n_iter=N_ITER, progress=False)
    similarity = 1.0 - result.values

    block = module.blocks[0]
    overlaps = []
    for image in range(3):
        (ua, va), (ub, vb) = (_exact_subspaces(block, torch.tensor(s[image]), RANK) for s in (a, b))
        overlaps.append((np.mean(np.cos(subspace_angles(va, vb)) ** 2) + np.mean(np.cos(subspace_angles(ua, ub)) ** 2)) / 2)
    c = float(np.mean(overlaps))
    expected = np.array([[1, 1, c, c], [1, 1, c, c], [c, c, 1, 1], [c, c, 1, 1]])
    np.testing.assert_allclose(similarity, expected, atol=1e-6)
    assert c < 0.9  # a real contrast between the two states, not a uniform matrix
    for method in ("maxcut", "contiguous"):
        assert partition_matrix(result, method, k=2) == [[1, 2], [3, 4]]


@pytest.mark.parametrize(
    ("a", "b", "tolerance", "f1"),
    [
        ([[1, 2, 3], [4, 5, 6]], [[1, 2], [3, 4, 5, 6]], 1, 1.0),  # boundaries 3 and 2: within 1
        ([[1, 2, 3], [4, 5, 6]], [[1, 2], [3, 4, 5, 6]], 0, 0.0),
        ([[1, 2], [3, 4, 5], [6]], [[1, 2, 3], [4, 5, 6]], 1, 2 / 3),  # {2, 5} vs {3}: one match, 2*1/(2+1)
        ([[1, 2, 3], [4, 5, 6]], [[1, 2], [3], [4, 5, 6]], 1, 2 / 3),  # {3} vs {2, 3}: one to one, 2*1/(1+2)
        ([[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 5, 6]], 0, 1.0),
        ([[1, 2, 3, 4]], [[1, 2, 3, 4]], 1, 1.0),  # no boundary on either side: agree
        ([[1, 2, 3, 4]], [[1, 2], [3, 4]], 1, 0.0),
        ([[1, 2, 5, 6], [3, 4]], [[1, 2], [3, 4], [5, 6]], 0, 1.0),  # non-contiguous: boundaries 2, 4 both
    ],
)
def test_boundary_f1_by_hand(a, b, tolerance, f1):
    assert boundary_f1(a, b, tolerance) == pytest.approx(f1)
    assert boundary_f1(b, a, tolerance) == pytest.approx(f1)


def test_adjusted_rand_by_hand():
    # labels [0,0,1,1] vs [0,0,0,1]: sum C(n_ij,2) = 1, rows 2, columns 3, C(4,2) = 6: expected
    # 2*3/6 = 1, max (2+3)/2 = 2.5, ARI = (1 - 1)/(2.5 - 1) = 0
    assert adjusted_rand([[1, 2], [3, 4]], [[1, 2, 3], [4]]) == pytest.approx(0.0, abs=1e-12)
    # [0,0,0,1,1,1] vs [0,0,1,1,2,2]: index 2, rows 6, columns 3, C(6,2) = 15: expected 1.2,
    # max 4.5, ARI = 0.8 / 3.3 = 8/33
    assert adjusted_rand([[1, 2, 3], [4, 5, 6]], [[1, 2], [3, 4], [5, 6]]) == pytest.approx(8 / 33)
    assert adjusted_rand([[1, 2], [3, 4]], [[3, 4], [1, 2]]) == 1.0  # phase order does not matter
    with pytest.raises(ValueError, match="different layers"):
        adjusted_rand([[1, 2]], [[1, 2, 3]])
    table = agreement({"p": [[1, 2, 3], [4, 5, 6]], "q": [[1, 2], [3, 4], [5, 6]]})
    assert table["adjusted_rand"].sel(segmentation="p", versus="q") == pytest.approx(8 / 33)
    np.testing.assert_allclose(np.diag(table["boundary_f1"].values), 1.0)


def test_knee_partition_splits_a_piecewise_linear_path_at_its_corners():
    change = [0.3, 0.3, 0.3, 0.05, 0.05, 0.05, 0.05, 0.2, 0.2]  # speeds change after layers 3 and 7
    assert knee_partition(change, 3) == [[1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert knee_partition(change, 1) == [list(range(1, 10))]
    assert len(knee_partition(change, 9)) == 9
    with pytest.raises(ValueError, match="k must be"):
        knee_partition(change, 10)


@pytest.fixture(scope="module")
def zoo_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("lenses") / "zoo.zarr"
    assert main(["record", zoo.DEFAULT_MODEL, "--out", str(path), "--quiet", "--limit", "16"]) == 0
    return path


def test_phases_lens_command(zoo_store, tmp_path, capsys):
    """`dynamo phases --lens`: four lenses, seven segmentations, the table, the result and the figure."""
    figure, out = tmp_path / "lenses.png", tmp_path / "lenses.zarr"
    assert main(["phases", str(zoo_store), "--lens", "cosine,cka,jacobian,knee", "--k", "2", "--layers", "1,2,3,4,5,6",
                 "--jacobian-images", "2", "--rank", "2", "--quiet", "--json", "--figure", str(figure), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["segmentations"] == [
        "cosine/maxcut", "cosine/contiguous", "cka/maxcut", "cka/contiguous", "jacobian/maxcut", "jacobian/contiguous", "knee",
    ]
    assert all(len(partition) == 2 for partition in summary["partitions"]) and summary["jacobian_images"] == 2
    assert sorted(block for phase in summary["partitions"][4] for block in phase) == [1, 2, 3, 4, 5, 6]
    f1, ari = np.array(summary["boundary_f1"]), np.array(summary["adjusted_rand"])
    np.testing.assert_allclose(np.diag(f1), 1.0)
    np.testing.assert_allclose(f1, f1.T)
    np.testing.assert_allclose(ari, ari.T)
    assert figure.stat().st_size > 0
    assert summarize(xr.open_zarr(out))["segmentations"] == summary["segmentations"]
    assert main(["phases", str(zoo_store), "--lens", "cosine,knee", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "boundary F1" in text and "adjusted Rand index" in text and "knee" in text


def test_bad_lens_input(zoo_store, capsys):
    assert main(["phases", str(zoo_store), "--lens", "cosine,tarot", "--quiet"]) == 2
    assert "unknown lens tarot" in capsys.readouterr().err
    ds = dynamo.open_trajectories(zoo_store)
    with pytest.raises(ValueError, match="needs the live model"):
        lensing.compute(ds, None, ["cosine", "jacobian"], progress=False)
    with pytest.raises(ValueError, match="needs every token"):
        jacobian_similarity(ds.drop_vars("hidden"), None, progress=False)
    with pytest.raises(ValueError, match="alone has no max-cut"):
        lensing.compute(ds, lenses=["knee"], progress=False)
