"""Trajectory datasets built from chosen arrays, laid out as dynamo's store contract.

They let the dynamics analyses be checked on trajectories whose answer is known in closed form
(rotations, planted subspaces) or by brute force on small arrays.
"""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import xarray as xr
from threadpoolctl import threadpool_limits


@pytest.fixture(autouse=True, scope="module")
def one_blas_thread():
    """Import into a test module to run it on one BLAS thread: its many small matrix products
    only contend for the 2 shared cores when BLAS spreads them over threads."""
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def contract_dataset(
    hidden: np.ndarray, kinds: list[str], labels: np.ndarray | None = None, chunk: int = 4
) -> xr.Dataset:
    """A dask-backed trajectory Dataset around ``hidden`` (image, layer, token, feature).

    ``kinds`` gives each token's kind; reduced views are computed like the recorder does; the
    image axis is chunked ``chunk`` images at a time and the layer axis one layer at a time.
    """
    hidden = np.asarray(hidden, dtype=np.float32)
    kinds = np.array(kinds)
    n_images, n_layers = hidden.shape[:2]
    variables = {"hidden": (("image", "layer", "token", "feature"), da.from_array(hidden, chunks=(chunk, 1, -1, -1)))}
    for view, kind in (("cls", "cls"), ("patch_mean", "patch"), ("register_mean", "register")):
        positions = np.flatnonzero(kinds == kind)
        if len(positions):
            reduced = hidden[:, :, positions].mean(axis=2)
            variables[view] = (("image", "layer", "feature"), da.from_array(reduced, chunks=(chunk, -1, -1)))
    coords = {
        "image": np.arange(n_images),
        "layer": np.arange(n_layers),
        "token": np.arange(len(kinds)),
        "token_kind": ("token", kinds),
    }
    if labels is not None:
        coords["label"] = ("image", np.asarray(labels))
        coords["label_name"] = ("image", np.array([str(label) for label in labels]))
    return xr.Dataset(variables, coords=coords, attrs={"model": "synthetic", "weights_sha256": "none"})


def rotation_trajectories(
    n_images: int, n_layers: int, n_features: int, angles: np.ndarray, seed: int = 0
) -> np.ndarray:
    """Tokens that turn by a fixed angle per layer in a random plane, with growing norms.

    Parameters
    ----------
    angles : (token,) radians turned per layer by each token.

    Returns
    -------
    numpy.ndarray
        (image, layer, token, feature): x_l = r_l (cos(l θ) u + sin(l θ) v) with u ⟂ v random
        unit vectors per image and token and r_l = 1 + l, so only the direction's motion is
        the rotation.
    """
    rng = np.random.default_rng(seed)
    n_tokens = len(angles)
    basis = np.linalg.qr(rng.normal(size=(n_images, n_tokens, n_features, 2)))[0]  # (i, t, f, 2) orthonormal
    layers = np.arange(n_layers)[:, None]
    phase = layers * np.asarray(angles)[None, :]  # (layer, token)
    circle = np.stack([np.cos(phase), np.sin(phase)], axis=-1) * (1.0 + layers)[..., None]  # (layer, token, 2)
    return np.einsum("itfk,ltk->iltf", basis, circle)
