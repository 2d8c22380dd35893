"""Store-only analyses on a dask.distributed LocalCluster equal the in-process run, and run on the workers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr
from distributed import Client, get_task_stream

import dynamo
from analyses import basins, export, phases, rank, similarity, tokens
from analyses.streaming import stream
from dynamo import zoo
from dynamo.blocks import image_blocks
from dynamo.pipeline.cli import main
from dynamo.pipeline.cluster import local_cluster
from tests.synthetic import one_blas_thread  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The zoo's reg4 ViT on 48 bundled digits, 8 images per chunk (6 blocks)."""
    path = tmp_path_factory.mktemp("distributed") / "reg4.zarr"
    dynamo.record("dynamo-zoo/vit-digits-reg4", zoo.default_images(), path, batch_size=8, limit=48, progress=False)
    return path


@pytest.fixture(scope="module")
def cluster():
    with local_cluster(2, processes=True) as local:
        yield local


def on_cluster(cluster, run):
    """``run()`` with a client to ``cluster`` as the default client; its result and the block tasks' workers."""
    with Client(cluster) as client, get_task_stream(client) as stream:
        result = run()
    workers = [task["worker"] for task in stream.data if str(task["key"]).startswith("_compute_block-")]
    return result, workers


def assert_same(local, distributed):
    xr.testing.assert_allclose(local, distributed, rtol=1e-12, atol=0)
    assert local.attrs == distributed.attrs


CASES = {
    "cosine": lambda ds: similarity.layer_similarity(ds, "cosine", progress=False),
    "cosine_per_image": lambda ds: similarity.layer_similarity(ds, "cosine", per_image=True, progress=False),
    "cka": lambda ds: similarity.layer_similarity(ds, "cka", "cls+patch", progress=False),
    "phases": lambda ds: phases.phase_analysis(ds, n_bootstrap=20, progress=False),
    "basins": lambda ds: basins.compute(ds, progress=False),
    "tokens": lambda ds: tokens.compute(ds, progress=False),
    "rank": lambda ds: rank.compute(ds, n_bootstrap=4, progress=False),
}
# block tasks per run of n blocks: CKA reads its first block once more (the shift); basins
# reads its reduced views once more after the one pass
BLOCK_TASKS = {"cka": lambda n: n + 1, "basins": lambda n: 2 * n}


@pytest.mark.parametrize("name", list(CASES))
def test_analysis_on_a_cluster_equals_the_in_process_run(name, store, cluster):
    dataset = dynamo.open_trajectories(store)
    local = CASES[name](dataset)
    distributed, workers = on_cluster(cluster, lambda: CASES[name](dataset))
    assert_same(local, distributed)
    n_blocks = len(image_blocks(dataset))
    assert len(workers) == BLOCK_TASKS.get(name, lambda n: n)(n_blocks)  # every block was a task on a worker
    assert set(workers) <= set(cluster.scheduler_info["workers"])


def test_one_pass_on_a_cluster_equals_the_in_process_run(store, cluster):
    """basins, tokens and rank in one pass: one task per block (plus basins' pass over reduced views)."""
    dataset = dynamo.open_trajectories(store)

    def one_pass():
        accumulators = {"basins": basins.Convergence(dataset, progress=False), "tokens": tokens.TokenDynamics(dataset),
                        "rank": rank.UpdateRank(dataset, n_bootstrap=4)}
        return stream(dataset, accumulators, progress=False)

    local = one_pass()
    distributed, workers = on_cluster(cluster, one_pass)
    for name in local:
        assert_same(local[name], distributed[name])
    assert len(workers) == 2 * len(image_blocks(dataset))


def test_export_projection_on_a_cluster(store, cluster, tmp_path):
    dataset = dynamo.open_trajectories(store)
    local = export.trajectories(dataset, "patch", sphere=True, n_components=3)
    with Client(cluster):
        distributed = export.trajectories(dataset, "patch", sphere=True, n_components=3)
        paths = export.export_trajectories(dataset, tmp_path, "cls", progress=False)
    np.testing.assert_allclose(distributed.attrs["components"], local.attrs["components"], rtol=1e-12)
    xr.testing.assert_allclose(distributed.compute(), local.compute(), rtol=1e-6)
    written = np.load(paths[0])
    np.testing.assert_array_equal(written, dataset["cls"].values.astype(np.float32))


def test_cli_cluster_option_gives_the_in_process_result(store, tmp_path, capsys):
    outputs = {}
    for label, extra in (("here", []), ("cluster", ["--cluster", "local:2"])):
        out = tmp_path / label
        code = main(["analyze", str(store), "--out", str(out), "--only", "tokens", "--quiet", "--json", *extra])
        assert code == 0
        assert json.loads(capsys.readouterr().out)["analyses"]["tokens"]
        outputs[label] = xr.open_zarr(out / "tokens.zarr", consolidated=False).load()
    xr.testing.assert_identical(outputs["here"], outputs["cluster"])


def test_cli_bad_cluster_address_is_one_line(store, tmp_path, capsys):
    assert main(["phases", str(store), "--cluster", "local:zero", "--quiet"]) == 2
    assert "local:N needs a positive number" in capsys.readouterr().err
    assert main(["phases", str(store), "--cluster", "tcp://127.0.0.1:1", "--quiet"]) == 2
    assert "cannot reach a dask scheduler" in capsys.readouterr().err
