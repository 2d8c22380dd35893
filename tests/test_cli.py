"""The `dynamo` command: summaries, JSON, clear errors with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

import dynamo
from dynamo import zoo
from dynamo.pipeline.cli import main


def test_record_then_info_json(tmp_path, digits_folder):
    out = tmp_path / "s.zarr"
    command = [sys.executable, "-m", "dynamo.pipeline.cli", "record", "vit_tiny_patch16_224", "--no-pretrained",
               "--images", str(digits_folder), "--out", str(out), "--limit", "12", "--batch-size", "8",
               "--dtype", "float16", "--quiet", "--json"]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    summary = json.loads(result.stdout)
    assert summary["n_recorded"] == 12 and summary["complete"] and summary["dtype"] == "float16"
    assert summary["token_kinds"] == {"cls": 1, "dist": 0, "register": 0, "patch": 196}
    assert summary["layers"] == 13
    dataset = dynamo.open_trajectories(out)
    assert dataset["hidden"].dtype == np.float16 and dataset.sizes["image"] == 12
    info = subprocess.run([sys.executable, "-m", "dynamo.pipeline.cli", "info", str(out)], capture_output=True, text=True, check=True)
    assert "12/12 images recorded" in info.stdout and "vit_tiny_patch16_224" in info.stdout


def test_errors_are_one_line_with_status_2(tmp_path, digits_folder, capsys):
    assert main(["record", "resnet18", "--no-pretrained", "--images", str(digits_folder), "--out", str(tmp_path / "a.zarr")]) == 2
    assert "ResNet is not a ViT-family transformer" in capsys.readouterr().err
    assert main(["record", "vit_tiny_patch16_224", "--no-pretrained", "--images", str(tmp_path / "none"), "--out", str(tmp_path / "b.zarr")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["info", str(tmp_path)]) == 2
    assert "is not a" in capsys.readouterr().err


def test_default_model_and_images_work_offline(tmp_path):
    """`dynamo record dynamo-zoo/<default> --out STORE` needs nothing else."""
    out = tmp_path / "default.zarr"
    assert main(["record", zoo.DEFAULT_MODEL, "--out", str(out), "--quiet", "--limit", "64"]) == 0
    dataset = dynamo.open_trajectories(out)
    assert dataset.attrs["model"] == zoo.DEFAULT_MODEL and dataset.attrs["pretrained"]
    assert set(dataset["label_name"].values) <= {str(d) for d in range(10)}
    # the shipped model is trained: its recorded logits classify the held-out digits
    accuracy = (dataset["logits"].values.argmax(1) == dataset["label"].values).mean()
    assert accuracy > 0.8
