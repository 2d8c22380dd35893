"""The surrogate package's shared pieces: the Raptor block on timm's Attention, the one save format (and
the old Raptor layout), the splits of a fit, and the serialization helpers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import dynamo
from dynamo.pipeline import fit as pipeline_fit
from dynamo.serialize import derived_seed, digest, optimizer_state, tensors_of_optimizer
from dynamo.surrogates import (
    IdentityFitter,
    RaptorFitter,
    SurrogateFitter,
    split_images,
)
from dynamo.surrogates.raptor.block import RaptorBlock, copy_teacher_block
from tests.conftest import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def store(digits_folder, tmp_path_factory):
    teacher = tiny_model("cls", img_size=32, embed_dim=32, num_heads=2, depth=3)
    path = tmp_path_factory.mktemp("surrogates") / "s.zarr"
    dynamo.record(teacher, dynamo.image_set(digits_folder), path, batch_size=16, progress=False)
    return teacher, path


def test_copying_a_teacher_block_is_a_state_dict_load_and_keeps_its_outputs():
    """A Raptor block loaded from a timm block (no depth scaling) is that block, and its timm Attention
    computes what the former torch MultiheadAttention did on the same weights."""
    teacher = tiny_model("cls", img_size=32, embed_dim=32, num_heads=2, depth=1).module.blocks[0]
    block = copy_teacher_block(RaptorBlock(32, 2, mlp="gelu", depth_scaling=False), teacher)
    x = torch.randn(3, 5, 32)
    torch.testing.assert_close(block(x, 1), teacher(x), atol=1e-5, rtol=1e-5)
    former = nn.MultiheadAttention(32, 2, batch_first=True)
    former.load_state_dict({"in_proj_weight": teacher.attn.qkv.weight, "in_proj_bias": teacher.attn.qkv.bias,
                            "out_proj.weight": teacher.attn.proj.weight, "out_proj.bias": teacher.attn.proj.bias})
    h = block.norm1(x)
    torch.testing.assert_close(block.attn(h), former(h, h, h, need_weights=False)[0], atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="mlp='gelu'"):
        copy_teacher_block(RaptorBlock(32, 2, mlp="swiglu"), teacher)


def _old_layout(folder):
    """Rewrite a saved Raptor fit as dynamo wrote it before the one format: ``dynamo-raptor/1`` and the
    block's former parameter names (torch MultiheadAttention, hand-written MLP and LayerScale)."""
    config = json.loads((folder / "config.json").read_text())
    old = {"format": "dynamo-raptor/1", **{k: config[k] for k in ("params", "partition", "num_layers", "teacher", "store",
                                                                   "images_sha256", "validation_images", "training_images")},
           "block_config": config["state"]["block_config"], "history": config["state"]["history"]}
    renames = {"attn.qkv.weight": "attn.in_proj_weight", "attn.qkv.bias": "attn.in_proj_bias", "attn.proj.": "attn.out_proj.",
               "mlp.fc1.": "fc1.", "mlp.fc2.": "fc2.", "ls1.gamma": "gamma1", "ls2.gamma": "gamma2"}
    tensors = {}
    for key, value in load_file(str(folder / "weights.safetensors")).items():
        for new, former in renames.items():
            key = key.replace(new, former)
        tensors[key] = value
    assert "blocks.0.attn.in_proj_weight" in tensors and "blocks.0.gamma1" in tensors
    save_file(tensors, str(folder / "weights.safetensors"))
    (folder / "config.json").write_text(json.dumps(old))


def test_one_load_reads_every_surrogate_and_old_raptor_fits(store, tmp_path):
    teacher, path = store
    raptor = RaptorFitter(k=1, steps=3, stage2_steps=0, validate_every=1, progress=False).fit(path, teacher=teacher)
    identity = IdentityFitter(k=2).fit(path, teacher=teacher)
    states = dynamo.open_trajectories(path)["hidden"].isel(image=slice(0, 4), layer=0).values
    for fitter in (raptor, identity):
        loaded = SurrogateFitter.load(fitter.save(tmp_path / fitter.name), teacher=teacher)
        assert type(loaded) is type(fitter) and loaded.partition_ == fitter.partition_
        torch.testing.assert_close(loaded.transform(states), fitter.transform(states), rtol=0, atol=0)
    np.testing.assert_array_equal(SurrogateFitter.load(tmp_path / "raptor", teacher=teacher).stopping_images_,
                                  raptor.stopping_images_)
    with pytest.raises(ValueError, match="identity surrogate, not a RaptorFitter"):
        RaptorFitter.load(tmp_path / "identity", teacher=teacher)
    _old_layout(tmp_path / "raptor")
    old = RaptorFitter.load(tmp_path / "raptor", teacher=teacher)
    assert old.history_ == raptor.history_ and old.stopping_images_.size == 0
    torch.testing.assert_close(old.transform(states), raptor.transform(states), rtol=0, atol=0)
    assert old.score(path) == raptor.score(path)


def test_early_stopping_images_are_disjoint_from_the_scored_and_trained_ones(store):
    teacher, path = store
    fitter = RaptorFitter(k=1, steps=2, stage2_steps=0, validate_every=1, validation_images=5, progress=False)
    fitter.fit(path, teacher=teacher)
    images = dynamo.open_trajectories(path)["image"].values
    trained, stopping, scored = fitter.training_images_, fitter.stopping_images_, fitter.validation_images_
    assert stopping.size == 5 and scored.size == round(0.2 * images.size)
    assert not set(stopping) & set(scored) and not set(stopping) & set(trained) and not set(trained) & set(scored)
    assert sorted({*trained, *stopping, *scored}) == sorted(images)
    np.testing.assert_array_equal(scored, split_images(images, 0.2, 0)[1])  # every rung is scored on the same images
    assert all(entry["val_r2"] is not None for entry in fitter.history_)


def test_a_fits_phases_are_found_on_its_training_images(store, tmp_path, monkeypatch):
    """`dynamo fit` finds the default phases on the fit's training images, never on the held-out ones."""
    teacher, path = store
    seen = []
    monkeypatch.setattr(pipeline_fit, "layer_similarity",
                        lambda ds, progress: seen.append(ds["image"].values) or np.abs(np.subtract.outer(np.arange(4.0), np.arange(4.0))))

    class Stop(Exception):
        pass

    def fit(self, ds, teacher=None, head=None):
        raise Stop

    monkeypatch.setattr(RaptorFitter, "fit", fit)
    with pytest.raises(Stop):
        pipeline_fit.fit(path, tmp_path / "fit", k=2, seed=1, teacher=teacher, progress=False)
    images = dynamo.open_trajectories(path)["image"].values
    training, held_out = split_images(images, 0.2, 1)
    np.testing.assert_array_equal(seen[0], training)
    assert not set(seen[0]) & set(held_out)


def test_serialization_helpers_round_trip():
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    tensors, groups = tensors_of_optimizer(optimizer)
    restored = torch.optim.AdamW(nn.Linear(3, 2).parameters())
    restored.load_state_dict(optimizer_state({**tensors, "model.weight": model.weight}, json.loads(json.dumps(groups))))
    for param, entries in optimizer.state_dict()["state"].items():
        for name, value in entries.items():
            torch.testing.assert_close(torch.as_tensor(restored.state_dict()["state"][param][name]), torch.as_tensor(value))
    assert derived_seed(0, "init", 0, 4) == derived_seed(0, "init", 0, 4) != derived_seed(1, "init", 0, 4)
    assert digest({"b": 1, "a": (1, 2)}) == digest({"a": [1, 2], "b": 1}) and len(digest({}, 20)) == 20
