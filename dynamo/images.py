"""Images in: a folder (class sub-folders give labels), a list of paths, or arrays, as an `ImageSet`.

An unreadable image never stops the run: it comes back flagged, with a warning, for the recorder to list."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.datasets.folder import make_dataset

IMAGE_EXTENSIONS = frozenset(ext for ext, _ in Image.registered_extensions().items())


class UnreadableImageWarning(UserWarning):
    """An image could not be decoded and was skipped."""


@dataclass
class ImageSet:
    """An ordered collection of images: ``ids`` (path or ``array:<index>``, (N,)), integer ``labels`` ((N,), -1
    where unknown), ``label_names`` (per class index, or None) and the ``source`` it was built from."""

    ids: list[str]
    labels: np.ndarray
    label_names: list[str] | None
    source: str
    _pixels: np.ndarray | torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def head(self, n: int) -> ImageSet:
        """The first ``n`` (>= 1) images; for labelled images each class's first in turn, then each one's second, ..."""
        if n < 1:
            raise ValueError(f"--limit must be at least 1, got {n}")
        order = np.arange(len(self))
        if (self.labels >= 0).all() and len(np.unique(self.labels)) > 1:
            rank = np.zeros(len(self), dtype=int)  # position of each image within its class
            for label in np.unique(self.labels):
                rank[self.labels == label] = np.arange((self.labels == label).sum())
            order = np.lexsort((self.labels, rank))
        keep = np.sort(order[:n])
        pixels = None if self._pixels is None else self._pixels[keep]
        return ImageSet([self.ids[i] for i in keep], self.labels[keep], self.label_names, self.source, pixels)

    def digest(self) -> str:
        """sha256 over the images' bytes (or pixels), labels, class names and paths relative to their folder."""
        content = hashlib.sha256()
        if self._pixels is not None:
            content.update(np.ascontiguousarray(np.asarray(self._pixels)).tobytes())
            names = self.ids
        else:
            root = os.path.commonpath([str(Path(i).resolve().parent) for i in self.ids]) if self.ids else ""
            names = [os.path.relpath(Path(i).resolve(), root) for i in self.ids]
            for path in self.ids:
                content.update(_file_digest(path))
        listing = json.dumps([names, self.labels.tolist(), self.label_names]).encode()
        return hashlib.sha256(listing + content.digest()).hexdigest()

    @property
    def preprocessed(self) -> bool:
        """True when the images are float tensors already in model input space."""
        return isinstance(self._pixels, torch.Tensor)

    def load_batch(self, indices: Sequence[int], transform: Callable[[Image.Image], torch.Tensor]) -> tuple[torch.Tensor, np.ndarray]:
        """Load and preprocess the images at ``indices`` with ``transform`` (PIL image → (C, H, W) tensor).

        Returns
        -------
        pixels : torch.Tensor
            (B, C, H, W) model input; zeros where an image was unreadable.
        readable : numpy.ndarray of bool
            (B,) False for images that could not be decoded.
        """
        if self.preprocessed:
            return self._pixels[list(indices)].float(), np.ones(len(indices), bool)
        tensors, readable = [], np.ones(len(indices), bool)
        for slot, index in enumerate(indices):
            try:
                tensors.append(transform(self._open(index)))
            except Exception as error:  # any decoder failure: skip the image, never the run
                warnings.warn(f"skipping unreadable image {self.ids[index]}: {error}", UnreadableImageWarning, stacklevel=2)
                readable[slot] = False
                tensors.append(None)
        shape = next((t.shape for t in tensors if t is not None), None) or transform(Image.new("RGB", (8, 8))).shape
        return torch.stack([torch.zeros(shape) if t is None else t for t in tensors]), readable

    def _open(self, index: int) -> Image.Image:
        if self._pixels is not None:
            return Image.fromarray(np.asarray(self._pixels[index])).convert("RGB")
        with Image.open(self.ids[index]) as image:
            return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB image; 16-bit and [0, 1] float images are scaled to 0..255 (PIL's ``convert`` clips them).

    Raises
    ------
    ValueError
        A float image with values outside [0, 1] (its scale is unknown).
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(image, dtype=np.float64)
        scale = 255 / 65535 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 1.0
        return Image.fromarray(np.clip(np.round(values * scale), 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if values.size and (values.min() < 0 or values.max() > 1):
            raise ValueError(f"float image with values in [{values.min():.3g}, {values.max():.3g}], not [0, 1]: "
                             "convert it to 8-bit first")
        return Image.fromarray(np.round(values * 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def image_set(images: str | Path | Sequence[str | Path] | np.ndarray | torch.Tensor, labels: Sequence[int] | None = None,
              label_names: Sequence[str] | None = None) -> ImageSet:
    """Build an `ImageSet` from any supported source.

    Parameters
    ----------
    images : path, sequence of paths, numpy.ndarray or torch.Tensor
        A folder (each sub-folder a class, sorted by name; a flat folder gives unlabelled images),
        an image file, a list of files, uint8 pixels (N, H, W[, C]) preprocessed like files, or a
        float tensor (N, C, H, W) of model input used as is.
    labels, label_names : optional
        Labels (length N) for a list of paths or arrays, and class names indexed by label.

    Raises
    ------
    FileNotFoundError
        The folder or a listed file does not exist, or a folder holds no images.
    """
    if isinstance(images, (np.ndarray, torch.Tensor)):
        if isinstance(images, torch.Tensor) and images.ndim != 4:
            raise ValueError(f"an image tensor must be (N, C, H, W), got shape {tuple(images.shape)}")
        if isinstance(images, np.ndarray) and (images.ndim not in (3, 4) or images.dtype != np.uint8):
            raise ValueError(
                "an image array must be uint8 (N, H, W) or (N, H, W, C); got "
                f"{images.dtype} {images.shape}. Pass preprocessed input as a float torch tensor"
            )
        n = len(images)
        ids = [f"array:{i}" for i in range(n)]
        return ImageSet(ids, _labels(labels, n), _names(label_names), f"array{tuple(images.shape)}", images)
    if isinstance(images, (str, Path)):
        path = Path(images)
        if path.is_file():  # one image file
            return ImageSet([str(path)], _labels(None, 1), None, str(path.resolve()))
        return _folder(path)
    paths = [Path(p) for p in images]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} listed image files do not exist, e.g. {missing[:3]}")
    return ImageSet([str(p) for p in paths], _labels(labels, len(paths)), _names(label_names), "list")


def _folder(root: Path) -> ImageSet:
    """The images under ``root`` (torchvision's `make_dataset`): one class per sub-folder, or unlabelled if flat."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = [p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if classes and loose:
        raise ValueError(
            f"image folder {root} mixes {len(loose)} top-level images ({', '.join(sorted(loose)[:3])}...) with class "
            f"sub-folders ({', '.join(classes[:3])}); put every image in a class sub-folder, or keep the folder flat"
        )
    class_to_idx = {name: label for label, name in enumerate(classes)} or {"": -1}  # "": the folder itself
    samples = make_dataset(str(root), class_to_idx, is_valid_file=_is_image, allow_empty=True)
    samples = sorted((label, str(Path(path))) for path, label in samples)  # by class, then path
    if not samples:
        raise FileNotFoundError(
            f"no images found in {root} (looked for {', '.join(sorted(IMAGE_EXTENSIONS)[:8])}, ...)"
        )
    labels = np.array([label for label, _ in samples], dtype=np.int64)
    return ImageSet([path for _, path in samples], labels, classes or None, str(root.resolve()))


def _is_image(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS and os.path.isfile(path)


def _file_digest(path: str) -> bytes:
    """BLAKE2b of a file's bytes; a file that cannot be read hashes as its error (it is skipped later)."""
    try:
        with open(path, "rb") as file:
            return hashlib.file_digest(file, "blake2b").digest()
    except OSError as error:
        return f"unreadable: {error.strerror}".encode()


def _labels(labels: Sequence[int] | None, n: int) -> np.ndarray:
    if labels is None:
        return np.full(n, -1, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (n,):
        raise ValueError(f"got {labels.shape[0]} labels for {n} images")
    return labels


def _names(label_names: Sequence[str] | None) -> list[str] | None:
    return None if label_names is None else [str(n) for n in label_names]
