"""Layer similarity matrices against direct computations, CKA's invariances, and the heatmaps."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
import xarray as xr
from scipy.stats import ortho_group

import dynamo
from analyses.phases import boundaries, maxcut_partition
from analyses.similarity import layer_similarity
from figures.similarity import similarity_grid, similarity_heatmap, to_similarity


@pytest.fixture(scope="module")
def store(tmp_path_factory, digits_folder):
    """60 real digits through the zoo ViT (cls + 4 registers), in 4 chunks of images."""
    path = tmp_path_factory.mktemp("similarity") / "reg4.zarr"
    dynamo.record("dynamo-zoo/vit-digits-reg4", digits_folder, path, batch_size=16, progress=False)
    return dynamo.open_trajectories(path)


@pytest.fixture(scope="module")
def hidden(store):
    """All of ``hidden`` in memory, blocks 1..L: (image, layer, token, feature) float64."""
    return store["hidden"].sel(layer=slice(1, None)).values.astype(np.float64)


def kind_positions(store, kind):
    return np.flatnonzero(np.array([str(k) for k in store["token_kind"].values]) == kind)


def test_default_is_the_papers_cosine_matrix(store, hidden):
    """The notebook's computation, line for line in torch, from the raw tokens."""
    patches = kind_positions(store, "patch")
    a = torch.from_numpy(hidden).permute(1, 0, 2, 3)  # L x B x N x D
    a = torch.cat((a[:, :, 0:1], a[:, :, patches].mean(dim=2, keepdim=True)), dim=2)
    a1, a2 = a.unsqueeze(0), a.unsqueeze(1)
    cosine = (1.0 - torch.clamp(torch.nn.functional.cosine_similarity(a1, a2, dim=4, eps=1e-8), -1.0, 1.0))
    expected = cosine.mean(3).sum(2) / a.shape[1]
    matrix = layer_similarity(store, progress=False)
    assert matrix.dims == ("layer_i", "layer_j")
    assert matrix["layer_i"].values.tolist() == list(range(1, 13))
    assert matrix.attrs["orientation"] == "dissimilarity" and matrix.attrs["measure"] == "cosine"
    np.testing.assert_allclose(matrix.values, expected.numpy(), atol=1e-6)


def test_mse_and_angular_match_direct_formulas_over_tokens(store, hidden):
    registers = hidden[:, :, kind_positions(store, "register")]  # (image, layer, 4, feature)
    difference = registers[:, :, None] - registers[:, None, :]
    mse = (difference**2).mean(-1).mean((0, 3))
    np.testing.assert_allclose(layer_similarity(store, "mse", "register", progress=False).values, mse, rtol=1e-6, atol=1e-9)
    unit = hidden / np.linalg.norm(hidden, axis=-1, keepdims=True)
    cosine = np.einsum("nitf,njtf->nijt", unit, unit)
    angular = (np.arccos(np.clip(cosine, -1, 1)) / np.pi).mean((0, 3))
    np.fill_diagonal(angular, 0)
    np.testing.assert_allclose(layer_similarity(store, "angular", "all", progress=False).values, angular, atol=1e-6)


def test_per_image_matrices_average_to_the_matrix_and_include_layer_zero(store):
    per_image = layer_similarity(store, "cosine", "cls+register_mean", layers=range(13), per_image=True, progress=False)
    assert per_image.dims == ("image", "layer_i", "layer_j") and per_image.sizes["image"] == 60
    matrix = layer_similarity(store, "cosine", "cls+register_mean", layers=range(13), progress=False)
    np.testing.assert_allclose(per_image.mean("image").values, matrix.values, atol=1e-12)
    assert matrix["layer_i"].values[0] == 0


def centred_gram(x: np.ndarray) -> np.ndarray:
    centre = np.eye(len(x)) - 1 / len(x)
    return centre @ x @ x.T @ centre


def gram_cka_dissimilarity(layers: np.ndarray) -> np.ndarray:
    """1 − Kornblith et al.'s linear CKA from centred Gram matrices (samples × samples).

    layers : (layer, sample, feature)
    """
    grams = [centred_gram(x) for x in layers]
    return np.array([[1 - (k * g).sum() / np.sqrt((k * k).sum() * (g * g).sum()) for g in grams] for k in grams])


def test_streamed_cka_equals_the_full_gram_computation(store, hidden):
    registers = hidden[:, :, kind_positions(store, "register")]
    samples = registers.transpose(1, 0, 2, 3).reshape(12, -1, registers.shape[-1])  # layer, image*token, feature
    matrix = layer_similarity(store, "cka", "register", progress=False)
    np.testing.assert_allclose(matrix.values, gram_cka_dissimilarity(samples), atol=1e-8)
    cls = hidden[:, :, 0].transpose(1, 0, 2)
    np.testing.assert_allclose(layer_similarity(store, "cka", "cls", progress=False).values, gram_cka_dissimilarity(cls), atol=1e-8)


def synthetic_views(rng, transform=None, n_images=40, n_layers=5, width=6) -> xr.Dataset:
    """Random correlated layers as a chunked reduced view; ``transform(layer, x)`` edits a layer."""
    base = rng.standard_normal((n_images, width))
    layers = [base @ rng.standard_normal((width, width)) + 3.0 + 0.5 * rng.standard_normal((n_images, width)) for _ in range(n_layers)]
    if transform is not None:
        layers = [transform(index, x) for index, x in enumerate(layers)]
    data = np.stack(layers, axis=1)
    ds = xr.Dataset({"cls": (("image", "layer", "feature"), data)}, coords={"layer": np.arange(n_layers)})
    return ds.chunk({"image": 7})


def test_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling():
    seed = 7
    plain = layer_similarity(synthetic_views(np.random.default_rng(seed)), "cka", "cls", range(5), progress=False)
    rotations = [ortho_group.rvs(6, random_state=index) for index in range(5)]
    rotated = synthetic_views(np.random.default_rng(seed), lambda i, x: (i + 0.5) * 10.0 ** (i - 2) * x @ rotations[i])
    moved = layer_similarity(rotated, "cka", "cls", range(5), progress=False)
    np.testing.assert_allclose(moved.values, plain.values, atol=1e-10)
    stretched = synthetic_views(np.random.default_rng(seed), lambda i, x: x * np.arange(1, 7) ** 2 if i == 2 else x)
    changed = layer_similarity(stretched, "cka", "cls", range(5), progress=False)
    assert np.abs(changed.values - plain.values).max() > 1e-3  # an anisotropic scaling does change it


def test_bad_requests_name_the_problem(store):
    with pytest.raises(ValueError, match="unknown measure 'cca'"):
        layer_similarity(store, "cca", progress=False)
    with pytest.raises(ValueError, match="unknown token group 'dist'"):
        layer_similarity(store, tokens="cls+dist", progress=False)
    with pytest.raises(ValueError, match="per_image"):
        layer_similarity(store, "cka", per_image=True, progress=False)
    with pytest.raises(ValueError, match=r"layers \[40\] are not in the store"):
        layer_similarity(store, layers=[1, 40], progress=False)
    with pytest.raises(ValueError, match="no bounded similarity"):
        to_similarity(layer_similarity(store, "mse", progress=False))
    with pytest.raises(ValueError, match="is a similarity"):
        maxcut_partition(to_similarity(layer_similarity(store, progress=False)))


def test_heatmap_draws_boundaries_and_names_the_model(store, tmp_path):
    matrix = layer_similarity(store, progress=False)
    two, three = maxcut_partition(matrix, k=2), maxcut_partition(matrix, k=3)
    ax = similarity_heatmap(matrix, {"2 phases": two, "3 phases": three}).axes[0]
    dashed = [line for line in ax.lines if line.get_linestyle() == "--"]
    assert len(dashed) == 2 * (len(boundaries(two)) + len(boundaries(three)))
    assert "dynamo-zoo/vit-digits-reg4" in ax.get_title()
    assert ax.images[0].get_array().max() == pytest.approx(1.0)  # shown as similarity: 1 on the diagonal
    ax.figure.savefig(tmp_path / "heatmap.png")
    assert (tmp_path / "heatmap.png").stat().st_size > 10_000


def test_grid_shares_one_colour_scale(store, tmp_path):
    matrices = {
        "cls": layer_similarity(store, tokens="cls", progress=False),
        "patches": layer_similarity(store, tokens="patch", progress=False),
        "registers": layer_similarity(store, tokens="register", progress=False),
    }
    figure = similarity_grid(matrices, {name: maxcut_partition(m) for name, m in matrices.items()}, ncols=2)
    panels = [ax for ax in figure.axes if ax.images]
    assert [ax.get_title() for ax in panels] == list(matrices)
    assert len({ax.images[0].get_clim() for ax in panels}) == 1
    figure.savefig(tmp_path / "grid.png")
    with pytest.raises(ValueError, match="share a measure"):
        similarity_grid([matrices["cls"], layer_similarity(store, "mse", progress=False)])


def test_a_dot_in_a_figure_name_is_kept(tmp_path):
    """`dynamo phases --figure x_f0.2.png` writes x_f0.2.png and .svg, not x_f0.png (a dot is not a suffix)."""
    import matplotlib.pyplot as plt

    from figures.output import save_figures

    written = save_figures({"x_f0.2": plt.figure(), "x_f0.1": plt.figure()}, tmp_path, formats=("png", "svg"))
    assert written == {"x_f0.2": tmp_path / "x_f0.2.png", "x_f0.1": tmp_path / "x_f0.1.png"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_f0.1.png", "x_f0.1.svg", "x_f0.2.png", "x_f0.2.svg"]
