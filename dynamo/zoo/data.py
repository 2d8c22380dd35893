"""The zoo's data: scikit-learn's digits and Fashion-MNIST, their fixed held-out splits, and PNG images.

Every pixel a zoo model sees takes the same path: a grayscale PNG, opened with PIL as RGB, through the
model's timm eval transform.
"""

from __future__ import annotations

import argparse
import gzip
import io
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from dynamo.zoo.config import FASHION_DIR

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

FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FASHION_SOURCE = {
    "name": "Fashion-MNIST (Zalando Research), the original idx files",
    "url": "https://github.com/zalandoresearch/fashion-mnist",
    "creators": "H. Xiao, K. Rasul, R. Vollgraf (2017), arXiv:1708.07747",
    "doi": "10.48550/arXiv.1708.07747",
    "license": "MIT",
    "images": 70000,
    "pixels": "28x28 grayscale, uint8 0..255 as in the idx files, stored unchanged as uint8 PNG",
    "classes": list(FASHION_CLASSES),
}

DATASETS = ("digits", "fashion")
SOURCES = {"digits": DATA_SOURCE, "fashion": FASHION_SOURCE}
BUNDLED_PER_CLASS = {"digits": None, "fashion": 100}  # test images shipped per class (None: all of them)

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

    Returns a dict: ``pixels`` uint8 (1797, 8, 8), ``labels`` int64 (1797,), ``train`` and ``test`` sorted int64 indices.
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


def read_idx(path: str | Path) -> np.ndarray:
    """Read a gzipped idx file (the MNIST format): its array, in native byte order.

    Raises ValueError when the header is not an idx header, or the data are not as long as it says.
    """
    with gzip.open(path, "rb") as file:
        blob = file.read()
    codes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if len(blob) < 4 or blob[:2] != b"\0\0" or blob[2] not in codes:
        raise ValueError(f"{path} is not an idx file (header {blob[:4].hex()})")
    ndim, dtype = blob[3], np.dtype(codes[blob[2]])
    shape = tuple(int(n) for n in np.frombuffer(blob, ">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    if len(blob) != offset + dtype.itemsize * math.prod(shape):
        raise ValueError(f"{path}: header says shape {shape}, but it holds {len(blob) - offset} data bytes")
    return np.frombuffer(blob, dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


def fashion_split(data_dir: str | Path | None = None) -> dict:
    """Fashion-MNIST's original split from its four idx files in ``data_dir`` (default `FASHION_DIR`).

    Returns a dict as `digits_split`'s: the 60,000 training then 10,000 test images (70000, 28, 28). Raises
    FileNotFoundError naming the folder and how to get the files.
    """
    root = Path(data_dir) if data_dir is not None else FASHION_DIR
    names = [name for pair in FASHION_FILES.values() for name in pair]
    missing = [name for name in names if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {root} (missing {', '.join(missing)}): "
            "apt-get install dataset-fashion-mnist, or pass --data DIR holding the four *-ubyte.gz files"
        )
    parts = {part: [read_idx(root / name) for name in pair] for part, pair in FASHION_FILES.items()}
    for part, (images, labels) in parts.items():
        if images.dtype != np.uint8 or images.ndim != 3 or labels.shape != images.shape[:1]:
            raise ValueError(f"Fashion-MNIST {part} files in {root}: images {images.shape}, labels {labels.shape}")
    n_train, n_test = len(parts["train"][1]), len(parts["test"][1])
    return {
        "pixels": np.concatenate([parts["train"][0], parts["test"][0]]),
        "labels": np.concatenate([parts["train"][1], parts["test"][1]]).astype(np.int64),
        "train": np.arange(n_train, dtype=np.int64),
        "test": np.arange(n_train, n_train + n_test, dtype=np.int64),
    }


def load_split(dataset: str = "digits", data_dir: str | Path | None = None) -> dict:
    """The fixed split of ``dataset`` (one of `DATASETS`); ``data_dir`` is for ``"fashion"`` only."""
    if dataset == "digits":
        return digits_split()
    if dataset == "fashion":
        return fashion_split(data_dir)
    raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")


def split_record(
    split: dict, seed: int = SPLIT_SEED, test_fraction: float = TEST_FRACTION, *, dataset: str = "digits"
) -> dict:
    """What a model card says about the split: how it was drawn and its sizes."""
    sizes = {"n_train": int(len(split["train"])), "n_test": int(len(split["test"]))}
    if dataset == "fashion":
        return {"method": "the original files: train-*-ubyte.gz for training, t10k-*-ubyte.gz for testing", **sizes}
    return {
        "method": "sklearn.model_selection.train_test_split(stratify=labels)",
        "seed": seed,
        "test_fraction": test_fraction,
        **sizes,
    }


def bundled_test(split: dict, dataset: str = "digits") -> np.ndarray:
    """The test images shipped in the package, as sorted indices into ``split``: all digits, `BUNDLED_PER_CLASS` per fashion class."""
    per_class = BUNDLED_PER_CLASS[dataset]
    if per_class is None:
        return np.sort(split["test"])
    test, labels = np.sort(split["test"]), split["labels"]
    chosen = []
    for label in np.unique(labels[test]):
        members = test[labels[test] == label]
        chosen.append(members[np.linspace(0, len(members), min(per_class, len(members)), endpoint=False).astype(int)])
    return np.sort(np.concatenate(chosen))


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Digits in 0..16 (any shape) → uint8 in 0..255, ``round(value * 255 / 16)``."""
    return np.round(np.asarray(images, dtype=np.float64) * 255 / 16).astype(np.uint8)


def pixel_stats(pixels: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation of uint8 images on the 0..1 scale, rounded to 4 decimals."""
    scaled = pixels.astype(np.float64) / 255
    return round(float(scaled.mean()), 4), round(float(scaled.std()), 4)


def png_tensors(pixels: np.ndarray, transform: Callable[[Image.Image], torch.Tensor]) -> torch.Tensor:
    """Encode uint8 images (N, H, W) as grayscale PNGs in memory, decode them as RGB and ``transform``: float32 (N, C, H', W')."""
    out = []
    for image in pixels:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        buffer.seek(0)
        out.append(transform(Image.open(buffer).convert("RGB")))
    return torch.stack(out)


def load_folder(root: str | Path, transform: Callable[[Image.Image], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a folder of class sub-folders named by class index: float32 pixels (N, C, H, W) and int64 labels (N,)."""
    pixels, labels = [], []
    for folder in sorted(Path(root).iterdir()):
        if not folder.is_dir():
            continue
        for file in sorted(folder.glob("*.png"), key=lambda f: int(f.stem)):
            with Image.open(file) as image:
                pixels.append(transform(image.convert("RGB")))
            labels.append(int(folder.name))
    return torch.stack(pixels), torch.tensor(labels)


def export_images(root: str | Path, split: dict, indices: Sequence[int]) -> None:
    """Write ``root/<class index>/<index>.png``: grayscale PNGs of ``split["pixels"][index]``."""
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


if __name__ == "__main__":  # python -m dynamo.zoo.data [--data DIR]: (re)write the bundled images
    parser = argparse.ArgumentParser(prog="python -m dynamo.zoo.data", description="(re)write the zoo's bundled images")
    parser.add_argument(
        "--data", metavar="DIR", default=str(FASHION_DIR), help="folder of the Fashion-MNIST *-ubyte.gz files"
    )
    images = Path(__file__).parent / "images"
    data_dir = parser.parse_args().data
    split = digits_split()
    export_images(images / "digits-test", split, bundled_test(split, "digits"))
    export_natural(images / "natural")
    split = fashion_split(data_dir)
    export_images(images / "fashion-test", split, bundled_test(split, "fashion"))
