"""Perturbation recovery: closed-form answers on affine blocks, zero gap at zero size, surrogates."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

import dynamo
from analyses import perturbation
from analyses.perturbation import _gaps, select_images, summarize
from dynamo.models import weights_sha256
from tests.conftest import tiny_model

DEPTH = 4


pytestmark = pytest.mark.usefixtures("one_thread")


class Affine(nn.Module):
    """x -> a x + b, the same b for every token: a linear contraction (|a| < 1) standing in for a block."""

    def __init__(self, a: float, b: torch.Tensor):
        super().__init__()
        self.a = a
        self.register_buffer("b", b)

    def forward(self, x):
        return self.a * x + self.b


def affine_vit(a: float, shift: float) -> dynamo.LoadedModel:
    """A real timm ViT (embedding, norm, head) whose DEPTH blocks are all x -> a x + b, |b| = shift."""
    loaded = tiny_model("cls", img_size=32, embed_dim=16, num_heads=2, depth=DEPTH)
    b = torch.randn(16, generator=torch.Generator().manual_seed(3))
    loaded.module.blocks = nn.Sequential(*[Affine(a, shift * b / b.norm()) for _ in range(DEPTH)])
    return dataclasses.replace(loaded, weights_sha256=weights_sha256(loaded.module))


def tied_vit() -> dynamo.LoadedModel:
    """A DEPTH-block width-32 ViT whose blocks all share block 1's weights, with large updates:
    exactly one recurrent block, which a k=1 Raptor can fit."""
    loaded = tiny_model("cls", img_size=32, embed_dim=32, num_heads=2, depth=DEPTH)
    block = loaded.module.blocks[0]
    with torch.no_grad():
        block.attn.proj.weight.mul_(20)
        block.mlp.fc2.weight.mul_(20)
    # copies, not one module DEPTH times: the recorder hooks each block of the list
    loaded.module.blocks = nn.Sequential(*[copy.deepcopy(block) for _ in range(DEPTH)])
    return dataclasses.replace(loaded, weights_sha256=weights_sha256(loaded.module))


@pytest.fixture(scope="module")
def affine_store(digits_folder, tmp_path_factory):
    """(model, store) for a contraction a = 0.7 with a shift, recorded on 60 real digits."""
    model = affine_vit(0.7, shift=0.5)
    path = tmp_path_factory.mktemp("affine") / "affine.zarr"
    dynamo.record(model, dynamo.image_set(digits_folder), path, batch_size=16, progress=False)
    return model, dynamo.open_trajectories(path)


def test_linear_contraction_gives_the_analytic_recovery(affine_store):
    model, ds = affine_store
    a = 0.7
    result = perturbation.compute(
        ds, model, starts=[0, 2], alphas=[0.05, 0.2], n_directions=2, images=20, progress=False
    )
    hidden = select_images(ds, 20)["hidden"].values.astype(np.float64)  # (N, layers, T, D)
    norms = np.linalg.norm(hidden, axis=-1)
    kinds = np.array(ds["token_kind"].values.tolist())
    for start in (0, 2):
        steps = np.arange(DEPTH + 1 - start)
        # the gap is a^n delta, |delta_t| = alpha |x_t|: relative gap alpha a^n |x_start,t| / |x_l,t|
        per_token = a ** steps[None, :, None] * norms[:, start : start + 1] / norms[:, start:]
        for kind in ("cls", "patch"):
            expected = per_token[..., kinds == kind].mean(-1)  # (N, layers after start)
            for alpha in (0.05, 0.2):
                measured = result["distance"].sel(start=start, alpha=alpha, token_kind=kind, layer=slice(start, None))
                np.testing.assert_allclose(measured.values, np.broadcast_to(alpha * expected[:, None, None], measured.shape), rtol=1e-3)
                assert np.isnan(result["distance"].sel(start=start, alpha=alpha).isel(layer=slice(0, start))).all()
            np.testing.assert_allclose(
                result["recovery"].sel(start=start, token_kind=kind).values,
                np.broadcast_to(expected[:, -1, None, None, None], result["recovery"].sel(start=start, token_kind=kind).shape),
                rtol=1e-3,
            )
        # the absolute gap over all tokens shrinks by exactly a^(L - start)
        np.testing.assert_allclose(result["gain"].sel(start=start).values, a ** (DEPTH - start), rtol=1e-4)
    assert result["explained_variance_ratio"].sizes == {"start": 2, "direction": 2}


def test_pure_scaling_keeps_the_angle_and_relative_gap(digits_folder, tmp_path):
    """With b = 0 every block only rescales: angle and relative gap stay as injected, recovery 1."""
    model = affine_vit(-0.8, shift=0.0)
    path = tmp_path / "scaling.zarr"
    ds = dynamo.record(model, dynamo.image_set(digits_folder), path, batch_size=16, limit=12, progress=False)
    result = perturbation.compute(ds, model, starts=[1], alphas=[0.1], n_directions=2, progress=False)
    angle = result["angle"].sel(start=1).isel(layer=slice(1, None))
    np.testing.assert_allclose(angle.values, np.broadcast_to(angle.isel(layer=[0]).values, angle.shape), rtol=1e-4)
    assert 0 < float(angle.min()) and float(angle.max()) <= np.degrees(np.arcsin(0.1)) + 1e-3
    np.testing.assert_allclose(result["recovery"].values, 1.0, rtol=1e-4)
    np.testing.assert_allclose(result["gain"].values, 0.8**3, rtol=1e-4)


def test_gap_measures_on_known_vectors():
    clean = torch.tensor([[3.0, 0.0], [0.0, 2.0]]).reshape(1, 1, 1, 2, 2)
    perturbed = torch.tensor([[3.0, 3.0], [0.0, -2.0]]).reshape(1, 1, 1, 2, 2)
    one_kind_each = torch.eye(2)
    distance, angle = _gaps(perturbed, clean, one_kind_each)
    np.testing.assert_allclose(distance.flatten().numpy(), [1.0, 2.0], rtol=1e-6)
    np.testing.assert_allclose(angle.flatten().numpy(), [45.0, 180.0], rtol=1e-5)


def test_zero_perturbation_gives_zero_gap(digits_folder, tmp_path):
    """On a real (random-weight) timm ViT: alpha = 0 leaves every later layer exactly clean."""
    model = tiny_model("cls+4reg", img_size=28, depth=6)
    ds = dynamo.record(model, dynamo.image_set(digits_folder), tmp_path / "s.zarr", limit=8, progress=False)
    result = perturbation.compute(ds, model, starts=[0, 4], alphas=[0.0, 0.1], n_directions=1, progress=False)
    zero = result.sel(alpha=0.0)
    assert float(np.nanmax(zero["distance"])) < 1e-6 and float(np.nanmax(zero["angle"])) < 1e-2
    assert zero["prediction_kept"].all()
    assert np.isnan(zero["recovery"]).all()
    assert float(result["distance"].sel(alpha=0.1, start=0, layer=0).min()) == pytest.approx(0.1, rel=1e-4)
    summary = summarize(result)
    assert {"recovery_cls_random", "recovery_cls_principal", "recovery_register_random", "prediction_kept_random"} <= set(summary)
    assert summary["recovery_patch_principal"] > 0 and summary["prediction_kept_principal"] <= 1


def test_only_one_token_kind_perturbed(affine_store):
    model, ds = affine_store
    with pytest.raises(ValueError, match="do not vary"):  # layer 0's cls token is the same for every image
        perturbation.compute(ds, model, starts=[0], n_directions=1, perturb="cls", images=6, progress=False)
    result = perturbation.compute(
        ds, model, starts=[0], alphas=[0.1], n_directions=1, bases=["random"], perturb="cls", images=6, progress=False
    )
    injected = result["distance"].sel(layer=0)
    np.testing.assert_allclose(injected.sel(token_kind="cls").values, 0.1, rtol=1e-4)
    assert float(injected.sel(token_kind="patch").max()) == 0.0  # affine blocks never mix tokens


def test_clear_errors(affine_store, digits_folder, tmp_path):
    model, ds = affine_store
    with pytest.raises(ValueError, match="starts must lie"):
        perturbation.compute(ds, model, starts=[DEPTH], progress=False)
    with pytest.raises(ValueError, match="alphas"):
        perturbation.compute(ds, model, starts=[0], alphas=[-0.1], progress=False)
    with pytest.raises(ValueError, match="perturb must be"):
        perturbation.compute(ds, model, starts=[0], perturb="dist", progress=False)
    with pytest.raises(ValueError, match="recorded with"):
        perturbation.compute(ds, affine_vit(0.5, 1.0), starts=[0], progress=False)
    with pytest.raises(ValueError, match="cannot propagate"):
        perturbation.compute(ds, object(), starts=[0], progress=False)
    subset = dynamo.record(model, dynamo.image_set(digits_folder), tmp_path / "p.zarr", limit=4, patch_tokens=2, progress=False)
    with pytest.raises(ValueError, match="every token"):
        perturbation.compute(subset, model, starts=[0], progress=False)


def exact_raptor(teacher: dynamo.LoadedModel):
    """A k=1 Raptor surrogate carrying the tied teacher's own block: the same map, by construction."""
    from dynamo.stepping import BlockStepper
    from dynamo.surrogates.raptor import Raptor

    config = dict(dim=32, num_heads=2, mlp_ratio=4.0, mlp="gelu", layerscale_init=1.0, depth_scaling=False)
    surrogate = Raptor([], num_layers=DEPTH, block_config=config, teacher=BlockStepper(teacher))
    ours, theirs = surrogate.blocks[0], teacher.module.blocks[0]
    with torch.no_grad():
        for mine, source in [(ours.norm1, theirs.norm1), (ours.norm2, theirs.norm2), (ours.mlp.fc1, theirs.mlp.fc1),
                             (ours.mlp.fc2, theirs.mlp.fc2), (ours.attn.proj, theirs.attn.proj), (ours.attn.qkv, theirs.attn.qkv)]:
            mine.weight.copy_(source.weight)
            mine.bias.copy_(source.bias)
    return surrogate.eval()


@pytest.fixture(scope="module")
def tied_store(digits_folder, tmp_path_factory):
    teacher = tied_vit()
    path = tmp_path_factory.mktemp("tied") / "tied.zarr"
    dynamo.record(teacher, dynamo.image_set(digits_folder), path, batch_size=16, progress=False)
    return teacher, path


def test_raptor_surrogates_run_the_same_protocol(tied_store):
    """A Raptor surrogate goes through the same protocol: an exact one gives the teacher's numbers,
    a fitted one gives its own (fitting trajectories does not fix the response off them)."""
    from dynamo.surrogates.raptor import RaptorFitter

    teacher, path = tied_store
    ds = dynamo.open_trajectories(path)
    settings = dict(starts=[0, 2], alphas=[0.05, 0.2], n_directions=2, images=16, progress=False)
    live = perturbation.compute(ds, teacher, **settings)
    exact = perturbation.compute(ds, exact_raptor(teacher), **settings)
    assert exact.attrs["propagator"] == "Raptor" and live.attrs["propagator"] == "BlockStepper"
    # equal up to float rounding (nn.MultiheadAttention vs timm's attention), amplified by
    # these large-update blocks
    for name in ("distance", "angle", "gain", "recovery"):
        np.testing.assert_allclose(exact[name].values, live[name].values, rtol=2e-2, atol=1e-5)
    # a prediction on a class boundary may flip with that rounding; nearly all must agree
    assert float((exact["prediction_kept"] == live["prediction_kept"]).mean()) > 0.97

    fitter = RaptorFitter(k=1, steps=150, stage2_steps=150, lr=3e-3, mlp="gelu", progress=False)
    fitted = perturbation.compute(ds, fitter.fit(path, teacher=teacher).model_, **settings)
    assert fitted["distance"].dims == live["distance"].dims
    assert np.isfinite(fitted["recovery"]).all() and (fitted["recovery"] > 0).all()
    assert float(fitted["prediction_kept"].sel(alpha=0.05).mean()) > 0.8


def test_dynamo_analyze_runs_the_live_analyses(digits_folder, tmp_path, capsys):
    """The three live-model entries of `dynamo analyze` on the trained zoo model: results, figures, headline."""
    import json

    import xarray as xr

    from dynamo.pipeline.cli import main

    store = tmp_path / "digits.zarr"
    dynamo.record("dynamo-zoo/vit-digits-reg4", digits_folder, store, limit=6, progress=False)
    from dynamo.surrogates.raptor import RaptorFitter

    RaptorFitter(k=2, steps=2, stage2_steps=0, batch_size=2, validation_fraction=0.5, progress=False).fit(store).save(tmp_path / "fit")
    out = tmp_path / "out"
    code = main(["analyze", str(store), "--out", str(out), "--only", "perturbation,jacobian,swap", "--boundaries",
                 "3,6,9", "--starts", "0,6,11", "--alphas", "0.1", "--directions", "1", "--jacobian-images", "1",
                 "--singular-values", "2", "--swap-images", "6", "--surrogate", str(tmp_path / "fit"), "--quiet", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    entries = summary["analyses"]
    assert set(entries) == {"perturbation", "jacobian", "swap"}
    assert all(path.endswith(".png") for entry in entries.values() for path in entry["figures"])
    recovery = xr.open_zarr(entries["perturbation"]["result"], consolidated=False)["recovery"]
    assert recovery.sizes["start"] == 3 and list(recovery["propagator"].values) == ["ViT", "Raptor"]
    assert any(path.endswith("perturbation_comparison_principal.png") for path in entries["perturbation"]["figures"])
    assert {"Raptor_recovery_cls_random", "Raptor_recovery_cls_principal"} <= set(entries["perturbation"])
    assert len(entries["jacobian"]["sigma_1"]) == 12
    assert entries["swap"]["partition"] == "[1-3][4-6][7-9][10-12]"
    assert entries["swap"]["within_n_swaps"] == 24 and entries["swap"]["across_n_swaps"] == 108
