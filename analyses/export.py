"""Trajectories as (trial, time, feature) arrays for other dynamics tools (e.g. DSA), kept lazy and
streamed into a ``.npy`` file with a ``.json`` that says what each axis holds.
"""

from __future__ import annotations

import json
from pathlib import Path

import dask.array as da
import numpy as np
import xarray as xr
from dask.diagnostics import ProgressBar

from analyses.streaming import Accumulator, Chunk, contiguous, image_coords, principal_directions, stream
from dynamo.blocks import cluster_client
from dynamo.layout import REDUCED_VIEWS, TOKEN_KINDS, token_groups
from dynamo.progress import progress_bar

DESCRIPTION = ("Trajectories as (trial, time, feature) arrays, optionally on the sphere and on principal directions, "
               "for other dynamics tools.")
TOKEN_VIEWS = tuple(kind for kind in TOKEN_KINDS if kind != "cls")  # one trial per token (cls: the `cls` view)
VIEWS = REDUCED_VIEWS + TOKEN_VIEWS


def trajectories(ds: xr.Dataset, view: str = "cls", *, sphere: bool = False, n_components: int | None = None) -> xr.DataArray:
    """A lazy (trial, time, feature) float32 array of trajectories; time is the layer.

    Parameters
    ----------
    view : str
        A reduced view (``cls``, ``patch_mean``, ``register_mean``: one trial per image) or a token
        kind (``dist``, ``register``, ``patch``: one trial per token per image).
    sphere : bool
        Divide every state by its norm first.
    n_components : int, optional
        Project on this many principal directions of all (trial, time) states; ``feature`` becomes
        ``component``, and attrs hold ``components`` and ``explained_variance_ratio``.
    """
    if view in REDUCED_VIEWS:
        if view not in ds.data_vars:
            raise ValueError(f"the store has no {view!r} view; record it again with a current dynamo")
        array = ds[view].rename(image="trial", layer="time")
        per_trial = {"image": ("trial", ds["image"].values)}
        image_index = np.arange(ds.sizes["image"])
    elif view in TOKEN_VIEWS:
        groups = token_groups(ds["token_kind"])
        if view not in groups:
            raise ValueError(f"the store has no {view!r} tokens; its token kinds are {list(groups)}")
        positions = groups[view]
        tokens = ds["hidden"].isel(token=positions).drop_vars([c for c in ds["hidden"].coords if c not in ("image", "layer", "token")])
        array = tokens.stack(trial=("image", "token")).transpose("trial", "layer", "feature").rename(layer="time")
        array = array.drop_vars(["trial", "image", "token"]).assign_coords(
            image=("trial", np.repeat(ds["image"].values, len(positions))),
            token=("trial", np.tile(ds["token"].values[positions], ds.sizes["image"])),
        )
        image_index = np.repeat(np.arange(ds.sizes["image"]), len(positions))
        per_trial = {}
    else:
        raise ValueError(f"unknown view {view!r}; choose from {', '.join(VIEWS)}")
    coords = image_coords(ds)
    array = array.assign_coords(per_trial).assign_coords(
        {name: ("trial", coords[name][image_index]) for name in ("image_id", "label") if name in coords}
    )
    array = array.astype(np.float32)
    if sphere:
        norm = np.sqrt((array**2).sum("feature"))
        array = array / norm.where(norm > 0, 1.0)
    array.attrs = {"view": view, "sphere": sphere, "model": str(ds.attrs.get("model")),
                   "weights_sha256": str(ds.attrs.get("weights_sha256"))}
    if n_components:
        array = _project(array, n_components)
    return array


def _project(array: xr.DataArray, n_components: int) -> xr.DataArray:
    """Project features on the top principal directions of all (trial, time) rows."""
    rows = array.data.reshape(-1, array.sizes["feature"]).astype(np.float64)
    scatter, total = da.compute(rows.T @ rows, rows.sum(axis=0))
    mean, basis, explained = principal_directions(scatter, total, rows.shape[0], n_components)
    basis = basis.astype(np.float32)
    projected = xr.DataArray(
        da.einsum("ntf,fc->ntc", array.data - mean.astype(np.float32), basis),
        dims=("trial", "time", "component"),
        coords={**{k: v for k, v in array.coords.items()}, "component": np.arange(1, n_components + 1)},
    )
    return projected.assign_attrs(array.attrs, components=basis.tolist(), explained_variance_ratio=explained.tolist())


def export_trajectories(ds: xr.Dataset, out: str | Path, view: str = "cls", *, sphere: bool = False,
                        n_components: int | None = None, progress: bool = True) -> list[Path]:
    """Write `trajectories` to ``out/trajectories_<view>.npy`` (streamed) and a ``.json`` beside it; both paths.

    A token view without projection is written inside the store's one pass (`Export`, `in_one_pass`).
    """
    if in_one_pass(view, n_components):
        return stream(ds, {"export": Export(ds, out, view, sphere=sphere)}, description="export", progress=progress)["export"]
    array = trajectories(ds, view, sphere=sphere, n_components=n_components)
    target, paths = _target(array, out)
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
    return _describe(array, paths)


def in_one_pass(view: str, n_components: int | None = None) -> bool:
    """Whether `Export` writes this export during the one pass: a token view, unprojected, in this process."""
    return view in TOKEN_VIEWS and not n_components and cluster_client() is None


class Export(Accumulator):
    """`export_trajectories` of an unprojected token view as a share of `analyses.streaming.stream`:
    each chunk is written into the ``.npy`` as it is read; a local file, so in this process only.
    """

    def __init__(self, ds: xr.Dataset, out: str | Path, view: str, *, sphere: bool = False):
        if not in_one_pass(view):
            raise ValueError(f"the one pass exports unprojected token views ({', '.join(TOKEN_VIEWS)}) in this process; "
                             f"use export_trajectories for {view!r}")
        self.array = trajectories(ds, view, sphere=sphere)  # lazy: its shape, coords and attrs
        self.positions = contiguous(token_groups(ds["token_kind"])[view])
        self.images, self.sphere = ds["image"].values, sphere
        target, self.paths = _target(self.array, out)
        del target  # created at its full size; blocks reopen it

    def open_block(self, block: xr.Dataset, total: dict) -> dict:
        order = np.argsort(self.images, kind="stable")
        first = int(order[np.searchsorted(self.images, block["image"].values[0], sorter=order)])
        n_tokens = len(self.array["trial"]) // len(self.images)
        trials = slice(first * n_tokens, (first + block.sizes["image"]) * n_tokens)
        return {"target": np.load(self.paths[0], mmap_mode="r+"), "trials": trials}

    def update(self, state: dict, chunk: Chunk, previous: Chunk | None, final: Chunk | None) -> None:
        states = chunk.directions(self.positions) if self.sphere else chunk.states[:, self.positions]
        state["target"][state["trials"], chunk.index] = states.reshape(-1, states.shape[-1])

    def close_block(self, state: dict, total: dict) -> None:
        state["target"].flush()
        state.clear()

    def finish(self, total: dict, dataset: xr.Dataset) -> list[Path]:
        return _describe(self.array, self.paths)


def _target(array: xr.DataArray, out: str | Path) -> tuple[np.ndarray, tuple[Path, Path]]:
    """The ``.npy`` float32 memory map for ``array`` under ``out``, and its and the ``.json``'s paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    attrs = array.attrs
    components = array.sizes.get("component")
    stem = f"trajectories_{attrs['view']}{'_sphere' if attrs['sphere'] else ''}{f'_pca{components}' if components else ''}"
    array_path, meta_path = out / f"{stem}.npy", out / f"{stem}.json"
    return np.lib.format.open_memmap(array_path, mode="w+", dtype=np.float32, shape=array.shape), (array_path, meta_path)


def _describe(array: xr.DataArray, paths: tuple[Path, Path]) -> list[Path]:
    """Write the ``.json`` naming each axis of the exported ``array``; both paths."""
    array_path, meta_path = paths
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
    """Write ``array`` into a local ``target`` a chunk of trials at a time, computed on the cluster
    (``da.store`` would write the workers' copies of the memory map).
    """
    from distributed import as_completed

    edges = np.cumsum((0,) + array.chunks[0])
    pending = {client.compute(array[a:b]): slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])}
    for future in progress_bar(as_completed(pending), total=len(pending), desc="export", enabled=progress, leave=False):
        target[pending.pop(future)] = future.result()
