"""The model zoo: shipped weights reproduce their cards, names resolve, training is deterministic."""

from __future__ import annotations

import argparse
import gzip
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
FASHION_PRESENT = all((data.FASHION_DIR / name).is_file() for pair in data.FASHION_FILES.values() for name in pair)
needs_fashion = pytest.mark.skipif(
    not FASHION_PRESENT,
    reason=f"Fashion-MNIST idx files absent from {data.FASHION_DIR} (apt-get install dataset-fashion-mnist)",
)


def dataset_of(card: dict) -> str:
    return card["training"].get("dataset", "digits")


def images_of(card: dict):
    return {"digits": zoo.default_images(), "fashion": zoo.fashion_images()}[dataset_of(card)]


def test_every_promised_model_is_shipped():
    digits = [name for name in zoo.list_models() if name.startswith(zoo.ZOO_PREFIX + "vit-digits")]
    assert digits == sorted(zoo.ZOO_PREFIX + stem for stem in SHIPPED)
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
    assert model.num_reg_tokens == card["registers"] and len(model.blocks) == card["architecture"]["kwargs"]["depth"]

    config = timm.data.resolve_data_config({}, model=model)
    side = train.INPUT_SIZES[dataset_of(card)]
    assert tuple(config["input_size"]) == (3, side, side) and config["crop_pct"] == 1.0
    assert tuple(config["mean"]) == tuple(card["pretrained_cfg"]["mean"])

    pixels, labels = data.load_folder(images_of(card), timm.data.create_transform(**config))
    accuracy = train.evaluate(model, pixels, labels)
    assert len(labels) == card["data"].get("n_bundled_test", card["data"]["split"]["n_test"])
    expected = card.get("bundled_test_accuracy", card["test_accuracy"])  # on the shipped images
    assert abs(accuracy - expected) <= 0.5, (accuracy, expected)
    if not card.get("checkpoint"):  # a finished model, not an early checkpoint of the over-training series
        assert accuracy >= card["chance_accuracy"] + 30


@pytest.mark.parametrize("name", zoo.list_models())
def test_card_sha256_matches_the_float16_safetensors(name):
    card, path = zoo.model_card(name), zoo.weights_path(name)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == card["weights"]["sha256"]
    assert path.stat().st_size == card["weights"]["bytes"]
    with safe_open(str(path), "pt") as weights:
        assert {weights.get_tensor(key).dtype for key in weights.keys()} == {torch.float16}
    for key in ("architecture", "pretrained_cfg", "data", "seed", "epochs", "training", "train_wall_time_s", "versions"):
        assert key in card
    assert card["data"]["license"] == data.SOURCES[dataset_of(card)]["license"]
    if card.get("drop_path_schedule") == "uniform":
        assert card["drop_path_rates"] == [card["drop_path_rate"]] * card["architecture"]["kwargs"]["depth"]


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


def raw_idx(name: str) -> bytes:
    with gzip.open(data.FASHION_DIR / name, "rb") as file:
        return file.read()


def test_idx_reader_reads_big_endian_types_and_refuses_bad_headers(tmp_path):
    values = np.arange(-3, 3, dtype=">i4").reshape(2, 3)
    good, short, bad = tmp_path / "good.gz", tmp_path / "short.gz", tmp_path / "bad.gz"
    good.write_bytes(gzip.compress(bytes([0, 0, 0x0C, 2]) + np.array([2, 3], ">u4").tobytes() + values.tobytes()))
    short.write_bytes(gzip.compress(bytes([0, 0, 0x08, 1]) + np.array([5], ">u4").tobytes() + bytes(4)))
    bad.write_bytes(gzip.compress(bytes([1, 0, 0x08, 1, 0, 0, 0, 0])))
    array = data.read_idx(good)
    assert array.dtype == np.int32 and array.dtype.isnative
    np.testing.assert_array_equal(array, [[-3, -2, -1], [0, 1, 2]])
    with pytest.raises(ValueError, match="shape"):
        data.read_idx(short)
    with pytest.raises(ValueError, match="not an idx file"):
        data.read_idx(bad)


@needs_fashion
def test_idx_reader_matches_the_raw_fashion_bytes():
    raw_images, raw_labels = raw_idx("train-images-idx3-ubyte.gz"), raw_idx("train-labels-idx1-ubyte.gz")
    # header: magic 0x00000803 (uint8, 3 dimensions), then 60000, 28, 28 as big-endian uint32
    assert [int.from_bytes(raw_images[i : i + 4], "big") for i in range(0, 16, 4)] == [0x803, 60000, 28, 28]
    assert [int.from_bytes(raw_labels[i : i + 4], "big") for i in range(0, 8, 4)] == [0x801, 60000]
    images = data.read_idx(data.FASHION_DIR / "train-images-idx3-ubyte.gz")
    labels = data.read_idx(data.FASHION_DIR / "train-labels-idx1-ubyte.gz")
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8 and labels.shape == (60000,)
    first = np.frombuffer(raw_images, np.uint8, count=784, offset=16).reshape(28, 28)
    np.testing.assert_array_equal(images[0], first)
    assert int(images[0].sum()) == int(first.astype(np.int64).sum()) > 0
    last = np.frombuffer(raw_images[-784:], np.uint8)
    assert int(images[-1].astype(np.int64).sum()) == int(last.astype(np.int64).sum())
    assert labels[0] == raw_labels[8] == 9 and labels[-1] == raw_labels[-1]  # the first image is an ankle boot


@needs_fashion
def test_fashion_split_is_the_original_60000_and_10000_balanced():
    split = data.fashion_split()
    assert split["pixels"].shape == (70000, 28, 28) and split["pixels"].dtype == np.uint8
    assert split["labels"].shape == (70000,) and split["labels"].dtype == np.int64
    np.testing.assert_array_equal(split["train"], np.arange(60000))
    np.testing.assert_array_equal(split["test"], np.arange(60000, 70000))
    assert np.bincount(split["labels"][split["train"]]).tolist() == [6000] * 10
    assert np.bincount(split["labels"][split["test"]]).tolist() == [1000] * 10
    test_images = data.read_idx(data.FASHION_DIR / "t10k-images-idx3-ubyte.gz")
    np.testing.assert_array_equal(split["pixels"][60000:], test_images)
    assert data.load_split("fashion")["labels"].tolist() == split["labels"].tolist()
    assert len(data.FASHION_CLASSES) == 10 and data.FASHION_SOURCE["license"] == "MIT"


def test_missing_fashion_files_give_one_line_that_says_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        data.fashion_split(tmp_path)
    message = str(error.value)
    assert "\n" not in message and str(tmp_path) in message
    assert "apt-get install dataset-fashion-mnist" in message and "--data DIR" in message
    assert "train-images-idx3-ubyte.gz" in message


def test_bundled_fashion_images_are_100_per_class():
    files = sorted(zoo.fashion_images().glob("*/*.png"))
    assert len(files) == 1000
    assert sorted(int(folder.name) for folder in zoo.fashion_images().iterdir()) == list(range(10))
    assert all(len(list(folder.glob("*.png"))) == 100 for folder in zoo.fashion_images().iterdir())
    assert all(60000 <= int(f.stem) < 70000 for f in files)


@needs_fashion
def test_bundled_fashion_images_are_the_chosen_test_images():
    split = data.fashion_split()
    chosen = data.bundled_test(split, "fashion")
    files = sorted(zoo.fashion_images().glob("*/*.png"), key=lambda f: int(f.stem))
    np.testing.assert_array_equal([int(f.stem) for f in files], chosen)
    assert np.diff(chosen[split["labels"][chosen] == 0]).min() >= 5  # spread through the file, not the first 100
    for file in files:
        index = int(file.stem)
        assert int(file.parent.name) == split["labels"][index]
        with Image.open(file) as image:
            assert image.mode == "L" and image.size == (28, 28)
            np.testing.assert_array_equal(np.asarray(image), split["pixels"][index])


def test_fashion_settings_come_from_the_dataset_defaults():
    parser = train.configure_parser(argparse.ArgumentParser())
    fashion = train.config_for("fashion")
    assert fashion.dataset == "fashion" and fashion.drop_path_schedule == "uniform" and fashion.registers == 4
    assert train.default_name(fashion) == f"vit-fashion-reg4-p{fashion.drop_path_rate}"
    other = train.config_for("fashion", seed=1, registers=0)
    assert train.default_name(other) == f"vit-fashion-p{fashion.drop_path_rate}-s1"
    assert train.config_for() == train.TrainConfig() and train.default_name(train.TrainConfig()) == "vit-digits-p0.1"
    assert train.architecture(fashion)["img_size"] == 28 and train.architecture(train.TrainConfig())["img_size"] == 32
    args = parser.parse_args(["--dataset", "fashion", "--epochs", "7", "--checkpoint-epochs", "2,5"])
    assert not hasattr(args, "seed") and args.data == str(data.FASHION_DIR)
    given = {k: v for k, v in vars(args).items() if k in train.TrainConfig.__dataclass_fields__}
    expected = train.config_for("fashion", epochs=7, checkpoint_epochs="2,5")
    assert train.config_for(given.pop("dataset"), **given) == expected
    assert train.checkpoint_list(train.config_for("fashion", epochs=7, checkpoint_epochs="5, 2")) == [2, 5]
    with pytest.raises(ValueError, match="within"):
        train.config_for("fashion", epochs=4, checkpoint_epochs="2,4")
    with pytest.raises(ValueError, match="unknown dataset"):
        train.TrainConfig(dataset="cifar")
    with pytest.raises(SystemExit):
        parser.parse_args(["--dataset", "cifar"])


@needs_fashion
def test_fashion_training_writes_its_card_and_the_over_training_checkpoints(tmp_path):
    tiny = {**TINY, "epochs": 3, "train_limit": 128, "warmup_epochs": 1, "num_threads": 1}
    parser = train.configure_parser(argparse.ArgumentParser())
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in tiny.items()]
    args = parser.parse_args([*flags, "--dataset", "fashion", "--drop-path-rate", "0.3", "--checkpoint-epochs", "1,2",
                              "--data", str(data.FASHION_DIR), "--out", str(tmp_path), "--quiet"])
    summary = train.run_from_args(args)
    name = "vit-fashion-reg4-p0.3"
    assert summary["name"] == name and summary["checkpoints"] == [f"{name}-e1", f"{name}-e2"]
    card = json.loads((tmp_path / "cards" / f"{name}.json").read_text())
    assert card["data"]["dataset"] == "fashion" and card["data"]["license"] == "MIT"
    assert card["data"]["n_train_used"] == 128
    assert card["data"]["split"]["n_train"] == 60000 and card["data"]["split"]["n_test"] == 10000
    assert card["data"]["n_bundled_test"] == 1000 and card["epochs"] == 3 and "checkpoint" not in card
    assert card["architecture"]["kwargs"]["img_size"] == 28 and card["architecture"]["kwargs"]["patch_size"] == 4
    assert tuple(card["pretrained_cfg"]["input_size"]) == (3, 28, 28)
    assert card["pretrained_cfg"]["mean"] == [0.286] * 3 and card["pretrained_cfg"]["std"] == [0.353] * 3
    assert card["drop_path_schedule"] == "uniform" and card["drop_path_rates"] == [0.3, 0.3]
    expected = {**train.config_for("fashion").__dict__, **tiny, "drop_path_rate": 0.3, "checkpoint_epochs": "1,2"}
    assert card["training"] == expected
    assert 0 <= card["train_accuracy"] <= 100 and "held-out Fashion-MNIST" in summary["text"]

    model = train.build_model(card["architecture"]["kwargs"], card["pretrained_cfg"])
    assert model.patch_embed.grid_size == (7, 7)
    for epoch in (1, 2):
        checkpoint = json.loads((tmp_path / "cards" / f"{name}-e{epoch}.json").read_text())
        weights = tmp_path / checkpoint["weights"]["file"]
        assert hashlib.sha256(weights.read_bytes()).hexdigest() == checkpoint["weights"]["sha256"]
        assert checkpoint["checkpoint"] == {"of": name, "epoch": epoch, "of_epochs": 3}
        assert checkpoint["epochs"] == epoch
        assert {"test_accuracy", "train_accuracy", "bundled_test_accuracy"} <= set(checkpoint)
        assert checkpoint["training"] == card["training"]
        with safe_open(str(weights), "pt") as tensors:
            assert {tensors.get_tensor(key).dtype for key in tensors.keys()} == {torch.float16}


def test_shipped_size_is_under_60_mb():
    root = zoo.default_images().parents[1]
    files = [*root.glob("weights/*.safetensors"), *root.glob("cards/*.json"), *root.glob("images/**/*.png")]
    assert len(files) >= 6 + 6 + 360 + 1000
    assert sum(f.stat().st_size for f in files) < 60e6


def test_each_zoo_model_gets_the_held_out_images_of_its_own_data():
    fashion = [name for name in zoo.list_models() if zoo.model_card(name)["training"].get("dataset") == "fashion"]
    assert zoo.default_images() == zoo.default_images("dynamo-zoo/vit-digits-reg4") == zoo.default_images("vit_base_patch16_224")
    assert all(zoo.default_images(name) == zoo.fashion_images() for name in fashion)
    assert len(list(zoo.fashion_images().glob("*/*.png"))) == 1000


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


def test_checkpoints_do_not_change_the_training():
    settings = {**TINY, "epochs": 2, "registers": 4, "seed": 5, "num_threads": 1}
    config = train.TrainConfig(**settings, drop_path_schedule="uniform")
    plain, card = train.train_model(config, progress=False)
    seen = []
    series, last = train.train_model(train.TrainConfig(**{**config.__dict__, "checkpoint_epochs": "1"}), progress=False,
                                     on_checkpoint=lambda model, c: seen.append((model, c)))
    a, b = plain.state_dict(), series.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and last["test_accuracy"] == card["test_accuracy"]
    assert "train_accuracy" in last and "train_accuracy" not in card
    (model, checkpoint), = seen
    assert checkpoint["name"] == "vit-digits-reg4-p0.1-s5-e1" and not model.training
    assert all(torch.equal(v, v.half().float()) for v in model.state_dict().values())
    assert card["drop_path_rates"] == [0.1, 0.1] and train.drop_path_rates(plain) == [0.1, 0.1]
    linear = train.build_model(train.architecture(train.TrainConfig(**TINY)), train.pretrained_cfg(0.5, 0.5))
    assert train.drop_path_rates(linear) == [0.0, 0.1]  # timm's ramp, as the digits models have it


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
@pytest.mark.parametrize("name", [zoo.DEFAULT_MODEL, pytest.param("dynamo-zoo/vit-fashion-reg4-p0.2", marks=needs_fashion)])
def test_retraining_a_shipped_model_reproduces_its_accuracy(name):
    card = zoo.model_card(name)
    _, retrained = train.train_model(train.config_from_card(card), name=card["name"], progress=False)
    assert abs(retrained["test_accuracy"] - card["test_accuracy"]) <= 1.0
