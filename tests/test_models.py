"""Model loading: local checkpoints (safely), token layouts, non-ViTs, and the offline hub."""

from __future__ import annotations

import re
import time

import pytest
import timm
import torch
from safetensors.torch import save_file

import dynamo
import dynamo.models
from tests.conftest import tiny_model


def test_checkpoint_round_trip_safetensors_and_torch(tmp_path):
    source = tiny_model("cls+4reg")
    state = source.module.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
    torch.save({"model": state, "epoch": 3}, tmp_path / "w.pth")  # nested, as training scripts save
    for file in ("w.safetensors", "w.pth"):
        loaded = dynamo.load_model(
            "vit_small_patch14_reg4_dinov2", checkpoint=tmp_path / file, num_classes=10, img_size=42
        )
        assert loaded.weights_sha256 == source.weights_sha256
        assert loaded.pretrained and loaded.checkpoint.endswith(file)
    fresh = dynamo.load_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=10, img_size=42, seed=1)
    assert fresh.weights_sha256 != source.weights_sha256


def test_random_weights_are_seeded_and_leave_the_global_rng_alone():
    state = torch.get_rng_state()
    first, second = (dynamo.load_model("vit_tiny_patch16_224", pretrained=False, img_size=32) for _ in range(2))
    other = dynamo.load_model("vit_tiny_patch16_224", pretrained=False, img_size=32, seed=1)
    assert first.weights_sha256 == second.weights_sha256 != other.weights_sha256
    assert (first.seed, other.seed) == (0, 1)
    assert torch.equal(torch.get_rng_state(), state)


def test_pickled_checkpoint_is_never_unpickled(tmp_path):
    torch.save(tiny_model("cls").module, tmp_path / "whole_module.pt")  # a pickled nn.Module
    with pytest.raises(dynamo.ModelLoadError, match="weights_only=True"):
        dynamo.load_model("vit_tiny_patch16_224", checkpoint=tmp_path / "whole_module.pt", img_size=48)


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    save_file(tiny_model("cls").module.state_dict(), tmp_path / "tiny.safetensors")
    with pytest.raises(dynamo.ModelLoadError, match="does not fit vit_small_patch14_reg4_dinov2"):
        dynamo.load_model("vit_small_patch14_reg4_dinov2", checkpoint=tmp_path / "tiny.safetensors", img_size=42)
    with pytest.raises(dynamo.ModelLoadError, match="does not exist"):
        dynamo.load_model("vit_tiny_patch16_224", checkpoint=tmp_path / "nope.safetensors")
    with pytest.raises(dynamo.ModelLoadError, match="is a folder"):
        dynamo.load_model("vit_tiny_patch16_224", checkpoint=tmp_path)


def test_a_mismatching_checkpoint_is_summarised_in_one_line(tmp_path):
    save_file(tiny_model("cls").module.state_dict(), tmp_path / "tiny.safetensors")
    with pytest.raises(dynamo.ModelLoadError) as error:
        dynamo.load_model("vit_tiny_patch16_224", checkpoint=tmp_path / "tiny.safetensors", img_size=48, depth=2, num_classes=10)
    message = str(error.value)
    assert "\n" not in message and len(message) < 400
    assert re.search(r"the checkpoint has blocks\.\d+\..*; and 119 other mismatching keys", message)
    with pytest.raises(dynamo.ModelLoadError, match=r"head.weight has shape \[10, 192\] in the checkpoint and \[7, 192\]"):
        dynamo.load_model("vit_tiny_patch16_224", checkpoint=tmp_path / "tiny.safetensors", img_size=48, num_classes=7)


def test_not_a_vit_is_refused_clearly():
    with pytest.raises(dynamo.NotAViTError, match="ResNet is not a ViT-family transformer"):
        dynamo.load_model("resnet18", pretrained=False)
    with pytest.raises(dynamo.NotAViTError, match="not a ViT-family"):
        dynamo.token_layout(torch.nn.Linear(3, 3))


def test_unknown_name_suggests_alternatives():
    with pytest.raises(dynamo.ModelLoadError, match="unknown model 'vit_tinyy'.*vit_tiny_patch16_224"):
        dynamo.load_model("vit_tinyy", pretrained=False)


def test_layout_is_read_from_the_model_not_a_table():
    # a custom VisionTransformer with 2 registers and no class token still gets a layout
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=24, patch_size=8, embed_dim=32, depth=2, num_heads=2, class_token=False,
        reg_tokens=2, global_pool="avg",
    )
    layout = dynamo.token_layout(model)
    assert (layout.has_cls, layout.num_registers, layout.grid) == (False, 2, (3, 3))
    assert list(layout.token_kind()[:3]) == ["register", "register", "patch"]


def test_offline_hub_fails_fast_and_says_what_to_do(monkeypatch, tmp_path):
    """With the hub unreachable (simulated, so the test runs online too) and an empty cache, the load fails fast."""
    from huggingface_hub import constants

    monkeypatch.setattr(dynamo.models, "_hub_reachable", lambda *args, **kwargs: False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    started = time.perf_counter()
    with pytest.raises(dynamo.ModelLoadError, match="--checkpoint.*dynamo-zoo/"):
        dynamo.load_model("vit_tiny_patch16_224", pretrained=True)
    assert time.perf_counter() - started < 15


@pytest.mark.parametrize(("model", "preset", "text", "img_size", "resize", "crop", "mode", "mean", "std"), [
    ("vit_tiny_patch16_224", "paper", None, None, 256, 224, "BICUBIC", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ("vit_tiny_patch16_224", None, "resize=64,crop=48,interpolation=bilinear,mean=0.5,0.4,0.3,std=0.2,0.25,0.3", None,
     64, 48, "BILINEAR", (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)),
    ("vit_tiny_patch16_224", "paper", "resize=59,crop=48,interpolation=lanczos,mean=clip,std=inception", None,
     59, 48, "LANCZOS", (0.48145466, 0.4578275, 0.40821073), (0.5, 0.5, 0.5)),
    ("vit_tiny_patch16_224", None, None, "48", 53, 48, "BICUBIC", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # its crop_pct 0.9
    (dynamo.zoo.DEFAULT_MODEL, None, "resize=40,interpolation=bilinear", None, 40, 32, "BILINEAR", None, None),
])
def test_preprocessing_is_the_transform_torchvision_builds(model, preset, text, img_size, resize, crop, mode, mean, std):
    """timm's transform from dynamo's data config equals an independent Resize, CenterCrop, Normalize, bit for bit."""
    import numpy as np
    from PIL import Image
    from torchvision import transforms

    options = {"pretrained": False, "depth": 1} if model.startswith("vit_") else {}
    preprocess = dynamo.models.preprocess_overrides(preset, text) if preset or text else None
    loaded = dynamo.load_model(model, img_size=dynamo.models.parse_img_size(img_size), preprocess=preprocess, **options)
    if mean is None:  # the zoo model's own statistics
        mean, std = loaded.module.pretrained_cfg["mean"], loaded.module.pretrained_cfg["std"]
    expected = transforms.Compose([
        transforms.Resize(resize, interpolation=getattr(transforms.InterpolationMode, mode)), transforms.CenterCrop(crop),
        transforms.ToTensor(), transforms.Normalize(mean, std),
    ])
    photos = [Image.open(path).convert("RGB") for path in sorted(dynamo.zoo.natural_images().glob("*.png"))[:3]]
    photos += [photos[0].crop((0, 0, 40, 64)), photos[1].crop((0, 5, 64, 50)),
               Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 420, 3), dtype=np.uint8))]
    built = timm.data.create_transform(**loaded.data_config)  # as dynamo.record builds it
    for photo in photos:
        assert torch.equal(built(photo), expected(photo))
