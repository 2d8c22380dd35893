"""The store under bad conditions: a killed writer, a second writer, a wrong store, a full disk."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dynamo
from dynamo import store as stores
from tests.conftest import tiny_model

RECORD_SCRIPT = textwrap.dedent(
    """
    import sys, torch, dynamo
    torch.manual_seed(0)
    model = dynamo.load_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=64)
    dynamo.record(model, sys.argv[1], sys.argv[2], batch_size=4, progress=False)
    """
)


def _recorded(path) -> int:
    try:
        return int((zarr.open_group(str(path), mode="r")["status"][:] != stores.PENDING).sum())
    except Exception:  # store not created yet
        return 0


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path, digits_folder):
    killed, reference = tmp_path / "killed.zarr", tmp_path / "reference.zarr"
    process = subprocess.Popen([sys.executable, "-c", RECORD_SCRIPT, str(digits_folder), str(killed)])
    deadline = time.time() + 120
    while _recorded(killed) < 8 and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    recorded_at_kill = _recorded(killed)
    assert 0 < recorded_at_kill < 60, "the kill must land mid-run for this test to mean anything"
    with pytest.warns(UserWarning, match="incomplete"):
        partial = dynamo.open_trajectories(killed)
    assert partial.sizes["image"] == recorded_at_kill

    # resuming is running the same command again; the lock died with the process
    subprocess.run([sys.executable, "-c", RECORD_SCRIPT, str(digits_folder), str(killed)], check=True)
    subprocess.run([sys.executable, "-c", RECORD_SCRIPT, str(digits_folder), str(reference)], check=True)
    resumed, uninterrupted = dynamo.open_trajectories(killed), dynamo.open_trajectories(reference)
    assert resumed.sizes["image"] == 60 and resumed.attrs["complete"]
    for name in ("hidden", "cls", "patch_mean", "logits", "status", "image_id", "label"):
        np.testing.assert_array_equal(resumed[name].values, uninterrupted[name].values)


def test_second_writer_is_refused(tmp_path, digits_folder):
    out = tmp_path / "s.zarr"
    loaded = tiny_model("cls", img_size=32)
    dynamo.record(loaded, digits_folder, out, limit=4, progress=False)
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from dynamo.shards import Shard, shard_lock\nimport time\nwith shard_lock({str(out)!r}, Shard()):\n    print('locked', flush=True)\n    time.sleep(60)"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(dynamo.StoreBusyError, match="is writing"):
            dynamo.record(loaded, digits_folder, out, limit=4, progress=False)
    finally:
        holder.kill()
        holder.wait()
    # once the other writer is gone, the same call goes through
    assert dynamo.record(loaded, digits_folder, out, limit=4, progress=False).sizes["image"] == 4


def test_store_from_another_model_is_refused_and_kept(tmp_path, digits_folder):
    out = tmp_path / "s.zarr"
    first = dynamo.record(tiny_model("cls", img_size=32), digits_folder, out, limit=8, progress=False)
    before = first["hidden"].values.copy()
    other = tiny_model("cls+4reg", img_size=28)
    with pytest.raises(dynamo.StoreMismatchError, match="weights_sha256.*--overwrite") as error:
        dynamo.record(other, digits_folder, out, limit=8, progress=False)
    assert "model: store has" in str(error.value)
    np.testing.assert_array_equal(dynamo.open_trajectories(out)["hidden"].values, before)
    # different images are a mismatch too
    with pytest.raises(dynamo.StoreMismatchError, match="images_sha256"):
        dynamo.record(tiny_model("cls", img_size=32), digits_folder, out, limit=9, progress=False)
    replaced = dynamo.record(other, digits_folder, out, limit=8, overwrite=True, progress=False)
    assert replaced.attrs["weights_sha256"] == other.weights_sha256


def test_not_a_store_is_refused(tmp_path):
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w").attrs["hello"] = 1
    with pytest.raises(dynamo.StoreError, match="not a dynamo trajectory store"):
        dynamo.open_trajectories(tmp_path / "plain.zarr")
    with pytest.raises(dynamo.StoreError, match="no trajectory store"):
        dynamo.open_trajectories(tmp_path / "missing.zarr")
    with pytest.raises(dynamo.StoreError, match="not a dynamo trajectory store"):
        dynamo.record(tiny_model("cls", img_size=32), np.zeros((2, 8, 8), np.uint8), tmp_path / "plain.zarr",
                      overwrite=True, progress=False)


def test_full_disk_keeps_written_blocks_and_resumes(tmp_path, digits_folder, monkeypatch):
    out, reference = tmp_path / "s.zarr", tmp_path / "ref.zarr"
    loaded = tiny_model("cls", img_size=32)
    real_setitem = zarr.Array.__setitem__
    batch_starts = set()

    def fill_up_on_third_block(array, key, value):
        if array.basename == "hidden":  # written one layer at a time: key is (image slice, layer)
            batch_starts.add(key[0].start)
            if len(batch_starts) == 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_setitem(array, key, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", fill_up_on_third_block)
    with pytest.raises(dynamo.RecordingError, match="disk is full.*16 images already recorded are kept"):
        # one writer: with several, a block started before the failure is also kept
        dynamo.record(loaded, digits_folder, out, batch_size=8, writers=1, progress=False)
    monkeypatch.setattr(zarr.Array, "__setitem__", real_setitem)
    resumed = dynamo.record(loaded, digits_folder, out, batch_size=8, progress=False)
    uninterrupted = dynamo.record(loaded, digits_folder, reference, batch_size=8, progress=False)
    np.testing.assert_array_equal(resumed["hidden"].values, uninterrupted["hidden"].values)


def test_resume_uses_the_store_batch_size(tmp_path, digits_folder):
    out = tmp_path / "s.zarr"
    loaded = tiny_model("cls", img_size=32)
    dynamo.record(loaded, digits_folder, out, batch_size=8, progress=False)
    again = dynamo.record(loaded, digits_folder, out, batch_size=5, progress=False)
    assert again["hidden"].data.chunksize[0] == 8 and again.attrs["complete"]


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fail_at_write=st.integers(0, 7 * 6 - 1))
def test_failure_at_any_write_resumes_to_the_same_store(tmp_path_factory, digits_folder, fail_at_write):
    """Whichever zarr write fails (any array, any block), re-running completes an identical store."""
    root = tmp_path_factory.mktemp("any")
    loaded = tiny_model("cls+4reg", img_size=28, depth=3)
    reference = dynamo.record(loaded, digits_folder, root / "ref.zarr", batch_size=10, progress=False)
    real_setitem = zarr.Array.__setitem__
    count = {"writes": 0}

    def failing(array, key, value):
        count["writes"] += 1
        if count["writes"] - 1 == fail_at_write:
            raise OSError(errno.EIO, "simulated I/O failure")
        return real_setitem(array, key, value)

    zarr.Array.__setitem__ = failing
    try:
        with pytest.raises(dynamo.RecordingError, match="run the same command again"):
            dynamo.record(loaded, digits_folder, root / "s.zarr", batch_size=10, progress=False)
    finally:
        zarr.Array.__setitem__ = real_setitem
    resumed = dynamo.record(loaded, digits_folder, root / "s.zarr", batch_size=10, progress=False)
    for name in ("hidden", "cls", "register_mean", "logits", "status"):
        np.testing.assert_array_equal(resumed[name].values, reference[name].values)
