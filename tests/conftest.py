"""Shared fixtures: small random-weight timm ViTs (mechanics only) and real images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits, load_sample_images

import dynamo

# Architectures with different token layouts; small input sizes keep the tests fast.
ARCHITECTURES = {
    "cls": ("vit_tiny_patch16_224", {"img_size": 48}),
    "cls+4reg": ("vit_small_patch14_reg4_dinov2", {"img_size": 42}),
    "cls+dist": ("deit_tiny_distilled_patch16_224", {"img_size": 48}),
    "gap": ("vit_base_patch16_gap_224", {"img_size": 32, "depth": 4}),
    "eva": ("eva02_tiny_patch14_224", {"img_size": 28}),
}


@pytest.fixture
def one_thread():
    """Torch on one thread: small models run fastest so (intra-op threads stall on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(kind: str = "cls", **overrides) -> dynamo.LoadedModel:
    """A random-weight model of one token layout, with a 10-class head."""
    name, kwargs = ARCHITECTURES[kind]
    torch.manual_seed(0)
    return dynamo.load_model(name, pretrained=False, num_classes=10, **{**kwargs, **overrides})


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory):
    """60 real handwritten digits as PNG files in class sub-folders 0..9 (6 per class)."""
    root = tmp_path_factory.mktemp("digits")
    digits = load_digits()
    for label in range(10):
        (root / str(label)).mkdir()
        for index in np.flatnonzero(digits.target == label)[:6]:
            pixels = np.round(digits.images[index] * 255 / 16).astype(np.uint8)
            Image.fromarray(pixels).save(root / str(label) / f"{index}.png")
    return root


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory):
    """scikit-learn's two bundled photographs, plus crops, as a flat folder of JPEGs."""
    root = tmp_path_factory.mktemp("photos")
    for i, photo in enumerate(load_sample_images().images):
        for j, (top, left) in enumerate([(0, 0), (100, 200), (200, 300)]):
            Image.fromarray(photo[top : top + 200, left : left + 200]).save(root / f"photo{i}_{j}.jpg")
    return root
