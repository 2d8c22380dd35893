"""The models researchers study: DINOv2/CLIP/DeiT checkpoints in their original formats, the input
size and preprocessing chosen from the command line, and seeded random weights.

Checkpoints are random-weight files written by the tests themselves in each original format (no
download): a timm model is built, its state dict is renamed to the original key names (the inverse
of timm's converters, written here and only here), saved with ``torch.save``, and loaded by dynamo.
The references are timm's own: the source model's outputs, timm's
``create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=...))`` and
``resample_abs_pos_embed``.
"""

from __future__ import annotations

import numpy as np
import pytest
import timm
import timm.data
import torch
from PIL import Image
from timm.layers import resample_abs_pos_embed
from torchvision import transforms

import dynamo
from dynamo import zoo
from dynamo.capture import Capture
from dynamo.models import crop_pct, load_recorded_model, preprocess_overrides
from dynamo.pipeline.cli import main
from dynamo.surrogates import SurrogateFitter

DINO_B = "vit_base_patch14_reg4_dinov2"
TINY = dict(embed_dim=32, depth=2, num_heads=2)


# ---- original checkpoint formats (the inverse of timm's converters, for writing test files) ----


def to_dinov2_hub(state: dict, seed: int = 0) -> dict:
    """A timm DINOv2 state dict in the torch-hub format (``dinov2_vitb14_reg4_pretrain.pth``):
    ``register_tokens``, a ``pos_embed`` with the cls position (folded into ``cls_token`` by timm),
    and the unused ``mask_token``; block keys (``blocks.0.ls1.gamma``, ...) are the same."""
    out = {key: value.clone() for key, value in state.items() if key != "reg_token"}
    dim = state["cls_token"].shape[-1]
    if "reg_token" in state:
        cls_position = torch.randn(1, 1, dim, generator=torch.Generator().manual_seed(seed))
        out["register_tokens"] = state["reg_token"].clone()
        out["pos_embed"] = torch.cat([cls_position, state["pos_embed"]], dim=1)
        out["cls_token"] = state["cls_token"] - cls_position
    out["mask_token"] = torch.zeros(1, dim)
    return out


def to_openclip(state: dict) -> dict:
    """A timm CLIP ViT state dict as a whole OpenCLIP model file: the image tower under ``visual.``
    with OpenAI/OpenCLIP names (``conv1``, ``ln_pre``, ``transformer.resblocks.N.attn.in_proj_weight``,
    ``ln_post``, ``proj``), plus a few text-tower keys that a loader must ignore."""
    assert not state["head.bias"].any(), "CLIP's projection has no bias"
    renames = [("patch_embed.proj", "conv1"), ("norm_pre", "ln_pre"), ("blocks.", "transformer.resblocks."),
               ("norm1", "ln_1"), ("norm2", "ln_2"), ("attn.qkv.", "attn.in_proj_"), ("attn.proj", "attn.out_proj"),
               ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]
    out = {}
    for key, value in state.items():
        if key == "cls_token":
            out["visual.class_embedding"] = value.reshape(-1)
        elif key == "pos_embed":
            out["visual.positional_embedding"] = value[0]
        elif key == "head.weight":
            out["visual.proj"] = value.T.contiguous()
        elif key.startswith("norm."):
            out["visual.ln_post." + key[len("norm."):]] = value
        elif key != "head.bias":
            for old, new in renames:
                key = key.replace(old, new)
            out["visual." + key] = value
    text_tower = {"positional_embedding": (77, 16), "token_embedding.weight": (100, 16), "ln_final.weight": (16,),
                  "transformer.resblocks.0.ln_1.weight": (16,), "text_projection": (16, 16), "logit_scale": ()}
    return {**out, **{key: torch.ones(shape) for key, shape in text_tower.items()}}


def to_deit(state: dict) -> dict:
    """A DeiT training checkpoint: the state dict under ``model``."""
    return {"model": state, "epoch": torch.tensor(300)}


def to_deit3(state: dict) -> dict:
    """A DeiT-3 checkpoint: LayerScale as ``blocks.N.gamma_1``/``gamma_2``, under ``model``."""
    return {"model": {key.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2"): value
                      for key, value in state.items()}}


FORMATS = {
    "dinov2-hub-reg4": ("vit_small_patch14_reg4_dinov2", dict(img_size=42, **TINY), to_dinov2_hub,
                        ["register_tokens", "mask_token", "blocks.0.ls1.gamma"]),
    "dinov2-hub": ("vit_small_patch14_dinov2", dict(img_size=42, **TINY), to_dinov2_hub,
                   ["mask_token", "blocks.0.ls1.gamma"]),
    "openclip-visual": ("vit_base_patch16_clip_224.openai", dict(img_size=32, num_classes=16, **TINY), to_openclip,
                        ["visual.class_embedding", "visual.transformer.resblocks.0.attn.in_proj_weight", "visual.proj"]),
    "deit": ("deit_tiny_distilled_patch16_224", dict(img_size=32, num_classes=10, **TINY), to_deit, ["model"]),
    "deit3": ("deit3_small_patch16_224", dict(img_size=32, num_classes=10, **TINY), to_deit3, ["model"]),
}


def _write_original(kind: str, path, seed: int = 3) -> torch.nn.Module:
    """A random timm model of ``kind``, saved in its original format at ``path``; returns the model."""
    name, kwargs, convert, _ = FORMATS[kind]
    source = dynamo.load_model(name, pretrained=False, seed=seed, **kwargs).module
    if kind == "openclip-visual":
        torch.nn.init.zeros_(source.head.bias)
    state = {key: value.clone() for key, value in source.state_dict().items()}
    torch.save(convert(state), path)
    return source


@pytest.mark.parametrize("kind", list(FORMATS))
def test_original_format_checkpoints_load_through_timms_filters(kind, tmp_path, one_thread):
    name, kwargs, _, original_keys = FORMATS[kind]
    path = tmp_path / f"{kind}.pth"
    source = _write_original(kind, path)
    on_disk = torch.load(path, weights_only=True)  # tensors only: loadable without unpickling objects
    assert set(original_keys) <= set(on_disk) | set(on_disk.get("model", {}))

    loaded = dynamo.load_model(name, checkpoint=path, **kwargs)
    # timm's own path; the overlay states the file's head size, or timm would drop the head for a random one
    overlay = dict(file=str(path), **{key: kwargs[key] for key in ("num_classes",) if key in kwargs})
    reference = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs).eval()
    assert loaded.pretrained and loaded.seed is None
    # the weights the file was written from (DINOv2's cls position is folded into cls_token: float rounding)
    torch.testing.assert_close(loaded.module.state_dict(), source.state_dict(), rtol=1e-6, atol=1e-6)
    pixels = torch.randn(2, 3, kwargs["img_size"], kwargs["img_size"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # and timm's own loading path, exactly
        assert loaded.weights_sha256 == dynamo.models.weights_sha256(reference)
        torch.testing.assert_close(loaded.module.forward_features(pixels), reference.forward_features(pixels), rtol=0, atol=0)
        torch.testing.assert_close(loaded.module(pixels), source.eval()(pixels), rtol=1e-4, atol=1e-4)


def test_a_518_px_checkpoint_loads_at_224_with_timms_resampled_position_embeddings(tmp_path, one_thread):
    """The paper's setting: DINOv2-B/14 trained at 518 px, studied at 224 px (a 2-block random stand-in)."""
    path = tmp_path / "dinov2_vitb14_reg4_pretrain.pth"
    source = dynamo.load_model(DINO_B, pretrained=False, depth=2, seed=5).module
    assert tuple(source.patch_embed.grid_size) == (37, 37)
    torch.save(to_dinov2_hub(source.state_dict()), path)

    loaded = dynamo.load_model(DINO_B, checkpoint=path, img_size=224, depth=2)
    reference = timm.create_model(DINO_B, img_size=224, depth=2, pretrained=True,
                                  pretrained_cfg_overlay=dict(file=str(path))).eval()
    assert loaded.layout.num_tokens == 261 and loaded.module.pos_embed.shape == (1, 256, 768)
    expected = resample_abs_pos_embed(source.pos_embed.detach(), new_size=(16, 16), old_size=(37, 37), num_prefix_tokens=0)
    torch.testing.assert_close(loaded.module.pos_embed.detach(), expected)
    assert loaded.weights_sha256 == dynamo.models.weights_sha256(reference)
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded.module.forward_features(pixels), reference.forward_features(pixels), rtol=0, atol=0)
    assert loaded.data_config["input_size"] == (3, 224, 224)


# ---- the input size and preprocessing from the command line -------------------------------------


def test_record_dinov2_b_at_224_stores_261_tokens_by_768(tmp_path, digits_folder, one_thread):
    out = tmp_path / "dinov2b.zarr"
    assert main(["record", DINO_B, "--no-pretrained", "--img-size", "224", "--images", str(digits_folder),
                 "--limit", "2", "--layers", "0,1", "--batch-size", "2", "--out", str(out), "--quiet"]) == 0
    dataset = dynamo.open_trajectories(out)
    assert dataset["hidden"].shape == (2, 2, 261, 768)
    assert {kind: int((dataset["token_kind"] == kind).sum()) for kind in ("cls", "register", "patch")} == \
        {"cls": 1, "register": 4, "patch": 256}
    assert dataset.attrs["image_size"] == [224, 224] and dataset.attrs["identity"]["image_size"] == [224, 224]
    assert dataset.attrs["preprocessing"]["input_size"] == [3, 224, 224]
    assert dataset.attrs["init_seed"] == 0 and dataset.attrs["pretrained"] is False


def test_paper_preset_is_resize_256_bicubic_center_crop_224_imagenet(tmp_path):
    photo = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 420, 3), dtype=np.uint8)).save(photo)
    out = tmp_path / "paper.zarr"
    loaded = dynamo.load_model("vit_tiny_patch16_224", pretrained=False, preprocess="paper", depth=2)
    dataset = dynamo.record(loaded, [photo], out, layers=[0, 1], progress=False)
    attrs = dataset.attrs
    assert attrs["preprocess_overrides"] == {"resize": 256, "crop": [224, 224], "interpolation": "bicubic",
                                             "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert attrs["preprocessing"]["crop_pct"] == 224 / 256 and attrs["identity"]["preprocessing"]["interpolation"] == "bicubic"

    # an independent pipeline (torchvision) gives the same model input, hence the same layer-1 states
    paper = transforms.Compose([
        transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(224),
        transforms.ToTensor(), transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])
    pixels = paper(Image.open(photo).convert("RGB"))[None]
    with torch.no_grad():
        (first_block,) = loaded.module.forward_intermediates(pixels, indices=[0], norm=False, intermediates_only=True,
                                                             output_fmt="NLC")
    np.testing.assert_allclose(dataset["hidden"].sel(layer=1).values[0, 1:], first_block[0].numpy(), rtol=1e-5, atol=1e-5)

    bilinear = dynamo.load_model("vit_tiny_patch16_224", pretrained=False, depth=2,
                                 preprocess={**preprocess_overrides("paper"), "interpolation": "bilinear"})
    with pytest.raises(dynamo.StoreMismatchError, match="preprocessing"):  # other preprocessing: refused on resume
        dynamo.record(bilinear, [photo], out, layers=[0, 1], progress=False)


def test_resize_is_exact_for_every_crop_and_resize():
    """timm resizes to floor(crop / crop_pct): the crop_pct chosen must land on the resize asked for."""
    pairs = [(crop, resize) for crop in range(8, 1100, 7) for resize in range(crop, 3 * crop, 5)]
    assert all(int(crop / crop_pct(crop, resize)) == resize for crop, resize in pairs)
    config = {"input_size": (3, 518, 518), "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3,
              "crop_pct": crop_pct(518, 591), "crop_mode": "center"}
    assert timm.data.create_transform(**config).transforms[0].size == 591


def test_preprocess_text_is_parsed_on_top_of_a_preset():
    assert preprocess_overrides("paper", "interpolation=bilinear,mean=clip,std=0.5,0.5,0.5") == {
        "resize": 256, "crop": [224, 224], "interpolation": "bilinear",
        "mean": list(timm.data.OPENAI_CLIP_MEAN), "std": [0.5, 0.5, 0.5]}
    assert preprocess_overrides(None, "crop=224,196") == {"crop": [224, 196]}


@pytest.mark.parametrize(("flags", "message"), [
    (["--img-size", "224,200"], "image size 224x200 is not a multiple of vit_tiny_patch16_224's patch size 16x16"),
    (["--img-size", "0"], "--img-size must be N or H,W"),
    (["--img-size", "2x3"], "--img-size must be N or H,W"),
    (["--preset", "papr"], "unknown preprocessing preset 'papr'; presets: paper"),
    (["--preprocess", "rezise=256"], "unknown preprocessing key 'rezise'"),
    (["--preprocess", "mean=0.5,0.5"], "preprocessing mean=0.5,0.5 is not three numbers"),
    (["--preprocess", "interpolation=cubic"], "interpolation=cubic is not one of bilinear"),
    (["--preprocess", "resize=200,crop=224"], "resize=200 is smaller than crop=224"),
    (["--img-size", "224", "--preset", "paper", "--preprocess", "crop=192"], "--img-size 224,224 differs from the preprocessing crop 192,192"),
])
def test_bad_size_and_preprocessing_are_one_line_errors(flags, message, tmp_path, digits_folder, capsys):
    out = tmp_path / "s.zarr"
    code = main(["record", "vit_tiny_patch16_224", "--no-pretrained", "--images", str(digits_folder),
                 "--out", str(out), "--limit", "2", "--quiet", *flags])
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1 and error.startswith("dynamo record: error: ") and message in error
    assert not out.exists()


def test_zoo_models_keep_their_size_but_take_preprocessing(tmp_path, capsys):
    assert main(["record", zoo.DEFAULT_MODEL, "--img-size", "64", "--out", str(tmp_path / "a.zarr"), "--quiet"]) == 2
    assert "zoo model trained on 32x32 images" in capsys.readouterr().err
    loaded = dynamo.load_model(zoo.DEFAULT_MODEL, img_size=32, preprocess={"interpolation": "bicubic"})
    assert loaded.data_config["interpolation"] == "bicubic" and loaded.preprocess == {"interpolation": "bicubic"}


def test_profile_of_a_store_refuses_image_options(tmp_path, digits_folder, capsys):
    store = tmp_path / "s.zarr"
    assert main(["record", "vit_tiny_patch16_224", "--no-pretrained", "--img-size", "32", "--images", str(digits_folder),
                 "--limit", "2", "--out", str(store), "--quiet"]) == 0
    assert main(["profile", str(store), "--img-size", "64", "--out", str(tmp_path / "p")]) == 2
    assert "is a recorded store" in capsys.readouterr().err


# ---- seeded random weights (issue 21) -------------------------------------------------------


def test_random_weight_recordings_are_identical_and_an_interrupted_one_resumes(tmp_path, digits_folder, monkeypatch, capsys,
                                                                               one_thread):
    def command(out, size="32"):
        return ["record", "vit_tiny_patch16_224", "--no-pretrained", "--seed", "0", "--img-size", size,
                "--images", str(digits_folder), "--limit", "8", "--batch-size", "4", "--out", str(out), "--quiet"]

    first, second, interrupted = (tmp_path / f"{name}.zarr" for name in ("first", "second", "interrupted"))
    assert main(command(first)) == 0 and main(command(second)) == 0
    a, b = dynamo.open_trajectories(first), dynamo.open_trajectories(second)
    assert a.attrs["weights_sha256"] == b.attrs["weights_sha256"] and a.attrs["init_seed"] == 0
    np.testing.assert_array_equal(a["hidden"].values, b["hidden"].values)
    assert a.attrs["identity"] == b.attrs["identity"]
    # the weights can be rebuilt from the store alone (random ones from their seed), e.g. by `dynamo analyze`
    assert load_recorded_model(a.attrs).weights_sha256 == a.attrs["weights_sha256"]

    real_run, calls = Capture.run, {"n": 0}

    def interrupt_at_the_second_batch(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(Capture, "run", interrupt_at_the_second_batch)
    assert main(command(interrupted)) == 130
    monkeypatch.setattr(Capture, "run", real_run)
    with pytest.warns(UserWarning, match="incomplete"):
        assert dynamo.open_trajectories(interrupted).sizes["image"] == 4
    assert main(command(interrupted)) == 0  # the same command rebuilds the same weights, so it resumes
    resumed = dynamo.open_trajectories(interrupted)
    assert resumed.attrs["complete"] and resumed.attrs["weights_sha256"] == a.attrs["weights_sha256"]
    np.testing.assert_array_equal(resumed["hidden"].values, a["hidden"].values)

    capsys.readouterr()
    assert main(command(interrupted, size="48")) == 2  # resuming at another size is refused, in one line
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "image_size: store has [32, 32], this run has [48, 48]" in error


def test_fit_rebuilds_the_teacher_at_the_recorded_size_from_the_store_alone(tmp_path, digits_folder, one_thread):
    """`dynamo fit` on a store recorded with --img-size (random weights, seeded): the teacher is rebuilt
    at the recorded input size, and a saved fit reloads without being handed its teacher."""
    store = tmp_path / "s.zarr"
    assert main(["record", "vit_tiny_patch16_224", "--no-pretrained", "--seed", "3", "--img-size", "32", "--images",
                 str(digits_folder), "--limit", "8", "--out", str(store), "--quiet"]) == 0
    assert main(["fit", str(store), "--k", "1", "--steps", "2", "--stage2-steps", "0", "--batch-size", "2",
                 "--out", str(tmp_path / "fit")]) == 0
    folder = next(path.parent for path in (tmp_path / "fit").rglob("config.json"))
    loaded = dynamo.RaptorFitter.load(folder)  # no teacher given: rebuilt from the recorded identity
    assert loaded.teacher_identity_["image_size"] == [32, 32] and loaded.teacher_identity_["init_seed"] == 3
    assert loaded.predict(torch.randn(2, 3, 32, 32)).shape == (2,)
    # a closed-form rung too: fitted, saved and reloaded from the store's record alone
    assert main(["fit", str(store), "--surrogate", "teacher-block", "--k", "1", "--out", str(tmp_path / "tb"), "--quiet"]) == 0
    folder = next(path.parent for path in (tmp_path / "tb").rglob("config.json"))
    rung = SurrogateFitter.load(folder)
    assert rung.teacher_identity_["image_size"] == [32, 32] and rung.model_.embed(torch.randn(2, 3, 32, 32)).ndim == 3
