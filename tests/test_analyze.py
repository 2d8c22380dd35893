"""`dynamo analyze` on a real recorded store: results, figures, summary, export, lazy reading."""

from __future__ import annotations

import json

import dask
import numpy as np
import pytest
import xarray as xr
from dask.callbacks import Callback

import dynamo
from analyses import basins, export, rank, tokens
from dynamo.partition import boundaries_of
from dynamo.pipeline import analyze as analyzing
from dynamo.pipeline.cli import main
from tests.conftest import tiny_model
from tests.synthetic import one_blas_thread  # noqa: F401 (autouse fixture)

STORE_ONLY = ["basins", "tokens", "rank"]


@pytest.fixture(scope="module")
def digits_store(digits_folder, tmp_path_factory):
    """The zoo's trained reg4 ViT recorded on 60 real digits, 16 images per chunk."""
    path = tmp_path_factory.mktemp("analyze") / "digits.zarr"
    dynamo.record("dynamo-zoo/vit-digits-reg4", digits_folder, path, batch_size=16, progress=False)
    return path


def test_analyze_writes_results_figures_and_summary(digits_store, tmp_path):
    out = tmp_path / "out"
    summary = analyzing.analyze(digits_store, out, only=STORE_ONLY, boundaries=[4, 8], n_bootstrap=8, progress=False)
    written = json.loads((out / "summary.json").read_text())
    assert written["boundaries"] == [4, 8] and written["n_images"] == 60
    assert set(written["analyses"]) == set(STORE_ONLY)
    dataset = dynamo.open_trajectories(digits_store)
    for name in STORE_ONLY:
        entry = written["analyses"][name]
        for figure in entry["figures"]:
            with open(figure, "rb") as handle:
                assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
        assert boundaries_of(xr.open_zarr(entry["result"], consolidated=False)) == [4, 8]
    stored = xr.open_zarr(out / "basins.zarr")
    direct = basins.compute(dataset, progress=False)
    np.testing.assert_allclose(stored["gamma"].values, direct["gamma"].values)
    assert stored.attrs["model"] == "dynamo-zoo/vit-digits-reg4"
    assert written["analyses"]["basins"]["basin_accuracy"][-1] > 0.8  # a trained model's final basins
    stored_rank = xr.open_zarr(out / "rank.zarr", consolidated=False)
    np.testing.assert_allclose(
        stored_rank["rank"].values, rank.compute(dataset, n_bootstrap=0, progress=False)["rank"].values
    )
    assert len(stored_rank["replicate"]) == 8
    assert written["analyses"]["tokens"]["speed_deg_cls"] == pytest.approx(
        tokens.summarize(tokens.compute(dataset, progress=False))["speed_deg_cls"]
    )
    assert "cls_late_turn_block" in summary["text"]


def test_cli_finds_phase_boundaries_and_exports(digits_store, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["analyze", str(digits_store), "--out", str(out), "--only", "tokens", "--export", "cls,patch",
                 "--export-components", "3", "--quiet", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    from analyses import phases

    expected = phases.boundaries(phases.find_phases(dynamo.open_trajectories(digits_store), method="maxcut"))
    assert summary["boundaries"] == expected
    patch = np.load(out / "trajectories_patch_pca3.npy")
    description = json.loads((out / "trajectories_patch_pca3.json").read_text())
    assert patch.shape == (60 * 64, 13, 3) and description["dims"] == ["trial", "time", "component"]
    assert description["token"][:3] == [5, 6, 7] and len(description["label"]) == 60 * 64


def test_export_is_the_store_reshaped(digits_store, tmp_path):
    dataset = dynamo.open_trajectories(digits_store)
    paths = export.export_trajectories(dataset, tmp_path, "patch", sphere=True, progress=False)
    array = np.load(paths[0], mmap_mode="r")
    hidden = dataset["hidden"].isel(image=7).values  # (layer, token, feature)
    expected = hidden[:, 5 + 10] / np.linalg.norm(hidden[:, 5 + 10], axis=-1, keepdims=True)
    np.testing.assert_allclose(array[7 * 64 + 10], expected, rtol=1e-5)
    cls = export.trajectories(dataset, "cls")
    assert cls.dims == ("trial", "time", "feature") and cls.shape == (60, 13, 64)
    with pytest.raises(ValueError, match="unknown view"):
        export.trajectories(dataset, "attention")


def test_store_only_analyses_read_hidden_one_chunk_at_a_time(digits_store):
    """No single dask computation returns more than one (image block, layer) chunk of `hidden`."""
    dataset = dynamo.open_trajectories(digits_store)
    chunk_bytes = 16 * 1 * dataset.sizes["token"] * dataset.sizes["feature"] * 4
    whole_bytes = dataset["hidden"].nbytes

    class LargestResult(Callback):
        largest = 0

        def _posttask(self, key, result, dsk, state, worker_id):
            LargestResult.largest = max(LargestResult.largest, getattr(result, "nbytes", 0))

    with LargestResult(), dask.config.set(scheduler="synchronous"):
        basins.compute(dataset, progress=False)
        tokens.compute(dataset, progress=False)
        rank.compute(dataset, n_bootstrap=2, progress=False)
    assert 0 < LargestResult.largest <= chunk_bytes < whole_bytes / 20


def test_user_errors_exit_2_with_one_line(digits_store, tmp_path, capsys):
    assert main(["analyze", str(digits_store), "--out", str(tmp_path), "--only", "basins,chaos"]) == 2
    error = capsys.readouterr().err
    assert "unknown analyses ['chaos']" in error and "basins" in error
    assert main(["analyze", str(tmp_path / "missing.zarr"), "--out", str(tmp_path)]) == 2
    assert "no trajectory store" in capsys.readouterr().err


def test_registry_entries_are_complete():
    for name, entry in analyzing.ANALYSES.items():
        assert callable(entry.run) and entry.figures and entry.description, name
        assert all(callable(spec.plot) and spec.caption.endswith(".") for spec in entry.figures), name


@pytest.mark.parametrize("layout", ["gap", "cls+dist"])
def test_other_token_layouts_run_end_to_end(layout, digits_folder, tmp_path):
    """Random-weight models (mechanics only): no cls token (global pooling), or a distillation token."""
    store = tmp_path / f"{layout}.zarr"
    dynamo.record(tiny_model(layout), digits_folder, store, limit=20, batch_size=8, progress=False)
    summary = analyzing.analyze(store, tmp_path / "out", only=STORE_ONLY, boundaries=[2], n_bootstrap=3, progress=False)
    kinds = set(xr.open_zarr(tmp_path / "out" / "tokens.zarr")["token_kind"].values)
    assert kinds == ({"patch"} if layout == "gap" else {"cls", "dist", "patch"})
    figures = [name for entry in summary["analyses"].values() for name in entry["figures"]]
    assert any(name.endswith("basins_class_structure.png") for name in figures)
    assert any(name.endswith("basins_cls_projection.png") for name in figures) == (layout != "gap")
