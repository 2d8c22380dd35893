"""Sharded recording, summaries-only stores, autocast and parallel writers."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import zarr

import dynamo
from analyses.similarity import layer_similarity
from dynamo import shards
from dynamo.pipeline.cli import main
from dynamo.shards import Shard, parse_shard
from tests.conftest import tiny_model

MODEL = "dynamo-zoo/vit-digits-reg4"
VARIABLES = ("hidden", "cls", "patch_mean", "register_mean", "logits", "status", "image_id", "label")


@pytest.fixture(scope="module")
def images_with_a_corrupt_file(tmp_path_factory, digits_folder):
    """The 60 real digits plus one corrupt PNG, which lands inside the second shard's blocks."""
    root = tmp_path_factory.mktemp("images") / "digits"
    shutil.copytree(digits_folder, root)
    (root / "3" / "corrupt.png").write_bytes(b"not a png")
    return root


def _record_command(images, out, *extra) -> list[str]:
    return [sys.executable, "-m", "dynamo.pipeline.cli", "record", MODEL, "--images", str(images), "--out", str(out),
            "--batch-size", "8", "--quiet", *extra]


def _assert_same_store(a, b):
    left, right = dynamo.open_trajectories(a), dynamo.open_trajectories(b)
    for name in VARIABLES:
        np.testing.assert_array_equal(left[name].values, right[name].values, err_msg=name)
    assert left.attrs["complete"] and right.attrs["complete"]
    assert left.attrs["unreadable_images"] == right.attrs["unreadable_images"]


def test_shards_recorded_by_concurrent_processes_equal_one_process(tmp_path, images_with_a_corrupt_file):
    sharded, single = tmp_path / "sharded.zarr", tmp_path / "single.zarr"
    processes = [subprocess.Popen(_record_command(images_with_a_corrupt_file, sharded, "--shard", f"{i}/3"))
                 for i in range(3)]
    assert [p.wait(timeout=300) for p in processes] == [0, 0, 0]
    subprocess.run(_record_command(images_with_a_corrupt_file, single), check=True, timeout=300)
    _assert_same_store(sharded, single)
    unreadable = dynamo.open_trajectories(sharded).attrs["unreadable_images"]
    assert len(unreadable) == 1 and unreadable[0].endswith("corrupt.png")
    assert zarr.open_group(str(sharded))["status"][:].size == 61


def test_a_failed_shard_resumes_and_the_last_shard_completes_the_store(tmp_path, digits_folder, monkeypatch):
    model = dynamo.load_model(MODEL)
    out, reference = tmp_path / "s.zarr", tmp_path / "reference.zarr"
    dynamo.record(model, digits_folder, reference, batch_size=8, progress=False)

    real_setitem = zarr.Array.__setitem__
    writes = {"n": 0}

    def failing_setitem(self, key, value):
        writes["n"] += 1
        if writes["n"] == 20:
            raise OSError(28, "No space left on device")
        return real_setitem(self, key, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", failing_setitem)
    with pytest.raises(dynamo.RecordingError, match="disk is full"):
        dynamo.record(model, digits_folder, out, batch_size=8, shard="0/2", progress=False)
    monkeypatch.setattr(zarr.Array, "__setitem__", real_setitem)

    partial = dynamo.record(model, digits_folder, out, batch_size=8, shard="1/2", progress=False)
    assert partial.sizes["image"] < 60 and not partial.attrs["complete"]
    with pytest.raises(shards.StoreIncompleteError, match=r"not complete: images [-\d, ]+ are not recorded.*shard\(s\) 0/2"):
        shards.consolidate(out)
    assert main(["consolidate", str(out)]) == 2

    finished = dynamo.record(model, digits_folder, out, batch_size=8, shard="0/2", progress=False)
    assert finished.attrs["complete"]  # the shard that finished last marked the store complete
    _assert_same_store(out, reference)
    assert main(["consolidate", str(out), "--json"]) == 0


def test_consolidate_finds_a_missing_chunk(tmp_path, digits_folder):
    out = tmp_path / "s.zarr"
    dynamo.record(tiny_model("cls", img_size=32), digits_folder, out, batch_size=16, progress=False)
    shards.consolidate(out)
    chunk = sorted(p for p in (out / "hidden").rglob("*") if p.is_file() and p.name != "zarr.json")[5]
    chunk.unlink()
    with pytest.raises(dynamo.StoreError, match=r"damaged: `hidden` layer \d+, images \d+-\d+ are recorded but their data are not on disk"):
        shards.consolidate(out)


def test_shards_of_another_layout_and_the_same_shard_are_refused(tmp_path, digits_folder):
    out = tmp_path / "s.zarr"
    model = tiny_model("cls", img_size=32)
    dynamo.record(model, digits_folder, out, limit=16, batch_size=4, shard="0/2", progress=False)
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import time
            from dynamo.shards import Shard, shard_lock
            with shard_lock({str(out)!r}, Shard(1, 2)):
                print("locked", flush=True)
                time.sleep(60)
        """)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(dynamo.StoreBusyError, match="shard 1/2 is writing .* use --shard I/2"):
            dynamo.record(model, digits_folder, out, limit=16, batch_size=4, shard="0/3", progress=False)
        with pytest.raises(dynamo.StoreBusyError, match="shard 1/2 is already running"):
            dynamo.record(model, digits_folder, out, limit=16, batch_size=4, shard="1/2", progress=False)
    finally:
        holder.kill()
        holder.wait()
    # once shard 1/2 is gone, a single process finishes the store
    assert dynamo.record(model, digits_folder, out, limit=16, batch_size=4, progress=False).attrs["complete"]


def test_shard_parsing_and_block_ownership():
    assert parse_shard("2/5") == Shard(2, 5) and parse_shard(None) == Shard(0, 1)
    assert parse_shard("auto", {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "8"}) == Shard(3, 8)
    assert parse_shard("auto", {"RANK": "1", "WORLD_SIZE": "2"}) == Shard(1, 2)
    for bad, message in (("5/5", "0..4"), ("1-4", "I/N"), ("auto", "launcher variables")):
        with pytest.raises(ValueError, match=message):
            parse_shard(bad, {})
    for n_blocks in (1, 7, 10):
        for count in (1, 3, 4):
            owned = [list(Shard(i, count).blocks(n_blocks)) for i in range(count)]
            assert sum(owned, []) == list(range(n_blocks))  # disjoint, in order, all covered
            assert max(map(len, owned)) - min(map(len, owned)) <= 1
            assert all(Shard(0, count).owner(b, n_blocks) == i for i, bs in enumerate(owned) for b in bs)


def test_summaries_only_store_holds_the_same_views(tmp_path, digits_folder):
    model = dynamo.load_model(MODEL)
    full = dynamo.record(model, digits_folder, tmp_path / "full.zarr", batch_size=16, progress=False)
    views = dynamo.record(model, digits_folder, tmp_path / "views.zarr", batch_size=16, summaries_only=True, progress=False)
    assert "hidden" not in views and views.attrs["summaries_only"] and views.attrs["complete"]
    for name in ("cls", "patch_mean", "register_mean", "logits"):
        np.testing.assert_array_equal(views[name].values, full[name].values)
    # the paper's similarity matrix needs only the views
    np.testing.assert_array_equal(layer_similarity(views, progress=False), layer_similarity(full, progress=False))
    store_bytes = {p: sum(f.stat().st_size for f in (tmp_path / p).rglob("*")) for p in ("full.zarr", "views.zarr")}
    assert store_bytes["views.zarr"] < store_bytes["full.zarr"] / 10
    with pytest.raises(dynamo.StoreMismatchError, match="summaries_only"):
        dynamo.record(model, digits_folder, tmp_path / "views.zarr", batch_size=16, progress=False)


def test_parallel_writers_and_autocast(tmp_path, digits_folder, one_thread):
    model = tiny_model("cls+4reg", img_size=28)
    one = dynamo.record(model, digits_folder, tmp_path / "w1.zarr", batch_size=4, writers=1, progress=False)
    four = dynamo.record(model, digits_folder, tmp_path / "w4.zarr", batch_size=4, writers=4, progress=False)
    for name in ("hidden", "cls", "logits", "status"):
        np.testing.assert_array_equal(one[name].values, four[name].values)
    low = dynamo.record(model, digits_folder, tmp_path / "bf16.zarr", batch_size=4, autocast="bfloat16", progress=False)
    assert low.attrs["autocast"] == "bfloat16"
    hidden, reference = low["hidden"].values, one["hidden"].values
    assert not np.array_equal(hidden, reference)  # the forward really ran in bfloat16
    scale = np.abs(reference).max(axis=(2, 3), keepdims=True)
    assert np.abs(hidden - reference).max() / scale.max() < 0.05
    assert (low["logits"].values.argmax(1) == one["logits"].values.argmax(1)).mean() > 0.9
    with pytest.raises(dynamo.StoreMismatchError, match="autocast"):
        dynamo.record(model, digits_folder, tmp_path / "bf16.zarr", batch_size=4, progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU path is tested everywhere)")
@pytest.mark.parametrize("summaries_only", [False, True])
def test_gpu_recording_equals_cpu_recording(tmp_path, digits_folder, summaries_only):
    """Pinned buffers, side-stream copies and device-side summaries give the CPU path's store."""
    model = tiny_model("cls+4reg", img_size=28)
    options = dict(batch_size=8, summaries_only=summaries_only, progress=False)
    cpu = dynamo.record(model, digits_folder, tmp_path / "cpu.zarr", **options)
    gpu = dynamo.record(model, digits_folder, tmp_path / "gpu.zarr", device="cuda", writers=3, **options)
    for name in ("cls", "patch_mean", "register_mean", "logits") + (() if summaries_only else ("hidden",)):
        np.testing.assert_allclose(gpu[name].values, cpu[name].values, rtol=1e-4, atol=1e-4, err_msg=name)
    half = dynamo.record(model, digits_folder, tmp_path / "half.zarr", device="cuda", dtype="float16",
                         autocast="float16", **options)
    np.testing.assert_allclose(half["patch_mean"].values, cpu["patch_mean"].values, rtol=0.05, atol=0.05)
