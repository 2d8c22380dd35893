"""Heads: the model's own, a linear probe on [cls ‖ patch mean], or none; and which one each accuracy used.

A headless model (timm ``num_classes=0``: DINOv2, CLIP towers, MAE) must never yield an accuracy
from an argmax over its pooled features. Models are tiny random-weight timm ViTs (mechanics only).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import dynamo
from analyses import basins as basins_analysis
from analyses import swap
from dynamo.heads import NO_HEAD, LinearHead, NoHeadError, resolve_head, store_accuracy
from dynamo.pipeline.cli import main
from dynamo.pipeline.profile import profile
from dynamo.stepping import BlockStepper
from dynamo.surrogates.raptor import RaptorFitter
from tests.conftest import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def headless_model() -> dynamo.LoadedModel:
    """A 3-block DINOv2-layout ViT (cls + 4 registers) without a classifier, as timm builds DINOv2."""
    torch.manual_seed(0)
    loaded = dynamo.load_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=42, embed_dim=32,
                               num_heads=2, depth=3)
    assert loaded.module.num_classes == 0
    return loaded


@pytest.fixture(scope="module")
def stores(digits_folder, tmp_path_factory):
    """The headless model's stores of the 60 labelled digits and of the same digits unlabelled."""
    model = headless_model()
    root = tmp_path_factory.mktemp("heads")
    paths = sorted(digits_folder.rglob("*.png"))
    labelled = dynamo.record(model, dynamo.image_set(digits_folder), root / "labelled.zarr", batch_size=16, progress=False)
    unlabelled = dynamo.record(model, dynamo.image_set(paths), root / "unlabelled.zarr", batch_size=16, progress=False)
    return model, labelled, unlabelled


def _features_by_hand(module, x):
    normed = module.norm(x)
    return torch.cat([normed[:, 0], normed[:, 5:].mean(dim=1)], dim=-1)  # cls, then the patches (registers 1..4 left out)


def test_features_are_cls_and_patch_mean_after_the_final_norm(stores):
    model, ds, _ = stores
    x = torch.from_numpy(ds["hidden"].isel(layer=-1, image=slice(0, 5)).values)
    head = LinearHead(model)
    assert head.width == 64
    with torch.no_grad():
        torch.testing.assert_close(head.features(x), _features_by_hand(model.module, x))
    # without a cls token the head's input is the normed patch mean: timm's own pre-logits of a global-pool ViT
    gap = tiny_model("gap").module
    x = torch.randn(3, 4, gap.embed_dim, generator=torch.Generator().manual_seed(0))  # 2 x 2 patches, no prefix
    with torch.no_grad():
        torch.testing.assert_close(LinearHead(gap).features(x), gap.forward_head(gap.norm(x), pre_logits=True))


def test_a_dinov2_style_head_file_is_read_and_a_wrong_width_refused(stores, tmp_path):
    model, ds, _ = stores
    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(10, 64, generator=generator), torch.randn(10, generator=generator)
    torch.save({"weight": weight, "bias": bias}, tmp_path / "dinov2_vits14_reg4_linear_head.pth")
    save_file({"linear.weight": weight, "linear.bias": bias}, tmp_path / "head.safetensors")
    x = torch.from_numpy(ds["hidden"].isel(layer=-1, image=slice(0, 7)).values)
    with torch.no_grad():
        expected = _features_by_hand(model.module, x) @ weight.T + bias
        for name in ("dinov2_vits14_reg4_linear_head.pth", "head.safetensors"):
            head = LinearHead.load(tmp_path / name, model)
            torch.testing.assert_close(head.logits(x), expected)
            torch.testing.assert_close(head.predict(x), expected.argmax(-1))
            assert head.describe()["accuracy_head"] == "probe" and head.describe()["head_train_images"] == []
    # a file that is not a linear head, or one of another width: one line naming the fix
    torch.save({"weight": torch.randn(10, 32), "bias": torch.randn(10)}, tmp_path / "narrow_linear_head.pth")
    with pytest.raises(ValueError, match=r"\(10, 32\).*64 wide"):
        LinearHead.load(tmp_path / "narrow_linear_head.pth", model)
    torch.save({"a.weight": weight, "b.weight": weight, "bias": bias}, tmp_path / "two.pth")
    with pytest.raises(ValueError, match="one linear layer"):
        LinearHead.load(tmp_path / "two.pth", model)


def test_a_fitted_probe_is_sklearns_on_a_recorded_stratified_split(stores):
    model, ds, _ = stores
    head = LinearHead(model, seed=3).fit(ds)
    labels = ds["label"].values
    train = np.isin(ds["image"].values, head.train_images_)
    assert train.sum() == 30 and (np.bincount(labels[train]) == 3).all()  # half of each class's 6
    again = LinearHead(model, seed=3).fit(ds)
    np.testing.assert_array_equal(again.train_images_, head.train_images_)
    assert "stratified" in head.source_ and "seed 3" in head.source_
    # the folded standardisation is scikit-learn's pipeline: the same decisions on every image
    x = torch.from_numpy(ds["hidden"].isel(layer=-1).values)
    with torch.no_grad():
        features = _features_by_hand(model.module, x).double().numpy()
        ours = head.predict(x).numpy()
    reference = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(features[train], labels[train])
    np.testing.assert_array_equal(ours, reference.predict(features))
    # the store-level accuracy scores only the images the probe was not fitted on
    attrs = store_accuracy(ds, head)
    assert attrs["accuracy_images"] == 30 and attrs["accuracy_head"] == "probe"
    assert attrs["model_accuracy"] == pytest.approx((ours[~train] == labels[~train]).mean())


def test_a_headless_model_never_gives_an_argmax_over_features(stores):
    """No head, no accuracy: the stepper has no logits, and every accuracy is absent with a note."""
    model, ds, unlabelled = stores
    stepper = BlockStepper(model)
    x = torch.from_numpy(ds["hidden"].isel(layer=-1, image=slice(0, 4)).values)
    assert stepper.head is None and stepper.head_kind is None
    with pytest.raises(NoHeadError, match="no classifier head"):
        stepper.predict(x)
    note = NO_HEAD.format(model=model.source)
    # basins: no stored logits, no probe
    basins = basins_analysis.compute(ds, progress=False)
    assert "model_accuracy" not in basins.attrs and basins.attrs["accuracy_note"] == note
    assert basins_analysis.summarize(basins)["accuracy_note"] == note and "model_accuracy" not in basins_analysis.summarize(basins)
    # layer swap: R² only
    swapped = swap.compute(ds, model, partition=[[1], [2, 3]], images=8, progress=False)
    assert "accuracy" not in swapped and "agreement" not in swapped and "clean_accuracy" not in swapped.attrs
    assert swapped.attrs["accuracy_note"] == note and "clean_accuracy" not in swap.summarize(swapped)
    # Raptor: the R² report, no accuracy
    fitter = RaptorFitter(k=1, steps=2, stage2_steps=0, batch_size=8, progress=False).fit(ds, teacher=model)
    report = fitter.evaluate(ds, probe=False)
    assert not {"accuracy_ratio", "accuracy_teacher", "agreement"} & set(report.attrs)
    assert report.attrs["accuracy_note"] == note
    with pytest.raises(NoHeadError):
        fitter.predict(torch.randn(2, 3, 42, 42))
    # a pipeline without labels fits no probe: no head at all
    assert resolve_head(unlabelled, model) is None


def test_with_a_probe_every_accuracy_names_it_and_skips_its_training_images(stores):
    model, ds, _ = stores
    head = resolve_head(ds, model, seed=0)
    assert isinstance(head, LinearHead)
    held_out = ~np.isin(ds["image"].values, head.train_images_)
    labels = ds["label"].values
    with torch.no_grad():
        predicted = head.predict(torch.from_numpy(ds["hidden"].isel(layer=-1).values)).numpy()
    basins = basins_analysis.compute(ds, progress=False, head=head)
    assert basins.attrs["accuracy_head"] == "probe" and basins.attrs["accuracy_images"] == held_out.sum()
    assert basins.attrs["model_accuracy"] == pytest.approx((predicted == labels)[held_out].mean())
    assert basins_analysis.summarize(basins)["accuracy_head"] == "probe"
    swapped = swap.compute(ds, model, partition=[[1], [2, 3]], progress=False, head=head)
    assert swapped.attrs["accuracy_head"] == "probe" and swapped.attrs["accuracy_images"] == held_out.sum()
    assert swapped.attrs["clean_accuracy"] == pytest.approx((predicted == labels)[held_out].mean())
    assert swap.summarize(swapped)["accuracy_head"] == "probe"
    fitter = RaptorFitter(k=1, steps=2, stage2_steps=0, batch_size=8, progress=False).fit(ds, teacher=model, head=head)
    report = fitter.evaluate(ds, probe=False)
    evaluated = np.isin(ds["image"].values, fitter.validation_images_)
    assert report.attrs["accuracy_head"] == "probe" and report.attrs["accuracy_images"] == (evaluated & held_out).sum()
    assert report.attrs["accuracy_teacher"] == pytest.approx((predicted == labels)[evaluated & held_out].mean())
    # a model with a classifier keeps using it
    own = tiny_model("cls", img_size=32, depth=2)
    assert BlockStepper(own).head_kind == "model" and resolve_head(ds, own) is None


def test_cli_fit_and_profile_name_the_head_or_say_why_there_is_none(stores, digits_folder, tmp_path, capsys, monkeypatch):
    model, ds, unlabelled = stores
    # the CLI loads the teacher by the store's name: stand the random-weight model in for it
    monkeypatch.setattr("dynamo.surrogates.base.load_recorded_model", lambda *args, **kwargs: model)
    for store in (ds, unlabelled):
        path = tmp_path / f"{store.encoding['source'].split('/')[-1]}"
        dynamo.record(dataclasses.replace(model, pretrained=True), dynamo.image_set(
            digits_folder if store is ds else sorted(digits_folder.rglob("*.png"))), path, progress=False)
        argv = ["fit", str(path), "--k", "1", "--steps", "2", "--stage2-steps", "0", "--batch-size", "8",
                "--out", str(tmp_path / f"fit-{path.stem}"), "--json", "--quiet"]
        assert main(argv) == 0
        summary = json.loads(capsys.readouterr().out)
        if store is ds:
            assert summary["accuracy_head"] == "probe" and "stratified" in summary["head_source"]
            assert 0 <= summary["accuracy_ratio"] and summary["accuracy_images"] > 0
        else:
            assert not {"accuracy_ratio", "accuracy_teacher", "agreement", "accuracy_head"} & set(summary)
            assert summary["accuracy_note"] == NO_HEAD.format(model=model.source)
    # a head file of the wrong width: one line naming the fix
    torch.save({"weight": torch.randn(10, 32), "bias": torch.randn(10)}, tmp_path / "narrow_linear_head.pth")
    assert main([*argv[:-3], str(tmp_path / "narrow"), "--head", str(tmp_path / "narrow_linear_head.pth"), "--quiet"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("dynamo fit: error:") and "64 wide" in error and "\n" not in error
    # the profile report names the head on a labelled folder, and says why there is none on an unlabelled one
    for images, name in ((digits_folder, "labelled"), (sorted(digits_folder.rglob("*.png")), "unlabelled")):
        out = tmp_path / f"profile-{name}"
        summary = profile(model, out, images=images, only=["basins", "swap"], n_bootstrap=5, fit_raptor=1,
                          raptor_steps=2, progress=False)
        page = (out / "report.html").read_text()
        basins, swapped, raptor = summary["dynamics"]["basins"], summary["dynamics"]["swap"], summary["raptor"]
        if name == "labelled":
            assert basins["accuracy_head"] == swapped["accuracy_head"] == raptor["accuracy_head"] == "probe"
            assert "model_accuracy" in basins and "accuracy_ratio" in raptor and "stratified split" in page
        else:
            for entry in (basins, swapped, raptor):
                assert entry["accuracy_note"].startswith("no accuracy") and "accuracy_head" not in entry
            assert "model_accuracy" not in basins and "accuracy_ratio" not in raptor and "no accuracy" in page


def test_every_bad_head_file_gets_one_line_naming_the_problem(stores, tmp_path, capsys):
    """Through the CLI as a user passes them: never an accuracy from a head that does not fit, never torch's
    advice to unpickle (weights_only=False), never a bare Python error ("pop from empty list")."""
    model, ds, _ = stores
    store = ds.encoding["source"]
    generator = torch.Generator().manual_seed(0)
    files = {
        "five_classes.pth": ({"weight": torch.randn(5, 64, generator=generator), "bias": torch.randn(5)},
                             "has 5 classes, but the store's labels go up to 9"),
        "nan.pth": ({"weight": torch.full((10, 64), float("nan")), "bias": torch.zeros(10)}, "hold NaN or infinite"),
        "inf_bias.pth": ({"weight": torch.randn(10, 64), "bias": torch.full((10,), float("inf"))}, "bias hold NaN"),
        "bias_shape.pth": ({"weight": torch.randn(10, 64), "bias": torch.randn(7)}, "bias (7,)"),
        "width.pth": ({"weight": torch.randn(10, 32), "bias": torch.randn(10)}, "64 wide"),
        "numpy.pth": ({"weight": np.zeros((10, 64)), "bias": np.zeros(10)}, "Python objects other than tensors"),
        "garbage.pth": (bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8)), "not a torch file"),
        "text.pth": (b"weight,bias\n1,2\n", "not a torch file"),
        "garbage.safetensors": (b"\x00\x01not a header" * 40, "not a valid safetensors file"),
    }
    for name, (content, expected) in files.items():
        path = tmp_path / name
        path.write_bytes(content) if isinstance(content, bytes) else torch.save(content, path)
        argv = ["fit", store, "--surrogate", "identity", "--k", "1", "--head", str(path), "--out", str(tmp_path / f"o-{name}"),
                "--quiet"]
        assert main(argv) == 2, name
        error = capsys.readouterr().err.strip()
        assert error.startswith("dynamo fit: error:") and "\n" not in error, (name, error)
        assert expected in error and str(path) in error, (name, error)
        assert "weights_only" not in error and "pop from empty" not in error and "Traceback" not in error, (name, error)
        assert not (tmp_path / f"o-{name}" / "config.json").exists()
