"""Reading a trajectory store a chunk at a time, and the small sphere helpers the analyses share.

Store-only analyses walk the store one block of images at a time (the store's own chunks along
``image``) and, inside a block, one layer at a time, so memory holds a few chunks, never the
whole of ``hidden``. Every chunk is cast to float64 before any arithmetic, so a float16 store
gives the same statistics as a float32 one up to its rounding.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import xarray as xr
from tqdm.auto import tqdm

TOKEN_KINDS = ("cls", "dist", "register", "patch")


def image_blocks(dataset: xr.Dataset, variable: str = "hidden") -> list[slice]:
    """Slices along ``image`` that follow ``variable``'s chunks (one slice if not chunked)."""
    data = dataset[variable].data
    chunks = getattr(data, "chunks", None)
    if chunks is None:
        return [slice(0, dataset.sizes["image"])]
    edges = np.cumsum((0,) + chunks[dataset[variable].dims.index("image")])
    return [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def token_groups(dataset: xr.Dataset) -> dict[str, np.ndarray]:
    """Positions along ``token`` of each token kind present, in the order cls, dist, register, patch."""
    kinds = plain_strings(dataset["token_kind"].values)
    return {kind: np.flatnonzero(kinds == kind) for kind in TOKEN_KINDS if (kinds == kind).any()}


def layer_states(dataset: xr.Dataset, images: slice, variable: str = "hidden") -> Iterator[np.ndarray]:
    """Yield ``variable`` for one block of images, one layer at a time, as float64.

    Yields
    ------
    numpy.ndarray
        (image, token, feature) for ``hidden``, (image, feature) for a reduced view.
    """
    array = dataset[variable].isel(image=images)
    for index in range(dataset.sizes["layer"]):
        yield np.asarray(array.isel(layer=index).values, dtype=np.float64)


def read_block(dataset: xr.Dataset, images: slice, variable: str) -> np.ndarray:
    """One block of images of a small per-image variable (a reduced view), as float64."""
    return np.asarray(dataset[variable].isel(image=images).values, dtype=np.float64)


def plain_strings(values) -> np.ndarray:
    """A fixed-width ``str`` array from any string array (zarr gives numpy's StringDType)."""
    return np.array([str(v) for v in np.asarray(values).ravel()]).reshape(np.shape(values))


def unit(x: np.ndarray) -> np.ndarray:
    """Unit vectors along the last axis; zero vectors stay zero."""
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def angle_deg(cosine: np.ndarray) -> np.ndarray:
    """Angle in degrees from a cosine, clipped to [-1, 1] against rounding."""
    return np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0)))


def labels_of(dataset: xr.Dataset) -> np.ndarray | None:
    """Integer class labels of the images, or None when the store has none (-1 = unknown)."""
    if "label" not in dataset.coords:
        return None
    labels = np.asarray(dataset["label"].values).astype(int)
    return labels if (labels >= 0).all() and len(np.unique(labels)) > 1 else None


def provenance(dataset: xr.Dataset) -> dict:
    """Attrs that say which model's trajectories a result was computed from."""
    return {key: str(dataset.attrs.get(key)) for key in ("model", "weights_sha256") if key in dataset.attrs}


def progress_bar(total: int, description: str, enabled: bool):
    """A tqdm bar over ``total`` steps (silent when not ``enabled``)."""
    return tqdm(total=total, desc=description, disable=not enabled, leave=False)
