"""Model loading: local checkpoints (safely), token layouts, non-ViTs, and the offline hub."""

from __future__ import annotations

import time

import pytest
import timm
import torch
from safetensors.torch import save_file

import dynamo
from dynamo.models import _hub_reachable
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
    fresh = dynamo.load_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=10, img_size=42)
    assert fresh.weights_sha256 != source.weights_sha256


def test_pickled_checkpoint_is_never_unpickled(tmp_path):
    torch.save(tiny_model("cls").module, tmp_path / "whole_module.pt")  # a pickled nn.Module
    with pytest.raises(dynamo.ModelLoadError, match="weights_only=True"):
        dynamo.load_model("vit_tiny_patch16_224", checkpoint=tmp_path / "whole_module.pt", img_size=48)


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    save_file(tiny_model("cls").module.state_dict(), tmp_path / "tiny.safetensors")
    with pytest.raises(dynamo.ModelLoadError, match="does not fit VisionTransformer"):
        dynamo.load_model("vit_small_patch14_reg4_dinov2", checkpoint=tmp_path / "tiny.safetensors", img_size=42)
    with pytest.raises(dynamo.ModelLoadError, match="does not exist"):
        dynamo.load_model("vit_tiny_patch16_224", checkpoint=tmp_path / "nope.safetensors")


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


@pytest.mark.skipif(_hub_reachable(), reason="the hub is reachable from here")
def test_offline_hub_fails_fast_and_says_what_to_do():
    started = time.perf_counter()
    with pytest.raises(dynamo.ModelLoadError, match="--checkpoint.*dynamo-zoo/"):
        dynamo.load_model("vit_tiny_patch16_224", pretrained=True)
    assert time.perf_counter() - started < 15
