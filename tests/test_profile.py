"""`dynamo profile` and `dynamo compare` end to end on the embedded default (real zoo models, real digits)."""

from __future__ import annotations

import html
import json

import numpy as np
import pytest
import xarray as xr

import dynamo
from analyses import phases as phasing
from analyses.similarity import layer_similarity
from dynamo import zoo
from dynamo.pipeline import study
from dynamo.pipeline.cli import main
from dynamo.pipeline.profile import profile
from dynamo.pipeline.registry import ANALYSES, options_for

FAST = dict(limit=40, n_bootstrap=5, only=["basins", "tokens", "rank"], progress=False)


@pytest.fixture(scope="module")
def default_profile(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    return out, profile(out=out, **FAST)


def test_report_files_exist_and_the_page_embeds_every_figure(default_profile):
    out, summary = default_profile
    for name in ("report.html", "summary.json", "similarity.png", "similarity.svg"):
        assert (out / name).stat().st_size > 0, name
    page = (out / "report.html").read_text()
    figures = [summary["phases"]["figures"][0]] + [f for entry in summary["dynamics"].values() for f in entry["figures"]]
    assert len(figures) >= 6
    assert page.count("data:image/png;base64,") == len(figures)
    assert summary["model"] == zoo.DEFAULT_MODEL and summary["n_images"] == 40
    assert summary["weights_sha256"] in page and "Provenance" in page
    # the gradient null is on by default, and the page and the terminal say in words what it concludes
    conclusion = summary["phases"]["gradient_null_conclusion"]
    assert "exceed a smooth depth gradient" in conclusion and html.escape(conclusion) in page and conclusion in summary["text"]
    assert summary["phases"]["gradient_null_exceeds"] == (summary["phases"]["gradient_null_p_value"] < 0.05
                                                          and summary["phases"]["gradient_null_effect"] > 0)


def test_summary_numbers_agree_with_the_analyses_called_directly(default_profile):
    out, _ = default_profile
    summary = json.loads((out / "summary.json").read_text())
    dataset = dynamo.open_trajectories(out / "trajectories.zarr")
    matrix = layer_similarity(dataset, progress=False)
    np.testing.assert_allclose(summary["similarity"], matrix.values, atol=1e-6)
    partition = phasing.partition_matrix(matrix, "maxcut", eps=0.1)
    assert summary["partition"] == partition
    assert summary["boundaries"] == phasing.boundaries(partition)
    scores = phasing.phase_scores(matrix, partition)
    assert {name: summary["phases"][name] for name in scores} == pytest.approx(scores, rel=1e-3, nan_ok=True)
    options = {**options_for(["basins", "tokens", "rank"], {"n_bootstrap": 5}), "progress": False, "seed": 0}
    for name in ("basins", "tokens", "rank"):
        direct = ANALYSES[name].run(dataset, None, None, options)
        stored = xr.open_zarr(summary["dynamics"][name]["result"], consolidated=False)
        for variable in direct.data_vars:
            np.testing.assert_allclose(stored[variable].values, direct[variable].values, rtol=1e-5, atol=1e-6)


def test_a_rerun_reuses_the_store_and_finished_stages(default_profile):
    out, first = default_profile
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "stages").glob("*.json")}
    assert set(stamps) == {"phases.json", "dynamics.json"}
    again = profile(out=out, **FAST)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "stages").glob("*.json")} == stamps
    assert again["partition"] == first["partition"]
    # other settings recompute the stages that use them: bootstrap resamples serve the phases' stability
    # and rank's error bars; an analysis more runs only the dynamics again
    changed = profile(out=out, **{**FAST, "n_bootstrap": 6})
    assert (out / "stages" / "phases.json").stat().st_mtime_ns != stamps["phases.json"]
    assert (out / "stages" / "dynamics.json").stat().st_mtime_ns != stamps["dynamics.json"]
    assert changed["partition"] == first["partition"]
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "stages").glob("*.json")}
    profile(out=out, **{**FAST, "n_bootstrap": 6, "only": ["tokens"]})
    assert (out / "stages" / "phases.json").stat().st_mtime_ns == stamps["phases.json"]
    assert (out / "stages" / "dynamics.json").stat().st_mtime_ns != stamps["dynamics.json"]


def test_a_store_of_another_model_in_the_folder_is_refused(default_profile):
    out, _ = default_profile
    with pytest.raises(dynamo.StoreMismatchError):
        profile("dynamo-zoo/vit-digits-p0.0", out, **FAST)


def test_compare_stacks_profiles_along_a_model_dimension(default_profile, tmp_path, capsys):
    out, _ = default_profile
    other = tmp_path / "p0.0"
    profile("dynamo-zoo/vit-digits-p0.0", other, **FAST)
    combined = study.load_study([out, other])
    assert list(combined["model"].values) == [zoo.DEFAULT_MODEL, "dynamo-zoo/vit-digits-p0.0"]
    assert combined["similarity"].dims == ("model", "layer_i", "layer_j")
    assert combined["tokens_speed"].dims == ("model", "token_kind", "block")
    np.testing.assert_allclose(combined["depth"].sel(model=zoo.DEFAULT_MODEL).values, np.arange(13) / 12)
    p00 = json.loads((other / "summary.json").read_text())
    np.testing.assert_allclose(combined["similarity"].sel(model="dynamo-zoo/vit-digits-p0.0").values, p00["similarity"], atol=1e-6)
    assert float(combined["phase_contrast"].sel(model="dynamo-zoo/vit-digits-p0.0")) == pytest.approx(
        p00["phases"]["contrast"], rel=1e-3)
    assert main(["compare", str(out), str(other), "--out", str(tmp_path / "cmp"), "--json", "--quiet"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [row["model"] for row in printed["table"]] == list(combined["model"].values)
    for path in printed["figures"].values():
        assert (tmp_path / "cmp" / path.split("/")[-1]).stat().st_size > 0
    assert (tmp_path / "cmp" / "compare.html").read_text().count("data:image/png") == len(printed["figures"])


# ---- models without a cls token, end to end (random weights: mechanics only) -----------------------------------

CLS_LESS = {
    # SigLIP: no cls token, attention (map) pooling by default
    "siglip": ["vit_base_patch16_siglip_224", "--timm", "depth=2,embed_dim=64,num_heads=2"],
    # a gap ViT: no cls token, average pooling
    "gap": ["vit_base_patch16_gap_224", "--timm", "depth=2,embed_dim=64,num_heads=2,global_pool=avg"],
    # a cls-less ViT built with map pooling by the extra timm option alone
    "map": ["vit_base_patch16_gap_224", "--timm", "depth=2,embed_dim=64,num_heads=2,class_token=False,global_pool=map"],
}


@pytest.mark.parametrize("kind", list(CLS_LESS))
def test_a_model_without_a_cls_token_profiles_end_to_end_on_the_patch_mean(kind, tmp_path, digits_folder, capsys, one_thread):
    out = tmp_path / kind
    argv = ["profile", *CLS_LESS[kind], "--no-pretrained", "--img-size", "32", "--images", str(digits_folder),
            "--limit", "20", "--bootstrap", "5", "--only", "basins,tokens,swap",
            "--out", str(out), "--quiet", "--json"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    store = dynamo.open_trajectories(out / "trajectories.zarr")
    assert not store.attrs["has_cls"] and "cls" not in store
    assert printed["tokens"] == "patch_mean" and printed["phases"]["tokens"] == "patch_mean"
    assert "token view patch_mean" in (out / "report.html").read_text() or "patch_mean" in (out / "report.html").read_text()
    assert printed["dynamics"]["basins"]["basin_view"] == "patch_mean"
    # the extra timm options are part of the store and rebuild the same teacher (the live analysis ran on it)
    options = store.attrs["timm_options"]
    assert options["depth"] == 2 and store.attrs["identity"]["timm_options"] == options
    assert dynamo.models.load_recorded_model(store.attrs).weights_sha256 == store.attrs["weights_sha256"]
    assert printed["dynamics"]["swap"]["within_r2"] is not None  # a live analysis on the rebuilt teacher
    # the phases match the patch-mean dissimilarity computed directly
    np.testing.assert_allclose(printed["similarity"], layer_similarity(store, tokens="patch_mean", progress=False).values,
                               atol=1e-6)


# ---- compare reads each profile from its own folder, and never mixes two models --------------------------------

def _tiny_profile(folder, depth: int, seed: int, digits_folder):
    model = dynamo.load_model("vit_base_patch16_gap_224", pretrained=False, img_size=32, depth=depth, embed_dim=32,
                              num_heads=2, num_classes=10, seed=seed)
    return profile(model, folder, images=digits_folder, limit=12, n_bootstrap=3, only=["tokens"], progress=False)


def test_compare_reads_a_moved_profile_and_never_mixes_two_of_the_same_name(tmp_path, digits_folder, monkeypatch):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    monkeypatch.chdir(first)
    _tiny_profile("profile", 3, 0, digits_folder)  # summary.json records paths relative to tmp/a
    monkeypatch.chdir(second)
    _tiny_profile("profile", 5, 1, digits_folder)
    # from tmp/b, "profile" is the 5-block model: the one of tmp/a must still be read from its own folder
    moved = tmp_path / "elsewhere" / "moved"
    (tmp_path / "a" / "profile").rename(moved.parent.mkdir() or moved)
    combined = study.load_study([moved, "profile"], labels=["three", "five"])
    for label, folder in (("three", moved), ("five", second / "profile")):
        summary = json.loads((folder / "summary.json").read_text())
        assert int(combined["n_layers"].sel(model=label)) == summary["layers"] - 1
        assert int(combined["n_phases"].sel(model=label)) == len(summary["partition"])
        np.testing.assert_allclose(combined["similarity"].sel(model=label).dropna("layer_i", how="all")
                                   .dropna("layer_j", how="all").values, summary["similarity"], atol=1e-6)
    assert main(["compare", str(moved), "profile", "--out", str(tmp_path / "cmp"), "--quiet"]) == 0


def test_compare_refuses_a_folder_whose_results_are_of_another_model(tmp_path, digits_folder, capsys):
    _tiny_profile(tmp_path / "three", 3, 0, digits_folder)
    _tiny_profile(tmp_path / "five", 5, 1, digits_folder)
    import shutil
    shutil.rmtree(tmp_path / "three" / "phases.zarr")
    shutil.copytree(tmp_path / "five" / "phases.zarr", tmp_path / "three" / "phases.zarr")
    assert main(["compare", str(tmp_path / "three"), str(tmp_path / "five"), "--out", str(tmp_path / "cmp"), "--quiet"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "phases result was computed on" in error and "mixes two profiles" in error
