"""The stochastic-depth study script (examples/stochastic_depth_study.py) in its --fast mode."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import dynamo
from analyses import phases as phasing
from dynamo.partition import Partition, from_result
from dynamo.surrogates.raptor import RaptorFitter

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "stochastic_depth_study.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("stochastic_depth_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fast_run(script, tmp_path_factory):
    out = tmp_path_factory.mktemp("sd-study")
    numbers = script.main(["--out", str(out), "--fast", "--quiet"])
    return out, numbers


def test_fast_run_writes_dataset_json_and_figures(fast_run):
    out, numbers = fast_run
    saved = json.loads((out / "study.json").read_text())
    assert set(saved["models"]) == {"vit-digits-p0.0", "random-init"}
    for path in saved["figures"].values():
        assert Path(path).stat().st_size > 10_000
    study = xr.open_zarr(out / "study.zarr")
    assert study["model"].values.tolist() == ["vit-digits-p0.0", "random-init"]
    assert study["role"].values.tolist() == ["family", "untrained"]
    assert study["raptor_r2"].dims == ("model", "k", "layer", "token_kind")
    assert study["fit"].values.tolist() == ["fitted", "uniform", "random 0", "shuffled 0", "k=1"]
    shuffled = from_result(study.sel(model="vit-digits-p0.0", k=2, fit="shuffled 0"))
    assert shuffled == Partition.random_shuffled(12, 2, 0) and not shuffled.is_contiguous
    assert saved["models"]["vit-digits-p0.0"]["raptor"]["k=2"]["r2_final"] == pytest.approx(
        float(study["raptor_r2_final"].sel(model="vit-digits-p0.0", k=2)), abs=1e-4)
    # the partition test compares the trained model's max-cut fit with each random kind
    rows = {row["number"]: row for row in saved["partition_test"]["shuffled"]["2"]}
    assert [row["model"] for row in saved["partition_test"]["random"]["2"]] == ["vit-digits-p0.0"] * 2
    assert rows["r2_final"]["maxcut"] == pytest.approx(float(study["raptor_r2_final"].sel(model="vit-digits-p0.0", k=2)))
    assert rows["r2_final"]["mean"] == pytest.approx(float(study["baseline_r2_final"].sel(model="vit-digits-p0.0", k=2, fit="shuffled 0")))
    assert {claim["verdict"].split(" ")[0] for claim in saved["claims"]} <= {"reproduced", "refuted", "undecided"}


def test_study_numbers_equal_the_analyses_called_directly(fast_run):
    out, _ = fast_run
    study = xr.open_zarr(out / "study.zarr").sel(model="vit-digits-p0.0").load()
    store = out / "vit-digits-p0.0" / "trajectories.zarr"
    dataset = dynamo.open_trajectories(store)
    assert dataset.sizes["image"] == int(study["n_images"])
    direct = phasing.phase_analysis(dataset, "maxcut", eps=0.1, n_bootstrap=0, progress=False)
    np.testing.assert_allclose(study["similarity"].values, direct["dissimilarity"].values, rtol=1e-6)
    assert float(study["phase_contrast"]) == pytest.approx(float(direct["scores"].sel(score="contrast")))
    assert str(study["phase_partition"].values) == str(from_result(direct))
    partition = from_result(study.sel(k=2, fit="fitted"))
    assert float(study["partition_silhouette"].sel(k=2)) == pytest.approx(
        phasing.phase_scores(direct["dissimilarity"], partition)["silhouette"])
    teacher = dynamo.load_model("dynamo-zoo/vit-digits-p0.0")
    report = RaptorFitter.load(out / "vit-digits-p0.0" / "raptor" / "k2", teacher=teacher).evaluate(store, probe=False)
    np.testing.assert_allclose(study["raptor_r2"].sel(k=2).values, report["r2"].values, rtol=1e-6)
    assert float(study["raptor_accuracy_ratio"].sel(k=2)) == pytest.approx(report.attrs["accuracy_ratio"])
    assert from_result(report) == partition
    logits = dataset["logits"].values
    assert float(study["vit_accuracy"]) == pytest.approx((logits.argmax(-1) == dataset["label"].values).mean())


def test_rerun_reuses_the_fits(script, fast_run):
    out, _ = fast_run
    fits = sorted((out / "vit-digits-p0.0" / "raptor").glob("*/weights.safetensors"))
    before = [path.stat().st_mtime_ns for path in fits]
    script.main(["--out", str(out), "--fast", "--quiet"])
    assert len(fits) == 4 and [path.stat().st_mtime_ns for path in fits] == before  # k1, k2, k2-random0, k2-shuffled0


def test_random_init_model_is_seeded_and_marked_untrained(script):
    like = "vit-digits-p0.0"
    first, second = script.random_init_model(like, seed=3), script.random_init_model(like, seed=3)
    assert not first.pretrained
    assert first.weights_sha256 == second.weights_sha256
    assert first.weights_sha256 != script.random_init_model(like, seed=4).weights_sha256
    assert first.weights_sha256 != dynamo.load_model("dynamo-zoo/vit-digits-p0.0").weights_sha256
