"""Images in: folders with and without classes, path lists, arrays, and unreadable files."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from sklearn.datasets import load_digits

import dynamo
from dynamo.images import UnreadableImageWarning
from tests.conftest import tiny_model


def test_class_folders_give_labels_and_flat_folders_none(digits_folder, photo_folder):
    labelled = dynamo.image_set(digits_folder)
    assert len(labelled) == 60 and labelled.label_names == [str(d) for d in range(10)]
    assert list(labelled.labels) == [d for d in range(10) for _ in range(6)]
    flat = dynamo.image_set(photo_folder)
    assert len(flat) == 6 and flat.label_names is None and (flat.labels == -1).all()


def test_missing_or_empty_sources_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dynamo.image_set(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no images found"):
        dynamo.image_set(tmp_path)
    with pytest.raises(FileNotFoundError, match="do not exist"):
        dynamo.image_set([tmp_path / "a.png"])


def test_uint8_arrays_are_preprocessed_like_files(tmp_path, digits_folder):
    digits = load_digits()
    order = [int(p.split("/")[-1][:-4]) for p in dynamo.image_set(digits_folder).ids]
    pixels = np.round(digits.images[order] * 255 / 16).astype(np.uint8)
    loaded = tiny_model("cls", img_size=32)
    from_files = dynamo.record(loaded, digits_folder, tmp_path / "files.zarr", progress=False)
    from_array = dynamo.record(
        loaded, dynamo.image_set(pixels, labels=digits.target[order]), tmp_path / "array.zarr", progress=False
    )
    np.testing.assert_array_equal(from_files["hidden"].values, from_array["hidden"].values)
    np.testing.assert_array_equal(from_files["label"].values, from_array["label"].values)


def test_corrupt_image_is_skipped_listed_and_the_rest_recorded(tmp_path, photo_folder):
    folder = tmp_path / "photos"
    shutil.copytree(photo_folder, folder)
    (folder / "photo0_1.jpg").write_bytes(b"\xff\xd8\xff this is not a jpeg")
    truncated = (folder / "photo1_0.jpg").read_bytes()
    (folder / "photo1_0.jpg").write_bytes(truncated[: len(truncated) // 3])
    loaded = tiny_model("cls", img_size=32)
    with pytest.warns(UnreadableImageWarning, match="photo0_1.jpg"):
        dataset = dynamo.record(loaded, folder, tmp_path / "s.zarr", batch_size=4, progress=False)
    skipped = {str(folder / "photo0_1.jpg"), str(folder / "photo1_0.jpg")}
    assert set(dataset.attrs["unreadable_images"]) == skipped
    assert dataset.sizes["image"] == 4 and not (set(dataset["image_id"].values) & skipped)
    assert np.isfinite(dataset["hidden"].values).all()
    everything = dynamo.open_trajectories(tmp_path / "s.zarr", recorded_only=False)
    assert (everything["status"].values == 2).sum() == 2
    # the readable images hold what they would hold in a store without the bad files
    good = dynamo.record(
        loaded, sorted(set(map(str, photo_folder.iterdir())) - {str(photo_folder / "photo0_1.jpg"), str(photo_folder / "photo1_0.jpg")}),
        tmp_path / "good.zarr", batch_size=4, progress=False,
    )
    np.testing.assert_allclose(dataset["hidden"].values, good["hidden"].values, rtol=1e-5, atol=1e-5)


def test_folder_order_hidden_and_empty_classes(tmp_path):
    """Classes by name (hidden folders skipped, empty ones kept as names), images by path within a class."""
    from PIL import Image

    for name in ["b/x.png", "b/a0.png", "b/a/z.png", "a/y.png", ".cache/q.png"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (40, 80, 120)).save(tmp_path / name)
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "c").mkdir()
    images = dynamo.image_set(tmp_path)
    assert images.ids == [str(tmp_path / name) for name in ["a/y.png", "b/a/z.png", "b/a0.png", "b/x.png"]]
    assert images.labels.tolist() == [0, 1, 1, 1] and images.label_names == ["a", "b", "c"]
