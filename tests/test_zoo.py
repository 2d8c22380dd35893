"""The model zoo: shipped weights reproduce their cards, names resolve, training is deterministic."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil

import numpy as np
import pytest
import timm.data
import torch
from PIL import Image
from safetensors import safe_open
from timm.models.vision_transformer import VisionTransformer

from dynamo import zoo
from dynamo.zoo import data, train

SHIPPED = ["vit-digits-p0.0", "vit-digits-p0.1", "vit-digits-p0.2", "vit-digits-p0.3", "vit-digits-p0.5", "vit-digits-reg4"]
TINY = {"epochs": 1, "train_limit": 96, "depth": 2, "embed_dim": 32, "num_heads": 2, "batch_size": 32}


def test_every_promised_model_is_shipped():
    assert zoo.list_models() == sorted(zoo.ZOO_PREFIX + stem for stem in SHIPPED)
    assert zoo.DEFAULT_MODEL in zoo.list_models()
    card = zoo.model_card(zoo.DEFAULT_MODEL)
    assert card["registers"] == 4 and card["drop_path_rate"] == 0.1
    for stem in SHIPPED[:5]:
        card = zoo.model_card(stem)
        assert card["registers"] == 0 and card["drop_path_rate"] == float(stem.removeprefix("vit-digits-p"))


@pytest.mark.parametrize("name", zoo.list_models())
def test_card_accuracy_is_reproduced_from_the_shipped_files(name):
    card = zoo.model_card(name)
    model = zoo.load_zoo_model(name)
    assert type(model) is VisionTransformer and not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.num_reg_tokens == card["registers"] and len(model.blocks) == 12

    config = timm.data.resolve_data_config({}, model=model)
    assert tuple(config["input_size"]) == (3, 32, 32) and config["crop_pct"] == 1.0
    assert tuple(config["mean"]) == tuple(card["pretrained_cfg"]["mean"])

    pixels, labels = data.load_folder(zoo.default_images(), timm.data.create_transform(**config))
    accuracy = train.evaluate(model, pixels, labels)
    assert len(labels) == card["data"]["split"]["n_test"]
    assert abs(accuracy - card["test_accuracy"]) <= 0.5, (accuracy, card["test_accuracy"])
    assert accuracy >= card["chance_accuracy"] + 50


@pytest.mark.parametrize("name", zoo.list_models())
def test_card_sha256_matches_the_float16_safetensors(name):
    card, path = zoo.model_card(name), zoo.weights_path(name)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == card["weights"]["sha256"]
    assert path.stat().st_size == card["weights"]["bytes"]
    with safe_open(str(path), "pt") as weights:
        assert {weights.get_tensor(key).dtype for key in weights.keys()} == {torch.float16}
    for key in ("architecture", "pretrained_cfg", "data", "seed", "epochs", "training", "train_wall_time_s", "versions"):
        assert key in card
    assert card["data"]["license"] == "CC BY 4.0"


def test_names_load_with_and_without_prefix():
    stem = zoo.DEFAULT_MODEL.removeprefix(zoo.ZOO_PREFIX)
    assert zoo.model_card(stem) == zoo.model_card(zoo.DEFAULT_MODEL)
    assert zoo.weights_path(stem) == zoo.weights_path(zoo.DEFAULT_MODEL)
    a, b = zoo.load_zoo_model(stem).state_dict(), zoo.load_zoo_model(zoo.DEFAULT_MODEL).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["vit-digits-p0.4", "dynamo-zoo/nope", "../cards/vit-digits-reg4", ""])
def test_unknown_name_lists_the_available_models(name):
    for function in (zoo.model_card, zoo.weights_path, zoo.load_zoo_model):
        with pytest.raises(ValueError, match="available: .*dynamo-zoo/vit-digits-reg4"):
            function(name)


def test_weights_that_do_not_match_their_card_are_refused(tmp_path, monkeypatch):
    shutil.copytree(zoo.weights_path(zoo.DEFAULT_MODEL).parents[1], tmp_path, dirs_exist_ok=True)
    weights = tmp_path / "weights" / "vit-digits-reg4.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 1
    weights.write_bytes(bytes(blob))
    monkeypatch.setattr(zoo, "_HERE", tmp_path)
    with pytest.raises(ValueError, match="sha256"):
        zoo.load_zoo_model(zoo.DEFAULT_MODEL)


def test_bundled_digits_are_exactly_the_held_out_split():
    split = data.digits_split()
    files = sorted(zoo.default_images().glob("*/*.png"))
    indices = np.array(sorted(int(f.stem) for f in files))
    np.testing.assert_array_equal(indices, split["test"])
    assert not set(split["train"]) & set(split["test"])
    assert len(split["train"]) + len(split["test"]) == 1797
    assert np.bincount(split["labels"][split["test"]]).min() >= 35  # stratified: ~36 per class
    for file in files:
        index = int(file.stem)
        assert int(file.parent.name) == split["labels"][index]
        with Image.open(file) as image:
            assert image.mode == "L"
            np.testing.assert_array_equal(np.asarray(image), split["pixels"][index])


def test_natural_images_are_small_rgb_photographs():
    files = sorted(zoo.natural_images().glob("*.png"))
    assert 6 <= len(files) <= 10
    assert {f.stem for f in files} == set(data.NATURAL_IMAGES)
    for file in files:
        with Image.open(file) as image:
            assert image.mode == "RGB" and image.size == (64, 64)


def test_shipped_size_is_under_30_mb():
    root = zoo.default_images().parents[1]
    files = [*root.glob("weights/*.safetensors"), *root.glob("cards/*.json"), *root.glob("images/**/*.png")]
    assert len(files) >= 6 + 6 + 360
    assert sum(f.stat().st_size for f in files) < 30e6


def test_training_is_deterministic_given_the_seed(tmp_path):
    threads, strict = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    config = train.TrainConfig(**TINY, seed=3)
    first, card = train.train_model(config, progress=False)
    second, again = train.train_model(config, progress=False)
    other, _ = train.train_model(train.TrainConfig(**TINY, seed=4), progress=False)
    a, b, c = first.state_dict(), second.state_dict(), other.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert card["test_accuracy"] == again["test_accuracy"]
    files = [train.save_model(model, c, tmp_path / str(i))[0] for i, (model, c) in enumerate([(first, card), (second, again)])]
    assert files[0].read_bytes() == files[1].read_bytes()  # the file, hence its sha256, too
    assert card["data"]["n_train_used"] == 96 and card["name"] == "vit-digits-p0.1-s3"
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (threads, strict)


def test_schedule_is_the_former_one_a_step_later_in_warm_up():
    """timm's warm-up + cosine, as the trainer sets it before each update: the former hand-written
    schedule's values (to rounding) from the end of the warm-up on; during it, the step before's."""
    config, total, warmup = train.TrainConfig(), 100, 10

    def former(step: int) -> float:
        if step < warmup:
            return config.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress))

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=config.lr)
    scheduler = train.schedule(optimizer, total, warmup, config.min_lr)
    values = []
    for step in range(total):
        scheduler.step_update(step)
        values.append(optimizer.param_groups[0]["lr"])
    assert values[0] == 0 and values[1:warmup] == pytest.approx([former(step - 1) for step in range(1, warmup)], rel=1e-12)
    assert values[warmup:] == pytest.approx([former(step) for step in range(warmup, total)], rel=1e-12)


def test_command_line_trains_writes_and_summarises(tmp_path):
    parser = train.configure_parser(argparse.ArgumentParser())
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    args = parser.parse_args([*flags, "--drop-path-rate", "0.2", "--registers", "4", "--out", str(tmp_path), "--quiet"])
    summary = train.run_from_args(args)
    assert summary["name"] == "vit-digits-reg4-p0.2"
    card = json.loads((tmp_path / "cards" / "vit-digits-reg4-p0.2.json").read_text())
    weights = tmp_path / card["weights"]["file"]
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == card["weights"]["sha256"] == summary["sha256"]
    assert card["training"] == {**train.TrainConfig().__dict__, **TINY, "drop_path_rate": 0.2, "registers": 4}
    assert card["architecture"]["kwargs"]["reg_tokens"] == 4 and "test accuracy" in summary["text"]


def test_from_card_takes_the_shipped_settings():
    parser = train.configure_parser(argparse.ArgumentParser())
    card = zoo.model_card("vit-digits-p0.3")
    assert train.config_from_card(card) == train.TrainConfig(**card["training"])
    assert parser.parse_args(["--from-card", "vit-digits-p0.3"]).from_card == "vit-digits-p0.3"


@pytest.mark.slow
def test_retraining_the_default_model_reproduces_its_accuracy():
    card = zoo.model_card(zoo.DEFAULT_MODEL)
    _, retrained = train.train_model(train.config_from_card(card), name=card["name"], progress=False)
    assert abs(retrained["test_accuracy"] - card["test_accuracy"]) <= 1.0
