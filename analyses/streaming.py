"""Reading a trajectory store a chunk at a time, and the small helpers the analyses share.

Store-only analyses walk the store one block of images at a time (the store's own chunks along
``image``) and, inside a block, one layer at a time, so memory holds a few chunks, never the
whole of ``hidden``. Every chunk is cast to float64 before any arithmetic, so a float16 store
gives the same statistics as a float32 one up to its rounding.

`fold_image_blocks` is the one loop over blocks they share: in this process, or, when a
``distributed.Client`` is the default client, as tasks on its workers (each reads its own
chunks; only small per-block partial results travel), with the same numbers either way.
`principal_directions` is the one PCA of the analyses, from moments summed a block at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import dask
import numpy as np
import xarray as xr
from tqdm.auto import tqdm

Partial = dict  # str -> numpy array (summed over blocks) or list (concatenated over blocks)
IMAGE_COORDS = ("label", "label_name", "image_id")


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


def layer_states(block: xr.Dataset, variable: str = "hidden") -> Iterator[np.ndarray]:
    """Yield ``variable`` of a block of images, one layer at a time, as float64.

    Yields
    ------
    numpy.ndarray
        (image, token, feature) for ``hidden``, (image, feature) for a reduced view.
    """
    array = block[variable]
    for index in range(block.sizes["layer"]):
        yield finite(np.asarray(array.isel(layer=index).values, dtype=np.float64), array.isel(layer=index))


def read_block(block: xr.Dataset, variable: str) -> np.ndarray:
    """A small per-image variable (a reduced view) of a block of images, as float64."""
    return finite(np.asarray(block[variable].values, dtype=np.float64), block[variable])


def finite(values: np.ndarray, where: xr.DataArray) -> np.ndarray:
    """``values`` (read from ``where``, image first) if all are finite; else a one-line `ValueError`
    naming the variable, its layer(s) and the images, so a damaged store never yields numbers."""
    bad = ~np.isfinite(values)
    if not bad.any():
        return values
    images = where["image"].values[bad.reshape(len(values), -1).any(1)]
    if "layer" in where.dims:
        axis = where.dims.index("layer")
        layers = where["layer"].values[bad.any(axis=tuple(i for i in range(bad.ndim) if i != axis))].tolist()
    else:
        layers = where["layer"].values.tolist() if "layer" in where.coords else "all"
    raise ValueError(
        f"the store holds non-finite values (NaN or inf) in `{where.name}` at layer(s) {layers}, images "
        f"{images.min()}-{images.max()} ({len(images)} images): re-record them (`dynamo record` the same "
        "command with --overwrite, or into a new store); if they come back, the model produces them"
    )


def principal_directions(scatter: np.ndarray, total: np.ndarray, count: int, n_components: int):
    """Principal directions of a set of rows, from moments summed over them a block at a time.

    Parameters
    ----------
    scatter : numpy.ndarray, (feature, feature)
        Sum over the rows x of the outer products x xᵀ.
    total : numpy.ndarray, (feature,)
        Sum of the rows.
    count : int
        Number of rows.
    n_components : int
        Number of directions, 1..feature.

    Returns
    -------
    mean : numpy.ndarray, (feature,)
        Mean row.
    components : numpy.ndarray, (feature, n_components)
        Unit principal directions as columns, by decreasing variance, each signed so that its
        largest-magnitude entry is positive.
    explained_variance_ratio : numpy.ndarray, (n_components,)
        Variance along each direction over the total variance (nan when the rows do not vary).

    Raises
    ------
    ValueError
        If ``n_components`` is not in 1..feature.
    """
    n_features = len(total)
    if not 0 < n_components <= n_features:
        raise ValueError(f"n_components must be in 1..{n_features}, got {n_components}")
    mean = total / count
    eigenvalues, eigenvectors = np.linalg.eigh((scatter - count * np.outer(mean, mean)) / count)
    order = np.argsort(eigenvalues)[::-1][:n_components]
    components = eigenvectors[:, order]
    components *= np.sign(components[np.abs(components).argmax(axis=0), range(n_components)])
    with np.errstate(invalid="ignore", divide="ignore"):
        return mean, components, eigenvalues[order] / eigenvalues.sum()


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


def image_coords(dataset: xr.Dataset) -> dict[str, np.ndarray]:
    """The store's per-image coordinates present (``label``, ``label_name``, ``image_id``), as plain (image,) arrays."""
    coords = {name: np.asarray(dataset[name].values) for name in IMAGE_COORDS if name in dataset.coords}
    return {name: v if v.dtype.kind in "iuf" else np.array(v.tolist(), dtype=str) for name, v in coords.items()}


def rounded(value):
    """A headline number for `summarize`: floats (also in arrays and lists) to 4 significant digits, nan to None."""
    if isinstance(value, np.ndarray | list | tuple):
        return [rounded(item) for item in value]
    if isinstance(value, float | np.floating):
        return float(f"{value:.4g}") if np.isfinite(value) else None
    return value.item() if isinstance(value, np.generic) else value


def provenance(dataset: xr.Dataset) -> dict:
    """Attrs that say which model's trajectories a result was computed from."""
    return {key: str(dataset.attrs.get(key)) for key in ("model", "weights_sha256") if key in dataset.attrs}


def progress_bar(total: int, description: str, enabled: bool):
    """A tqdm bar over ``total`` steps (silent when not ``enabled``)."""
    return tqdm(total=total, desc=description, disable=not enabled, leave=False)
