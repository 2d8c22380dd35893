"""The zoo's data: scikit-learn's handwritten digits, a fixed held-out split, and PNG images.

Every pixel a zoo model sees, in training and in evaluation, takes the same path: the 8×8
digit (integers 0..16) is stored as a uint8 grayscale PNG (``round(value * 255 / 16)``),
opened with PIL, converted to RGB and passed through the model's timm eval transform.
Training encodes and decodes those PNGs in memory; evaluation reads the bundled folder.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

SPLIT_SEED = 0
TEST_FRACTION = 0.2
NUM_CLASSES = 10

DATA_SOURCE = {
    "name": "Optical Recognition of Handwritten Digits (UCI), test set, as sklearn.datasets.load_digits()",
    "url": "https://archive.ics.uci.edu/dataset/80/optical+recognition+of+handwritten+digits",
    "creators": "E. Alpaydin, C. Kaynak (1998)",
    "doi": "10.24432/C50P49",
    "license": "CC BY 4.0",
    "images": 1797,
    "pixels": "8x8 grayscale, integers 0..16, stored as uint8 PNG round(v*255/16)",
}

# scikit-image photographs whose docstrings (skimage/data/_fetchers.py) state CC0 or public domain.
NATURAL_IMAGES = {
    "astronaut": "public domain (NASA)",
    "camera": "CC0 (Lav Varshney)",
    "chelsea": "CC0 (Stefan van der Walt)",
    "coffee": "CC0 (Rachel Michetti)",
    "grass": "CC0 (CC0Textures)",
    "hubble_deep_field": "public domain (NASA)",
    "retina": "CC0 1.0 (Mikael Häggström, Wikimedia)",
    "rocket": "public domain (SpaceX)",
}


def digits_split(seed: int = SPLIT_SEED, test_fraction: float = TEST_FRACTION) -> dict:
    """The fixed, stratified train/test split of ``load_digits()``.

    Parameters
    ----------
    seed : int
        ``random_state`` of scikit-learn's ``train_test_split``.
    test_fraction : float
        Share of the 1,797 images held out for testing.

    Returns
    -------
    dict
        ``pixels`` uint8 (1797, 8, 8); ``labels`` int64 (1797,); ``train`` and ``test``: sorted
        int64 indices into ``load_digits()``, shapes (N_train,) and (N_test,).
    """
    digits = load_digits()
    indices = np.arange(len(digits.target))
    train, test = train_test_split(
        indices, test_size=test_fraction, random_state=seed, stratify=digits.target
    )
    return {
        "pixels": to_uint8(digits.images),
        "labels": digits.target.astype(np.int64),
        "train": np.sort(train),
        "test": np.sort(test),
    }


def split_record(split: dict, seed: int = SPLIT_SEED, test_fraction: float = TEST_FRACTION) -> dict:
    """What a model card says about the split: how it was drawn and its sizes."""
    return {
        "method": "sklearn.model_selection.train_test_split(stratify=labels)",
        "seed": seed,
        "test_fraction": test_fraction,
        "n_train": int(len(split["train"])),
        "n_test": int(len(split["test"])),
    }


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Digits in 0..16 (any shape) → uint8 in 0..255, ``round(value * 255 / 16)``."""
    return np.round(np.asarray(images, dtype=np.float64) * 255 / 16).astype(np.uint8)


def pixel_stats(pixels: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation of uint8 images on the 0..1 scale, rounded to 4 decimals."""
    scaled = pixels.astype(np.float64) / 255
    return round(float(scaled.mean()), 4), round(float(scaled.std()), 4)


def png_tensors(pixels: np.ndarray, transform: Callable[[Image.Image], torch.Tensor]) -> torch.Tensor:
    """Encode each image as a grayscale PNG in memory, decode it as RGB and transform it.

    Parameters
    ----------
    pixels : numpy.ndarray
        uint8 images, shape (N, H, W).
    transform : callable
        PIL image → tensor (C, H', W'), e.g. timm's eval transform.

    Returns
    -------
    torch.Tensor
        float32, shape (N, C, H', W').
    """
    out = []
    for image in pixels:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        buffer.seek(0)
        out.append(transform(Image.open(buffer).convert("RGB")))
    return torch.stack(out)


def load_folder(root: str | Path, transform: Callable[[Image.Image], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a folder of class sub-folders named by digit, as the bundled test images are.

    Returns
    -------
    pixels : torch.Tensor
        float32, shape (N, C, H, W), in sub-folder then file-name order.
    labels : torch.Tensor
        int64, shape (N,), the sub-folder name of each image.
    """
    pixels, labels = [], []
    for folder in sorted(Path(root).iterdir()):
        if not folder.is_dir():
            continue
        for file in sorted(folder.glob("*.png"), key=lambda f: int(f.stem)):
            with Image.open(file) as image:
                pixels.append(transform(image.convert("RGB")))
            labels.append(int(folder.name))
    return torch.stack(pixels), torch.tensor(labels)


def export_digits(root: str | Path, split: dict, indices: Sequence[int]) -> None:
    """Write ``root/<digit>/<index>.png``: 8×8 grayscale PNGs named by their index in ``load_digits()``."""
    root = Path(root)
    for index in indices:
        folder = root / str(split["labels"][index])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(split["pixels"][index]).save(folder / f"{index}.png", optimize=True)


def export_natural(root: str | Path, size: int = 64) -> None:
    """Write ``root/<name>.png``: each of `NATURAL_IMAGES`, centre-cropped square, ``size``² RGB."""
    from skimage import data

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for name in NATURAL_IMAGES:
        image = Image.fromarray(getattr(data, name)()).convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        square = image.crop((left, top, left + side, top + side))
        square.resize((size, size), Image.Resampling.LANCZOS).save(root / f"{name}.png", optimize=True)


if __name__ == "__main__":  # python -m dynamo.zoo.data: (re)write the bundled images
    images = Path(__file__).parent / "images"
    split = digits_split()
    export_digits(images / "digits-test", split, split["test"])
    export_natural(images / "natural")
