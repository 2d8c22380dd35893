"""Data already written is never lost, mixed or misreported (issue 20's eight cases, one test each or more)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import xarray as xr

import dynamo
from dynamo.pipeline.cli import main
from dynamo.store import StoreError, save_result
from tests.conftest import tiny_model


@pytest.fixture
def store(tmp_path, digits_folder):
    out = tmp_path / "s.zarr"
    dynamo.record(tiny_model("cls", img_size=32), digits_folder, out, limit=12, batch_size=4, progress=False)
    return out


def _hold_shard_lock(out):
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from dynamo.shards import Shard, shard_lock\nimport time\n"
         f"with shard_lock({str(out)!r}, Shard()):\n    print('locked', flush=True)\n    time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


# 1. a result never replaces a store, a path inside one, the input, or another kind of result
def test_phases_out_onto_a_store_is_refused_and_the_store_kept(store, tmp_path, capsys):
    other = tmp_path / "other.zarr"
    shutil.copytree(store, other)
    for target, reason in ((other, "is a trajectory store"), (store, "own input"), (store / "phases.zarr", "lies inside")):
        assert main(["phases", str(store), "--out", str(target), "--bootstrap", "0", "--quiet"]) == 2
        assert reason in capsys.readouterr().err
    assert dynamo.open_trajectories(other).sizes["image"] == 12
    assert main(["info", str(other)]) == 0
    assert not (store / "phases.zarr").exists()


def test_results_replace_only_their_own_kind(tmp_path):
    result = xr.Dataset({"x": ("layer", np.arange(3.0))}, attrs={"analysis": "tokens"})
    path = save_result(result, tmp_path / "r.zarr")
    save_result(result, path)  # same kind: replaced
    with pytest.raises(StoreError, match="'rank' result replaces only its own kind"):
        save_result(result.assign_attrs(analysis="rank"), path)
    (tmp_path / "notes.zarr").mkdir()
    with pytest.raises(StoreError, match="not a dynamo result"):
        save_result(result, tmp_path / "notes.zarr")


def test_analyze_and_fit_refuse_an_out_inside_the_store(store, capsys):
    assert main(["analyze", str(store), "--out", str(store / "dyn"), "--only", "tokens", "--quiet"]) == 2
    assert "lies inside" in capsys.readouterr().err
    assert main(["fit", str(store), "--out", str(store), "--k", "1", "--steps", "1", "--quiet"]) == 2
    assert "own input" in capsys.readouterr().err
    assert not (store / "dyn").exists()


# 2. --overwrite takes the lock before deleting, and refuses while a writer holds it
def test_overwrite_refuses_while_another_process_records(store, digits_folder):
    before = dynamo.open_trajectories(store)["hidden"].values.copy()
    holder = _hold_shard_lock(store)
    try:
        with pytest.raises(dynamo.StoreBusyError, match="is writing"):
            dynamo.record(tiny_model("cls", img_size=32), digits_folder, store, limit=12, batch_size=4,
                          dtype="float16", overwrite=True, progress=False)
    finally:
        holder.kill()
        holder.wait()
    np.testing.assert_array_equal(dynamo.open_trajectories(store)["hidden"].values, before)


# 6. float16 overflow is refused, naming the layer and the largest value
def test_float16_overflow_is_refused(tmp_path, digits_folder):
    loaded = tiny_model("cls", img_size=32, depth=3)
    with torch.no_grad():
        loaded.module.blocks[1].mlp.fc2.bias.fill_(1e5)
    with pytest.raises(dynamo.RecordingError, match=r"overflow float16 at layer 2 \(largest \|value\| 1(\.\d+)?e\+05.*float32"):
        dynamo.record(loaded, digits_folder, tmp_path / "h.zarr", limit=4, dtype="float16", progress=False)
    stored = dynamo.record(loaded, digits_folder, tmp_path / "f.zarr", limit=4, dtype="float32", progress=False)
    assert np.isfinite(stored["hidden"].values).all()


def test_nan_weights_are_diagnosed_as_the_model(tmp_path, digits_folder):
    loaded = tiny_model("cls", img_size=32, depth=3)
    with torch.no_grad():
        loaded.module.blocks[0].attn.qkv.weight.fill_(float("nan"))
    with pytest.raises(dynamo.RecordingError, match="non-finite activations .* layer 1: the model or its checkpoint"):
        dynamo.record(loaded, digits_folder, tmp_path / "n.zarr", limit=4, progress=False)


# 7. the images hash covers contents, not the folder's name or how it is written
def test_changed_image_contents_are_refused_on_resume_and_moving_the_folder_is_not(tmp_path, digits_folder, monkeypatch):
    images = tmp_path / "digits"
    shutil.copytree(digits_folder, images)
    loaded = tiny_model("cls", img_size=32)
    out = tmp_path / "s.zarr"
    dynamo.record(loaded, images, out, limit=8, progress=False)
    monkeypatch.chdir(tmp_path)
    dynamo.record(loaded, "digits", out, limit=8, progress=False)  # relative path: the same images
    moved = tmp_path / "elsewhere"
    images.rename(moved)
    dynamo.record(loaded, moved, out, limit=8, progress=False)  # moved folder: the same images
    first = sorted((moved / "0").iterdir())[0]
    first.write_bytes(sorted((moved / "1").iterdir())[0].read_bytes())
    with pytest.raises(dynamo.StoreMismatchError, match="images_sha256"):
        dynamo.record(loaded, moved, out, limit=8, progress=False)


# 5. a damaged store fails with one line naming the layer and images; info says so; record repairs it
def test_a_missing_chunk_is_found_reported_and_re_recorded(store, digits_folder, capsys):
    before = dynamo.open_trajectories(store)["hidden"].values.copy()
    (store / "hidden" / "c" / "1" / "5" / "0" / "0").unlink()  # images 4-7, layer 5
    with pytest.raises(dynamo.StoreError, match=r"damaged: `hidden` layer 5, images 4-7 .*re-record exactly those"):
        dynamo.open_trajectories(store)
    assert main(["analyze", str(store), "--out", str(store.parent / "dyn"), "--only", "tokens", "--quiet"]) == 2
    assert "layer 5, images 4-7" in capsys.readouterr().err
    assert main(["info", str(store)]) == 0
    assert "DAMAGED" in capsys.readouterr().out
    dynamo.record(tiny_model("cls", img_size=32), digits_folder, store, limit=12, batch_size=4, progress=False)
    np.testing.assert_array_equal(dynamo.open_trajectories(store)["hidden"].values, before)


def test_non_finite_values_in_a_store_fail_every_analysis_with_the_layer_and_images(store, tmp_path, capsys):
    import zarr

    hidden = zarr.open_group(str(store), mode="r+")["hidden"]
    block = hidden[4:8, 5]
    block[1:3, 0, 0] = np.nan  # images 5 and 6, layer 5
    hidden[4:8, 5] = block
    for only in ("tokens", "basins", "rank"):
        assert main(["analyze", str(store), "--out", str(tmp_path / only), "--only", only, "--boundaries", "none", "--quiet"]) == 2
        assert re.search(r"non-finite values \(NaN or inf\) in `hidden` at layer\(s\) \[?5\]?, images 5-6",
                         capsys.readouterr().err)
    assert main(["phases", str(store), "--tokens", "all", "--bootstrap", "0", "--quiet"]) == 2
    assert "non-finite values" in capsys.readouterr().err
