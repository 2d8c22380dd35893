"""Reading a trajectory store a chunk at a time, and the small sphere helpers the analyses share.

Store-only analyses walk the store one block of images at a time (the store's own chunks along
``image``) and, inside a block, one layer at a time, so memory holds a few chunks, never the
whole of ``hidden``. Every chunk is cast to float64 before any arithmetic, so a float16 store
gives the same statistics as a float32 one up to its rounding.

`fold_image_blocks` is the one loop over blocks they share: in this process, or, when a
``distributed.Client`` is the default client, as tasks on its workers (each reads its own
chunks; only small per-block partial results travel), with the same numbers either way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import dask
import numpy as np
import xarray as xr
from tqdm.auto import tqdm

Partial = dict  # str -> numpy array (summed over blocks) or list (concatenated over blocks)

TOKEN_KINDS = ("cls", "dist", "register", "patch")


def image_blocks(dataset: xr.Dataset, variable: str = "hidden") -> list[slice]:
    """Slices along ``image`` that follow ``variable``'s chunks (one slice if not chunked)."""
    data = dataset[variable].data
    chunks = getattr(data, "chunks", None)
    if chunks is None:
        return [slice(0, dataset.sizes["image"])]
    edges = np.cumsum((0,) + chunks[dataset[variable].dims.index("image")])
    return [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def fold_image_blocks(
    compute: Callable[[xr.Dataset], Partial],
    dataset: xr.Dataset,
    *,
    blocks: list[slice] | None = None,
    finish: Callable[[Partial], object] | None = None,
    description: str = "blocks",
    progress: bool = True,
):
    """Fold ``compute`` over blocks of images, in block order, here or on a dask cluster.

    Parameters
    ----------
    compute : callable
        ``compute(dataset.isel(image=block)) -> partial``, a dict whose values are numpy arrays
        or numbers (summed over blocks) or lists (concatenated over blocks, e.g.
        ``[per_image_array]``). It reads only its own block. On a cluster it is pickled, so
        make it a module-level function (or a `functools.partial` of one).
    dataset : xarray.Dataset
        A trajectory dataset, dask-backed (a lazily opened store) or in memory.
    blocks : list of slice, optional
        Blocks along ``image``; default `image_blocks` (the store's own chunks of ``hidden``).
    finish : callable, optional
        Applied to the folded total before it is returned (on the cluster, on a worker, so
        that only its result travels back: e.g. spectra of a large accumulator).
    description : str
        Label of the progress bar (one step per block folded).
    progress : bool
        Show a progress bar.

    Returns
    -------
    The folded partial (``finish(total)`` with ``finish``).

    Notes
    -----
    Without a client, blocks are read and folded one at a time, so memory holds one block and
    the running total. When ``distributed.default_client()`` finds a client, each block is one
    task that receives only its slice of the dataset's graph (``dask.optimize``) and computes
    it with dask's synchronous scheduler inside the task (no tasks submitted from tasks); the
    partials are folded on the workers in block order by a chain of tasks, so the total is
    summed in the same order as here and the numbers are the same; the client gathers only
    the final result. Every worker must be able to read the store's path.
    """
    blocks = image_blocks(dataset) if blocks is None else blocks
    finish = finish or _unchanged
    client = cluster_client()
    with progress_bar(len(blocks), description, progress) as bar:
        if client is None:
            total = None
            for images in blocks:
                part = compute(dataset.isel(image=images))
                total = part if total is None else _add_partials(total, part, in_place=True)
                bar.update()
            return finish(total)
        return _fold_on_cluster(client, compute, dataset, blocks, finish, bar)


def _fold_on_cluster(client, compute, dataset, blocks, finish, bar):
    """`fold_image_blocks` on a distributed client: one task per block, a chain of sums."""
    from distributed import as_completed

    folded = []  # futures, one per block: its partial added to the total so far
    total = None
    for images in blocks:
        (block,) = dask.optimize(dataset.isel(image=images))
        part = client.submit(_compute_block, compute, block, pure=False)
        # a fold step outranks further blocks, so partials are summed as they arrive
        total = part if total is None else client.submit(_add_partials, total, part, pure=False, priority=1)
        folded.append(total)
    del part
    result = client.submit(finish, total, pure=False, priority=1)
    del total
    finished = as_completed(folded)
    folded.clear()  # from here only `finished` holds each running total, until it is folded in
    for _ in finished:
        bar.update()
    return result.result()


def cluster_client():
    """The default ``distributed.Client``, or None (no client, or distributed not installed)."""
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        return None


def _compute_block(compute, block: xr.Dataset) -> Partial:
    """One block's partial, read and computed inside this task (no nested cluster tasks)."""
    with dask.config.set(scheduler="synchronous"):
        return compute(block)


def _add_partials(total: Partial, part: Partial, in_place: bool = False) -> Partial:
    """Sum arrays and numbers, concatenate lists; ``in_place`` reuses ``total``'s arrays."""
    if total.keys() != part.keys():
        raise ValueError(f"partials of different blocks hold different keys: {sorted(total)} vs {sorted(part)}")
    if not in_place:
        return {key: total[key] + part[key] for key in total}
    for key, value in part.items():
        if isinstance(total[key], np.ndarray) and total[key].flags.writeable:
            np.add(total[key], value, out=total[key])  # the same sum as total + part, without a copy
        else:
            total[key] = total[key] + value
    return total


def _unchanged(total: Partial) -> Partial:
    return total


def token_groups(dataset: xr.Dataset) -> dict[str, np.ndarray]:
    """Positions along ``token`` of each token kind present, in the order cls, dist, register, patch."""
    kinds = plain_strings(dataset["token_kind"].values)
    return {kind: np.flatnonzero(kinds == kind) for kind in TOKEN_KINDS if (kinds == kind).any()}


def layer_states(block: xr.Dataset, variable: str = "hidden") -> Iterator[np.ndarray]:
    """Yield ``variable`` of a block of images, one layer at a time, as float64.

    Yields
    ------
    numpy.ndarray
        (image, token, feature) for ``hidden``, (image, feature) for a reduced view.
    """
    array = block[variable]
    for index in range(block.sizes["layer"]):
        yield np.asarray(array.isel(layer=index).values, dtype=np.float64)


def read_block(block: xr.Dataset, variable: str) -> np.ndarray:
    """A small per-image variable (a reduced view) of a block of images, as float64."""
    return np.asarray(block[variable].values, dtype=np.float64)


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
