"""The ladder of surrogates, ε and the loop count, on ViTs whose answer is known in closed form.

Teachers are tiny random-weight timm ViTs (mechanics, not findings) recorded on real digits: one
whose blocks all share one module (the teacher's own block is the exact surrogate), one whose
blocks are identities (LayerScale gammas 0: every rung is exact), and one whose blocks are affine
maps (the linear and DMD rungs recover them).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

import dynamo
from dynamo.models import weights_sha256
from dynamo.partition import Partition
from dynamo.surrogates import (
    DMDFitter,
    IdentityFitter,
    LinearFitter,
    SurrogateFitter,
    TeacherBlockFitter,
    split_images,
    transition_moments,
)
from dynamo.surrogates.measures import epsilon, loop_count, loop_schedule
from dynamo.surrogates.raptor import RaptorFitter
from tests.conftest import tiny_model

DEPTH, WIDTH = 4, 32

pytestmark = pytest.mark.usefixtures("one_thread")


class Affine(nn.Module):
    """A block that maps every token by x <- A x + b."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.map = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.map.weight.copy_(weight)
            self.map.bias.copy_(bias)

    def forward(self, x):
        return self.map(x)


def _with_hash(loaded: dynamo.LoadedModel) -> dynamo.LoadedModel:
    return dataclasses.replace(loaded, weights_sha256=weights_sha256(loaded.module))


def _record(teacher, digits_folder, tmp_path_factory, name: str):
    path = tmp_path_factory.mktemp("ladder") / f"{name}.zarr"
    dynamo.record(teacher, dynamo.image_set(digits_folder), path, batch_size=16, progress=False)
    return teacher, dynamo.open_trajectories(path)


@pytest.fixture(scope="module")
def tied(digits_folder, tmp_path_factory):
    """Every block is block 1 (one module), with large updates."""
    loaded = tiny_model("cls", img_size=32, embed_dim=WIDTH, num_heads=2, depth=DEPTH)
    with torch.no_grad():
        loaded.module.blocks[0].attn.proj.weight.mul_(20)
        loaded.module.blocks[0].mlp.fc2.weight.mul_(20)
    loaded.module.blocks = nn.Sequential(*[loaded.module.blocks[0]] * DEPTH)
    return _record(_with_hash(loaded), digits_folder, tmp_path_factory, "tied")


@pytest.fixture(scope="module")
def still(digits_folder, tmp_path_factory):
    """Identity blocks: LayerScale gammas 0."""
    loaded = tiny_model("cls", img_size=32, embed_dim=WIDTH, num_heads=2, depth=DEPTH, init_values=1e-5)
    with torch.no_grad():
        for block in loaded.module.blocks:
            block.ls1.gamma.zero_()
            block.ls2.gamma.zero_()
    return _record(_with_hash(loaded), digits_folder, tmp_path_factory, "still")


@pytest.fixture(scope="module")
def affine(digits_folder, tmp_path_factory):
    """Blocks 1-2 map x <- A1 x + b1, blocks 3-4 x <- A2 x + b2 (A a scaled rotation plus noise)."""
    generator = torch.Generator().manual_seed(1)
    maps = []
    for _ in range(2):
        rotation = torch.linalg.qr(torch.randn(WIDTH, WIDTH, generator=generator))[0]
        maps.append((0.9 * rotation + 0.05 * torch.randn(WIDTH, WIDTH, generator=generator),
                     0.1 * torch.randn(WIDTH, generator=generator)))
    loaded = tiny_model("cls", img_size=32, embed_dim=WIDTH, num_heads=2, depth=DEPTH)
    first, second = Affine(*maps[0]), Affine(*maps[1])
    loaded.module.blocks = nn.Sequential(first, first, second, second)
    teacher, ds = _record(_with_hash(loaded), digits_folder, tmp_path_factory, "affine")
    return teacher, ds, [(w.double().numpy(), b.double().numpy()) for w, b in maps]


def test_teacher_block_reproduces_a_tied_vit_and_identity_does_not(tied):
    teacher, ds = tied
    fitter = TeacherBlockFitter(k=1, progress=False).fit(ds, teacher=teacher)
    report = fitter.evaluate(ds)
    assert report.attrs["images"] == "held-out images of the fit store"
    np.testing.assert_allclose(report["r2"].values, 1.0, atol=1e-6)  # every layer, every token kind
    assert report.attrs["agreement"] == 1.0 and report.attrs["accuracy_ratio"] == 1.0
    # every candidate is the same module: all score alike, and the first is kept
    np.testing.assert_allclose(fitter.scores_.values, fitter.scores_.values[0, 0], atol=1e-9)
    assert fitter.blocks_ == [1]
    errors = epsilon(fitter.model_, ds, n_bootstrap=50)
    assert float(errors["epsilon_strict"].max()) < 1e-5 and float(errors["skill"].min()) > 1 - 1e-5
    identity = IdentityFitter(k=1).fit(ds, teacher=teacher).evaluate(ds)
    assert identity.attrs["r2_final"] < 0.9 and (identity["r2"].sel(token_kind="all")[1:] < 1 - 1e-3).all()
    # the loop count at scale 1 is the ordinary rollout
    held_out = np.flatnonzero(np.isin(ds["image"].values, fitter.validation_images_))
    loops = loop_count(fitter.model_, ds, scales=(0.5, 1.0, 2.0), images=held_out)
    assert loops["r2_final"].sel(scale=1.0) == pytest.approx(report.attrs["r2_final"], abs=1e-9)
    assert loops["steps"].values.tolist() == [2, 4, 8]


def test_every_rung_is_exact_when_the_blocks_are_identities(still):
    teacher, ds = still
    fitters = [IdentityFitter(k=2), LinearFitter(k=2, progress=False), DMDFitter(k=2, progress=False),
               TeacherBlockFitter(k=2, progress=False)]
    for fitter in fitters:
        fitter.fit(ds, teacher=teacher)
        report = fitter.evaluate(ds, probe=False)
        np.testing.assert_allclose(report["r2"].values, 1.0, atol=1e-9, err_msg=fitter.name)
        assert float(epsilon(fitter.model_, ds, n_bootstrap=0)["epsilon_strict"].max()) < 1e-6, fitter.name
    # Raptor is trained, so only close: its fresh blocks start near the identity and learn it
    raptor = RaptorFitter(k=2, steps=30, stage2_steps=30, patience=0, mlp="gelu", progress=False).fit(ds, teacher=teacher)
    assert raptor.evaluate(ds, probe=False).attrs["r2_final"] > 0.999
    errors = epsilon(raptor.model_, ds, n_bootstrap=0)
    assert float(errors["epsilon_strict"].max()) < 0.05
    assert np.isnan(errors["skill"]).all()  # the identity is exact here: no skill to measure
    # every rung is scored on the images Raptor holds out
    np.testing.assert_array_equal(raptor.validation_images_, fitters[1].validation_images_)
    np.testing.assert_array_equal(split_images(ds["image"].values, 0.2, 0)[1], raptor.validation_images_)


def test_linear_and_dmd_recover_an_affine_recurrence(affine):
    teacher, ds, maps = affine
    for fitter in (LinearFitter(partition="2", progress=False), DMDFitter(partition="2", progress=False)):
        fitter.fit(ds, teacher=teacher)
        for phase, (weight, bias) in enumerate(maps):
            np.testing.assert_allclose(fitter.weight_[phase], weight, atol=1e-6, err_msg=fitter.name)
            np.testing.assert_allclose(fitter.bias_[phase], bias, atol=1e-6, err_msg=fitter.name)
        # K^p on [x; 1] is p steps of the surrogate
        x = torch.from_numpy(np.asarray(ds["hidden"].isel(image=0, layer=0).values, dtype=np.float64))
        augmented = np.concatenate([x.numpy(), np.ones((x.shape[0], 1))], axis=1)
        two_steps = augmented @ fitter.operator(0, 2).T
        rollout = fitter.model_.run(x[None].float(), 0, 2)[-1][0].double().numpy()
        np.testing.assert_allclose(two_steps[:, :-1], rollout, rtol=1e-4, atol=1e-4)
    # the DMD spectrum is A's
    np.testing.assert_allclose(np.sort_complex(fitter.eigenvalues_[1]), np.sort_complex(np.linalg.eigvals(maps[1][0])),
                               atol=1e-6)


def test_moments_are_streamed_sums_and_ridge_shrinks(affine):
    teacher, ds, _ = affine
    images = np.arange(ds.sizes["image"])[::3]  # positions
    moments = transition_moments(ds, images, batch_size=4)
    hidden = ds["hidden"].isel(image=images).values.astype(np.float64)
    x, y = hidden[:, 1].reshape(-1, WIDTH), hidden[:, 2].reshape(-1, WIDTH)  # block 2's input and output
    np.testing.assert_allclose(moments.gram[1].numpy(), x.T @ x, rtol=1e-10)
    np.testing.assert_allclose(moments.cross[1].numpy(), x.T @ y, rtol=1e-10)
    assert moments.count[1] == x.shape[0] and np.array_equal(moments.images, ds["image"].values[images])
    exact = LinearFitter(partition="2", alpha=0.0).fit(ds, teacher=teacher)
    ridge = LinearFitter(partition="2", alpha=1.0).fit(ds, teacher=teacher)
    assert np.linalg.norm(ridge.weight_[0]) < np.linalg.norm(exact.weight_[0])
    with pytest.raises(ValueError, match="other images"):
        LinearFitter(partition="2").fit(ds, teacher=teacher, moments=moments)


def test_epsilon_is_the_relative_frobenius_error(affine):
    teacher, ds, _ = affine
    model = IdentityFitter(k=1).fit(ds, teacher=teacher).model_
    result = epsilon(model, ds, images=np.arange(10), n_bootstrap=200).sel(token_kind="all")
    hidden = ds["hidden"].isel(image=np.arange(10)).values.astype(np.float64)
    errors = np.linalg.norm(hidden[:, 1:] - hidden[:, :1], axis=(2, 3)) / np.linalg.norm(hidden[:, 1:], axis=(2, 3))
    np.testing.assert_allclose(result["relative_error"].values, errors, rtol=1e-6)
    assert float(result["epsilon"]) == pytest.approx(errors.mean(axis=0).max(), rel=1e-6)
    assert float(result["epsilon_strict"]) == pytest.approx(errors.max(axis=1).mean(), rel=1e-6)
    assert float(result["epsilon_mean"]) == pytest.approx(errors.mean(), rel=1e-6)
    assert float(result["epsilon_low"]) <= float(result["epsilon"]) <= float(result["epsilon_high"])


def test_loop_schedule_scales_every_phase_evenly():
    phases = Partition([[1, 2, 3], [4, 5]])
    assert loop_schedule(phases, 1.0) == [(1, 1.0), (1, 2.0), (1, 3.0), (2, 4.0), (2, 5.0)]
    assert loop_schedule(phases, 2.0, "interpolated") == [(1, t) for t in (0.5, 1.0, 1.5, 2.0, 2.5, 3.0)] + [(2, t) for t in (3.5, 4.0, 4.5, 5.0)]
    assert loop_schedule(phases, 0.1) == [(1, 3.0), (2, 5.0)]  # at least once each


def test_fitted_rungs_save_and_load(affine, tmp_path):
    teacher, ds, _ = affine
    x = torch.from_numpy(np.asarray(ds["hidden"].isel(image=[0, 1], layer=0).values, dtype=np.float32))
    for fitter in (LinearFitter(k=2, progress=False), DMDFitter(k=2, rank=0.999, progress=False),
                   TeacherBlockFitter(k=2, progress=False), IdentityFitter(k=2)):
        fitter.fit(ds, teacher=teacher).save(tmp_path / fitter.name)
        loaded = SurrogateFitter.load(tmp_path / fitter.name, teacher=teacher)
        assert type(loaded) is type(fitter) and loaded.partition_ == fitter.partition_
        torch.testing.assert_close(loaded.transform(x), fitter.transform(x))
    assert loaded.evaluate(ds).attrs["images"] == "held-out images of the fit store"


def test_raptor_starts_from_the_teacher_block_choice(tied):
    """Initialised from the teacher-block rung's choice, an untrained Raptor is that rung: exact on a tied ViT."""
    teacher, ds = tied
    choice = TeacherBlockFitter(k=1, progress=False).fit(ds, teacher=teacher).blocks_
    untrained = dict(k=1, steps=1, stage2_steps=0, lr=0.0, mlp="gelu", progress=False)
    exact = RaptorFitter(**untrained, init=choice, depth_scaling=False).fit(ds, teacher=teacher).evaluate(ds)
    np.testing.assert_allclose(exact["r2"].values, 1.0, atol=1e-5)
    near = RaptorFitter(**untrained, init=choice).fit(ds, teacher=teacher).evaluate(ds)  # depth gains within 1e-3 of 1
    assert near.attrs["r2_final"] > 0.99
    fresh = RaptorFitter(**untrained).fit(ds, teacher=teacher).evaluate(ds)
    assert fresh.attrs["r2_final"] < near.attrs["r2_final"] - 0.05
    with pytest.raises(ValueError, match="mlp='gelu' and mlp_ratio=4"):
        RaptorFitter(**{**untrained, "mlp": "swiglu"}, init=choice).fit(ds, teacher=teacher)
    with pytest.raises(ValueError, match="one teacher block in 1..4 per phase"):
        RaptorFitter(**untrained, init=[1, 2]).fit(ds, teacher=teacher)


def test_cli_fit_surrogate_and_ladder(tied, digits_folder, tmp_path, capsys, monkeypatch):
    from dynamo.pipeline.cli import main  # here, so that the rest of the file does not need the pipeline

    teacher, _ = tied
    # the CLI loads the teacher by the store's name; stand the random-weight teacher in for it
    store = str(tmp_path / "store.zarr")
    dynamo.record(dataclasses.replace(teacher, pretrained=True), dynamo.image_set(digits_folder), store, progress=False)
    monkeypatch.setattr("dynamo.surrogates.base.load_recorded_model", lambda *args, **kwargs: teacher)
    assert main(["fit", store, "--surrogate", "teacher-block", "--k", "1", "--out", str(tmp_path / "tb"), "--json", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["blocks"] == [1] and summary["r2_final"] == pytest.approx(1.0, abs=1e-6)
    assert summary["epsilon"] < 1e-5 and summary["skill"] > 1 - 1e-5 and (tmp_path / "tb" / "r2_per_layer.png").exists()
    assert main(["fit", store, "--surrogate", "linear", "--steps", "5", "--out", str(tmp_path / "x")]) == 2
    assert "--steps apply to --surrogate raptor only" in capsys.readouterr().err
    argv = ["ladder", store, "--k", "2", "--out", str(tmp_path / "ladder"), "--steps", "3", "--patience", "0",
            "--bootstrap", "20", "--loop-scales", "0.5,1,2", "--json", "--quiet"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    rows = {(row["surrogate"], row["k"]): row for row in summary["table"]}
    assert len(rows) == 6 and rows["teacher-block", 2]["r2_final"] == pytest.approx(1.0, abs=1e-6)
    assert rows["identity", 2]["r2_final"] < 0.9
    assert rows["identity", 2]["skill"] == 0 and rows["teacher-block", 2]["skill"] == pytest.approx(1.0, abs=1e-4)
    assert rows["identity", 2]["epsilon_strict"] >= rows["identity", 2]["epsilon"] > 0
    assert {"epsilon_cls", "epsilon_patch", "skill_cls", "skill_patch", "epsilon_low"} <= set(rows["raptor", 2])
    result = xr.open_zarr(tmp_path / "ladder" / "ladder.zarr")
    assert result["loop_r2_final"].dims == ("surrogate", "k", "depth_signal", "scale")
    assert float(result["epsilon"].sel(surrogate="identity", k=2, token_kind="all")) == pytest.approx(rows["identity", 2]["epsilon"], abs=1e-4)
    assert "skill" in summary["text"] and "ε strict" in summary["text"]
    for name in ("csv", "json", "ladder", "ladder_layers", "loop_count", "html"):
        assert (tmp_path / "ladder" / summary["files"][name].split("/")[-1]).exists()
    assert "A ladder of surrogates" in (tmp_path / "ladder" / "ladder.html").read_text()
    # Raptor started from the teacher-block choice (taking the teacher's GELU MLP): exact before it trains
    assert main([*argv[:5], str(tmp_path / "started"), "--surrogates", "raptor", "--raptor-init", "teacher-block",
                 "--lr", "0", *argv[6:]]) == 0
    (row,) = json.loads(capsys.readouterr().out)["table"]
    assert row["init"] == "[1, 1]" and row["r2_final"] > 0.99
