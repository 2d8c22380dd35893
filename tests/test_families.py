"""The timm ViT families through `dynamo profile` end to end (random weights, shrunk: mechanics only).

Each family is built small with ``--timm`` and profiled on a few real digits; its summary is checked
(token view, phases, layers) and its store against timm's own ``forward_intermediates`` of the model
rebuilt from the store, at every block. A few representative families run by default; the rest are
``slow``.
"""

from __future__ import annotations

import json

import pytest
import timm.data
import torch
from PIL import Image

import dynamo
from dynamo.layout import CLS_LESS_TOKENS, PAPER_TOKENS
from dynamo.models import load_recorded_model
from dynamo.pipeline.cli import main

SHRINK = "depth=2,embed_dim=64,num_heads=2"
DEPTH = 2

# family -> (timm name, input size in pixels (a few patches), the default token view)
FAMILIES = {
    "dinov2": ("vit_small_patch14_dinov2", 28, PAPER_TOKENS),
    "dinov2-registers": ("vit_small_patch14_reg4_dinov2", 28, PAPER_TOKENS),
    "dinov3": ("vit_small_patch16_dinov3", 32, PAPER_TOKENS),
    "siglip": ("vit_base_patch16_siglip_224", 32, CLS_LESS_TOKENS),
    "clip": ("vit_base_patch16_clip_224", 32, PAPER_TOKENS),
    "eva02": ("eva02_tiny_patch14_224", 28, PAPER_TOKENS),
    "deit3": ("deit3_small_patch16_224", 32, PAPER_TOKENS),
    "deit-distilled": ("deit_tiny_distilled_patch16_224", 32, PAPER_TOKENS),
    "beit": ("beit_base_patch16_224", 32, PAPER_TOKENS),
    "rope": ("vit_base_patch16_rope_reg1_gap_256", 32, CLS_LESS_TOKENS),
    "gap": ("vit_medium_patch16_gap_256", 32, CLS_LESS_TOKENS),
    "pe-core": ("vit_pe_core_tiny_patch16_384", 32, PAPER_TOKENS),
    "aimv2": ("aimv2_large_patch14_224", 28, CLS_LESS_TOKENS),
    "flexivit": ("flexivit_small", 32, PAPER_TOKENS),
    "map": ("vit_so150m_patch16_reg4_map_256", 32, CLS_LESS_TOKENS),
}
# registers with a cls token; rotary embeddings (EVA); registers without a cls token, pooled by attention (map)
FAST = ("dinov2-registers", "eva02", "map")


def _family_params():
    return [pytest.param(family, marks=() if family in FAST else pytest.mark.slow) for family in FAMILIES]


def _timm_reference(store) -> list[torch.Tensor]:
    """Block outputs (B, T, D) of the model rebuilt from the store, by timm's forward_intermediates on its images."""
    rebuilt = load_recorded_model(store.attrs)
    assert rebuilt.weights_sha256 == store.attrs["weights_sha256"]
    model = rebuilt.module
    config = timm.data.resolve_data_config({"input_size": (3, *store.attrs["image_size"])}, model=model)
    transform = timm.data.create_transform(**config)
    pixels = torch.stack([transform(Image.open(str(path)).convert("RGB")) for path in store["image_id"].values])
    prefix = model.num_prefix_tokens > 0
    with torch.no_grad():
        blocks = model.forward_intermediates(pixels, norm=False, intermediates_only=True, output_fmt="NLC",
                                             return_prefix_tokens=prefix)
    return [torch.cat([block[1], block[0]], dim=1) if prefix else block for block in blocks]


@pytest.mark.parametrize("family", _family_params())
def test_a_family_profiles_end_to_end_and_records_what_timm_computes(family, tmp_path, digits_folder, capsys):
    name, size, view = FAMILIES[family]
    out = tmp_path / family
    argv = ["profile", name, "--timm", SHRINK, "--no-pretrained", "--img-size", str(size), "--images", str(digits_folder),
            "--limit", "8", "--bootstrap", "2", "--only", "tokens", "--out", str(out), "--quiet", "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tokens"] == view and summary["phases"]["tokens"] == view
    assert summary["token_view"].startswith(view + " (") and ("no cls token" in summary["token_view"]) == (view == CLS_LESS_TOKENS)
    assert summary["layers"] == DEPTH + 1 and summary["n_images"] == 8
    assert sorted(block for phase in summary["partition"] for block in phase) == list(range(1, DEPTH + 1))
    assert set(summary["dynamics"]) == {"tokens"} and (out / "report.html").stat().st_size > 0
    store = dynamo.open_trajectories(out / "trajectories.zarr")
    assert store.attrs["has_cls"] == (view == PAPER_TOKENS) and store.sizes["layer"] == DEPTH + 1
    hidden = torch.from_numpy(store["hidden"].values)
    reference = _timm_reference(store)
    assert len(reference) == DEPTH
    for layer, block_output in enumerate(reference, start=1):
        torch.testing.assert_close(hidden[:, layer], block_output, rtol=1e-5, atol=1e-5)


def test_an_attention_pooled_model_reads_the_patch_mean_and_says_why(tmp_path, digits_folder, capsys):
    """map pooling's readout is computed from the last layer only, so no per-layer token stands for it."""
    name, size, _ = FAMILIES["map"]
    out = tmp_path / "map"
    argv = ["profile", name, "--timm", SHRINK, "--no-pretrained", "--img-size", str(size), "--images", str(digits_folder),
            "--limit", "8", "--bootstrap", "2", "--only", "tokens", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    store = dynamo.open_trajectories(out / "trajectories.zarr")
    assert store.attrs["global_pool"] == "map" and not store.attrs["has_cls"]
    reason = "pools by attention (map), whose pooled token is computed from the last layer only and is not a token"
    assert f"token view patch_mean (the model has no cls token; it {reason}" in text
    assert reason in (out / "report.html").read_text()
    # asked for, a view is said to be chosen
    assert main([*argv, "--tokens", "patch"]) == 0
    assert "token view patch (chosen with --tokens)" in capsys.readouterr().out


def test_naflexvit_is_refused_in_one_line(tmp_path, digits_folder, capsys):
    code = main(["profile", "naflexvit_base_patch16_gap", "--timm", SHRINK, "--no-pretrained", "--images", str(digits_folder),
                 "--limit", "2", "--out", str(tmp_path / "n"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "NaFlexVit is not a ViT-family transformer" in err
    assert not (tmp_path / "n" / "trajectories.zarr").exists()
