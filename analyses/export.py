"""Trajectories as trials x time x features arrays, for other dynamics tools.

Tools such as DSA (Dynamical Similarity Analysis, Ostrow et al. 2023), dynamical-systems
fitting packages or plain numpy code expect an array of shape (trials, time, features). Here a
trial is one image's path (for a reduced view: ``cls``, ``patch_mean``, ``register_mean``) or
one token's path in one image (for a token kind: ``patch``, ``register``, ``dist``), time is
depth (the store's layers) and features are the residual-stream dimensions, optionally on the
unit sphere and/or projected on the top principal directions of all (trial, time) states.

Everything stays lazy (dask) until written, and `export_trajectories` streams the array into a
``.npy`` file a chunk at a time (``numpy.load(path, mmap_mode="r")`` reads it back without
loading it), next to a ``.json`` file saying what each axis holds.
"""

from __future__ import annotations

import json
from pathlib import Path

import dask.array as da
import numpy as np
import xarray as xr
from dask.diagnostics import ProgressBar
from tqdm.auto import tqdm

from analyses.streaming import cluster_client, plain_strings, token_groups

REDUCED_VIEWS = ("cls", "patch_mean", "register_mean")
TOKEN_VIEWS = ("patch", "register", "dist")
VIEWS = REDUCED_VIEWS + TOKEN_VIEWS


def trajectories(
    dataset: xr.Dataset, view: str = "cls", *, sphere: bool = False, n_components: int | None = None
) -> xr.DataArray:
    """A lazy (trial, time, feature) array of trajectories.

    Parameters
    ----------
    dataset : xarray.Dataset
        A trajectory dataset (`dynamo.open_trajectories`).
    view : str
        A reduced view (``cls``, ``patch_mean``, ``register_mean``: one trial per image) or a
        token kind (``patch``, ``register``, ``dist``: one trial per token per image).
    sphere : bool
        Divide every state by its norm first.
    n_components : int, optional
        Project the features on this many principal directions of all (trial, time) states
        (computed with a chunked pass over the data); ``feature`` becomes ``component``.

    Returns
    -------
    xarray.DataArray
        (trial, time, feature) float32, dask-backed; coords ``time`` (the layer), per-trial
        ``image``, ``image_id``, ``label`` (where known) and, for token views, ``token``. With
        ``n_components``, attrs ``components`` (feature x component) and
        ``explained_variance_ratio``.
    """
    if view in REDUCED_VIEWS:
        if view not in dataset.data_vars:
            raise ValueError(f"the store has no {view!r} view; record it again with a current dynamo")
        array = dataset[view].rename(image="trial", layer="time")
        per_trial = {"image": ("trial", dataset["image"].values)}
        image_index = np.arange(dataset.sizes["image"])
    elif view in TOKEN_VIEWS:
        positions = token_groups(dataset).get(view)
        if positions is None:
            raise ValueError(f"the store has no {view!r} tokens; its token kinds are {list(token_groups(dataset))}")
        tokens = dataset["hidden"].isel(token=positions).drop_vars(
            [c for c in dataset["hidden"].coords if c not in ("image", "layer", "token")]
        )
        array = tokens.stack(trial=("image", "token")).transpose("trial", "layer", "feature").rename(layer="time")
        array = array.drop_vars(["trial", "image", "token"]).assign_coords(
            image=("trial", np.repeat(dataset["image"].values, len(positions))),
            token=("trial", np.tile(dataset["token"].values[positions], dataset.sizes["image"])),
        )
        image_index = np.repeat(np.arange(dataset.sizes["image"]), len(positions))
        per_trial = {}
    else:
        raise ValueError(f"unknown view {view!r}; choose from {', '.join(VIEWS)}")
    array = array.assign_coords(per_trial)
    for name in ("image_id", "label"):
        if name in dataset.coords:
            values = np.asarray(dataset[name].values)
            values = values if values.dtype.kind in "iuf" else plain_strings(values)
            array = array.assign_coords({name: ("trial", values[image_index])})
    array = array.astype(np.float32)
    if sphere:
        norm = np.sqrt((array**2).sum("feature"))
        array = array / norm.where(norm > 0, 1.0)
    array.attrs = {
        "view": view,
        "sphere": sphere,
        "model": str(dataset.attrs.get("model")),
        "weights_sha256": str(dataset.attrs.get("weights_sha256")),
    }
    if n_components:
        array = _project(array, n_components)
    return array


def _project(array: xr.DataArray, n_components: int) -> xr.DataArray:
    """Project features on the top principal directions of all (trial, time) rows."""
    n_features = array.sizes["feature"]
    if not 0 < n_components <= n_features:
        raise ValueError(f"n_components must be in 1..{n_features}, got {n_components}")
    rows = array.data.reshape(-1, n_features).astype(np.float64)
    mean, scatter, count = da.compute(rows.mean(axis=0), rows.T @ rows, rows.shape[0])
    eigenvalues, eigenvectors = np.linalg.eigh(scatter / count - np.outer(mean, mean))
    order = np.argsort(eigenvalues)[::-1][:n_components]
    basis = eigenvectors[:, order].astype(np.float32)
    projected = xr.DataArray(
        da.einsum("ntf,fc->ntc", array.data - mean.astype(np.float32), basis),
        dims=("trial", "time", "component"),
        coords={**{k: v for k, v in array.coords.items()}, "component": np.arange(1, n_components + 1)},
    )
    return projected.assign_attrs(
        array.attrs,
        components=basis.tolist(),
        explained_variance_ratio=(eigenvalues[order] / eigenvalues.sum()).tolist(),
    )


def export_trajectories(
    dataset: xr.Dataset,
    out: str | Path,
    view: str = "cls",
    *,
    sphere: bool = False,
    n_components: int | None = None,
    progress: bool = True,
) -> list[Path]:
    """Write `trajectories` to ``out/trajectories_<view>.npy`` (streamed) and a ``.json`` beside it.

    Returns
    -------
    list of Path
        The ``.npy`` array (trial, time, feature) float32 and its ``.json`` description
        (view, dims, time = layers, per-trial image ids, labels and tokens, projection).
    """
    array = trajectories(dataset, view, sphere=sphere, n_components=n_components)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"trajectories_{view}{'_sphere' if sphere else ''}{f'_pca{n_components}' if n_components else ''}"
    array_path, meta_path = out / f"{stem}.npy", out / f"{stem}.json"
    target = np.lib.format.open_memmap(array_path, mode="w+", dtype=np.float32, shape=array.shape)
    client = cluster_client()
    if client is not None:  # workers compute chunks of trials; this process writes them
        _store_from_cluster(client, array.data, target, progress)
    elif progress:
        with ProgressBar(minimum=1):
            da.store(array.data, target, lock=True)
    else:
        da.store(array.data, target, lock=True)
    target.flush()
    del target
    description = {
        "file": array_path.name,
        "dims": list(array.dims),
        "shape": list(array.shape),
        "time_layers": array["time"].values.tolist(),
        **{name: array[name].values.tolist() for name in ("image", "image_id", "label", "token") if name in array.coords},
        **array.attrs,
    }
    meta_path.write_text(json.dumps(description, default=str))
    return [array_path, meta_path]


def _store_from_cluster(client, array: da.Array, target: np.ndarray, progress: bool) -> None:
    """Write ``array`` into a local ``target`` a chunk of trials at a time, computed on the cluster.

    (``da.store`` would send the memory-mapped target to the workers and write their copies.)
    """
    from distributed import as_completed

    edges = np.cumsum((0,) + array.chunks[0])
    pending = {client.compute(array[a:b]): slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])}
    for future in tqdm(as_completed(pending), total=len(pending), desc="export", disable=not progress, leave=False):
        target[pending.pop(future)] = future.result()
