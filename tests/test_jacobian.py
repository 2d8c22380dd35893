"""Block Jacobian spectra from JVPs/VJPs: closed form on affine blocks, a full Jacobian on a real block."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dynamo
from analyses import jacobian, perturbation
from analyses.jacobian import summarize, top_singular_values
from dynamo.stepping import BlockStepper
from tests.conftest import tiny_model
from tests.test_perturbation import DEPTH, affine_vit

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("a", [0.6, -1.3])
def test_affine_blocks_have_the_analytic_spectrum(a, digits_folder, tmp_path):
    """x -> a x + b has Jacobian a I: every singular value |a|, composed |a|^(L - l0)."""
    model = affine_vit(a, shift=0.5)
    ds = dynamo.record(model, dynamo.image_set(digits_folder), tmp_path / "a.zarr", limit=6, progress=False)
    result = jacobian.compute(ds, model, n_singular=3, composed=True, progress=False)
    np.testing.assert_allclose(result["singular_value"].values, abs(a), rtol=1e-5)
    np.testing.assert_allclose(result["expansion_rate"].values, np.log(abs(a)), atol=1e-5)
    starts = result["start"].values
    expected = abs(a) ** (DEPTH - starts)[None, :, None]
    np.testing.assert_allclose(result["singular_value_to_end"].values, np.broadcast_to(expected, (6, DEPTH, 3)), rtol=1e-4)
    np.testing.assert_allclose(result["lyapunov_exponent"].values, np.log(abs(a)), atol=1e-4)
    hidden = ds["hidden"].values
    growth = np.linalg.norm(hidden[:, 1:].reshape(6, DEPTH, -1), axis=-1) / np.linalg.norm(
        hidden[:, :-1].reshape(6, DEPTH, -1), axis=-1
    )
    np.testing.assert_allclose(result["norm_growth"].values, growth, rtol=1e-4)
    summary = summarize(result)
    assert summary["sigma_1"][0] == pytest.approx(abs(a), rel=1e-3) and len(summary["lyapunov_exponent"]) == DEPTH


def test_top_singular_values_match_a_full_jacobian_of_a_real_block():
    """On a (random-weight) timm block: the JVP/VJP estimate equals numpy's SVD of the full Jacobian."""
    loaded = tiny_model("cls", img_size=32, embed_dim=24, num_heads=2, depth=2)
    stepper = BlockStepper(loaded)
    x = torch.randn(3, loaded.layout.num_tokens, 24, generator=torch.Generator().manual_seed(0))
    block = lambda z: stepper.step(z, 2)  # noqa: E731
    estimate = top_singular_values(block, x, k=4, generator=torch.Generator().manual_seed(1)).numpy()
    for i in range(3):
        jacobian = torch.autograd.functional.jacobian(lambda z: block(z[None])[0], x[i])
        exact = np.linalg.svd(jacobian.reshape(x[i].numel(), -1).numpy(), compute_uv=False)
        np.testing.assert_allclose(estimate[i, :3], exact[:3], rtol=1e-4)
        np.testing.assert_allclose(estimate[i, 3], exact[3], rtol=1e-3)  # clustered near 1: slower
        assert (estimate[i] <= exact[:4] * (1 + 1e-5)).all()  # Ritz values approach from below
    assert not np.allclose(exact[:4], 1.0, atol=1e-3)  # a non-trivial block, not the identity


def test_perturbation_gain_is_bounded_by_the_composed_jacobian(digits_folder, tmp_path):
    """For a small perturbation the growth |J delta| / |delta| cannot exceed sigma_1 of dX_L / dX_l0."""
    model = tiny_model("cls", img_size=32, embed_dim=24, num_heads=2, depth=3)
    ds = dynamo.record(model, dynamo.image_set(digits_folder), tmp_path / "t.zarr", limit=4, progress=False)
    spectrum = jacobian.compute(ds, model, n_singular=1, composed=True, progress=False)
    gains = perturbation.compute(ds, model, alphas=[1e-3], n_directions=3, progress=False)["gain"]
    sigma = spectrum["singular_value_to_end"].sel(component=1)
    assert (gains.max(["basis", "direction", "alpha"]) <= sigma * 1.01).all()
    assert (gains.max(["basis", "direction", "alpha"]) >= 0.3 * sigma).all()  # and is of its order


def test_bad_arguments(digits_folder, tmp_path):
    model = affine_vit(0.5, shift=0.0)
    ds = dynamo.record(model, dynamo.image_set(digits_folder), tmp_path / "b.zarr", limit=2, progress=False)
    with pytest.raises(ValueError, match="blocks must lie"):
        jacobian.compute(ds, model, blocks=[0], progress=False)
    with pytest.raises(ValueError, match="k must be"):
        top_singular_values(lambda z: z, torch.zeros(1, 2), k=3)
