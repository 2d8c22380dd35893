"""The recorder against independent references: timm's forward_intermediates and the model's logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dynamo
from tests.conftest import ARCHITECTURES, tiny_model


def _pixels(loaded, n=5, seed=0):
    torch.manual_seed(seed)
    return torch.randn(n, *loaded.data_config["input_size"])


@pytest.mark.parametrize("kind", list(ARCHITECTURES))
def test_hidden_equals_forward_intermediates_and_logits(kind, tmp_path):
    loaded = tiny_model(kind)
    model, layout = loaded.module, loaded.layout
    pixels = _pixels(loaded)
    dataset = dynamo.record(loaded, pixels, tmp_path / "s.zarr", batch_size=2, progress=False)

    hidden = torch.from_numpy(dataset["hidden"].values)
    n_blocks = len(model.blocks)
    assert hidden.shape == (5, n_blocks + 1, layout.num_tokens, model.embed_dim)
    with torch.no_grad():
        blocks = model.forward_intermediates(
            pixels, norm=False, intermediates_only=True, output_fmt="NLC",
            return_prefix_tokens=layout.num_prefix > 0,
        )
        logits = model(pixels)
    for layer, block_output in enumerate(blocks, start=1):
        if layout.num_prefix:
            spatial, prefix = block_output
            block_output = torch.cat([prefix, spatial], dim=1)
        torch.testing.assert_close(hidden[:, layer], block_output, rtol=1e-5, atol=1e-5)
    # the model's own final norm and head, applied to the last layer, give its logits
    with torch.no_grad():
        from_last_layer = model.forward_head(model.norm(hidden[:, -1]))
    torch.testing.assert_close(from_last_layer, logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(dataset["logits"].values), logits, rtol=1e-4, atol=1e-5)
    # and the first block applied to layer 0 gives layer 1 (layer 0 is the input to block 1)
    if kind != "eva":  # eva blocks also take rotary embeddings
        with torch.no_grad():
            torch.testing.assert_close(model.blocks[0](hidden[:, 0]), hidden[:, 1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["cls", "cls+4reg", "cls+dist", "gap"])
def test_token_coordinates_follow_the_layout(kind, tmp_path):
    loaded = tiny_model(kind)
    dataset = dynamo.record(loaded, _pixels(loaded, 2), tmp_path / "s.zarr", progress=False)
    kinds = list(dataset["token_kind"].values)
    layout = loaded.layout
    expected = (
        ["cls"] * layout.has_cls + ["dist"] * layout.has_dist + ["register"] * layout.num_registers
    )
    assert kinds[: layout.num_prefix] == expected
    assert kinds[layout.num_prefix :] == ["patch"] * layout.num_patches
    rows, cols = dataset["patch_row"].values, dataset["patch_col"].values
    assert (rows[: layout.num_prefix] == -1).all()
    assert rows[-1] == layout.grid[0] - 1 and cols[-1] == layout.grid[1] - 1
    assert dataset.attrs["num_prefix_tokens"] == layout.num_prefix
    assert dataset.attrs["num_registers"] == {"cls+4reg": 4}.get(kind, 0)
    assert ("cls" in dataset) == layout.has_cls
    assert ("register_mean" in dataset) == (layout.num_registers > 0)


def test_reduced_views_and_float16(tmp_path):
    loaded = tiny_model("cls+4reg")
    pixels = _pixels(loaded, 4)
    full = dynamo.record(loaded, pixels, tmp_path / "f32.zarr", progress=False)
    half = dynamo.record(loaded, pixels, tmp_path / "f16.zarr", dtype="float16", progress=False)
    hidden = full["hidden"].values
    np.testing.assert_array_equal(full["cls"].values, hidden[:, :, 0])
    np.testing.assert_allclose(full["register_mean"].values, hidden[:, :, 1:5].mean(2), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(full["patch_mean"].values, hidden[:, :, 5:].mean(2), rtol=1e-5, atol=1e-6)
    assert half["hidden"].dtype == np.float16
    np.testing.assert_allclose(half["hidden"].values.astype(np.float32), hidden, rtol=1e-3, atol=1e-2)
    # reduced views stay float32 and exact in a float16 store
    np.testing.assert_array_equal(half["patch_mean"].values, full["patch_mean"].values)


def test_layer_and_patch_token_subsets(tmp_path):
    loaded = tiny_model("cls+4reg")
    pixels = _pixels(loaded, 3)
    full = dynamo.record(loaded, pixels, tmp_path / "all.zarr", progress=False)
    part = dynamo.record(
        loaded, pixels, tmp_path / "part.zarr", layers=[0, 6, 12], patch_tokens=3, seed=7, progress=False
    )
    again = dynamo.record(
        loaded, pixels, tmp_path / "again.zarr", layers=[12, 0, 6], patch_tokens=3, seed=7, progress=False
    )
    tokens = part["token"].values
    assert list(part["layer"].values) == [0, 6, 12]
    assert list(tokens[:5]) == [0, 1, 2, 3, 4] and len(tokens) == 8  # prefix kept, 3 patches drawn
    np.testing.assert_array_equal(tokens, again["token"].values)  # seeded draw
    np.testing.assert_array_equal(
        part["hidden"].values, full["hidden"].sel(layer=[0, 6, 12], token=tokens).values
    )
    # reduced views are computed from all tokens, not just the kept ones
    np.testing.assert_array_equal(part["patch_mean"].values, full["patch_mean"].sel(layer=[0, 6, 12]).values)


def test_store_provenance_attrs(tmp_path, digits_folder):
    loaded = tiny_model("cls", img_size=32)
    dataset = dynamo.record(loaded, digits_folder, tmp_path / "s.zarr", batch_size=16, progress=False)
    attrs = dataset.attrs
    assert attrs["model"] == "vit_tiny_patch16_224" and attrs["weights_sha256"] == loaded.weights_sha256
    assert attrs["image_size"] == [32, 32] and attrs["patch_size"] == [16, 16]
    assert attrs["preprocessing"]["mean"] == list(loaded.data_config["mean"])
    assert attrs["pretrained"] is False and attrs["complete"] is True
    assert {"torch", "timm", "zarr", "xarray", "dynamo"} <= set(attrs["versions"])
    assert list(dataset["label"].values[:6]) == [0] * 6 and dataset["label_name"].values[-1] == "9"
    assert dataset["hidden"].data.chunksize == (16, 1, loaded.layout.num_tokens, loaded.module.embed_dim)


def test_blocks_tied_across_depth_are_recorded_at_every_layer(tmp_path):
    """One block module applied at every depth (weights tied): each application is its own layer."""
    loaded = tiny_model("cls", depth=4)
    model = loaded.module
    model.blocks = torch.nn.Sequential(*[model.blocks[0]] * 4)
    pixels = _pixels(loaded, 3)
    dataset = dynamo.record(loaded, pixels, tmp_path / "tied.zarr", progress=False)
    with torch.no_grad():
        blocks = model.forward_intermediates(pixels, norm=False, intermediates_only=True, output_fmt="NLC")
    hidden = torch.from_numpy(dataset["hidden"].values)
    for layer, block_output in enumerate(blocks, start=1):
        torch.testing.assert_close(hidden[:, layer, 1:], block_output, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(hidden[:, 2], hidden[:, 1])
