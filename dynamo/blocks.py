"""Reading a trajectory store a block of images at a time, here or on a dask cluster, with the same numbers."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import dask
import numpy as np
import xarray as xr

from dynamo.progress import progress_bar

Partial = dict  # str -> numpy array (summed over blocks) or list (concatenated over blocks)


def add_partials(total: Partial, part: Partial, in_place: bool = False) -> Partial:
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


def image_blocks(dataset: xr.Dataset, variable: str = "hidden") -> list[slice]:
    """Slices along ``image`` that follow ``variable``'s chunks (one slice if not chunked)."""
    data = dataset[variable].data
    chunks = getattr(data, "chunks", None)
    if chunks is None:
        return [slice(0, dataset.sizes["image"])]
    edges = np.cumsum((0,) + chunks[dataset[variable].dims.index("image")])
    return [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def fold_image_blocks(compute: Callable[[xr.Dataset], Partial], dataset: xr.Dataset, *, blocks: list[slice] | None = None,
                      finish: Callable[[Partial], object] | None = None, description: str = "blocks", progress: bool = True):
    """Fold ``compute`` over blocks of images (default `image_blocks`), in block order, here or on a dask cluster.

    ``compute(dataset.isel(image=block))`` returns a dict of arrays or numbers (summed) or lists
    (concatenated); on a cluster it is pickled (a module-level function or a partial of one), each
    block is a task and the partials are folded on the workers in block order, so the numbers equal
    the in-process ones. ``finish`` is applied to the total (on a worker: only its result travels).
    """
    blocks = image_blocks(dataset) if blocks is None else blocks
    client = cluster_client()
    with progress_bar(total=len(blocks), desc=description, enabled=progress, leave=False) as bar:
        if client is None:
            total = None
            for images in blocks:
                part = compute(dataset.isel(image=images))
                total = part if total is None else add_partials(total, part, in_place=True)
                bar.update()
            return (finish or _unchanged)(total)
        return fold_on_cluster(client, compute, dataset, blocks, bar, finish)


def fold_on_cluster(client, compute, dataset, blocks, bar, finish=None, merge=add_partials):
    """`fold_image_blocks` on a distributed client: one task per block, a chain of ``merge``s."""
    from distributed import as_completed

    finish = finish or _unchanged

    folded = []  # futures, one per block: its partial added to the total so far
    total = None
    for images in blocks:
        (block,) = dask.optimize(dataset.isel(image=images))
        part = client.submit(_compute_block, compute, block, pure=False)
        # a fold step outranks further blocks, so partials are summed as they arrive
        total = part if total is None else client.submit(merge, total, part, pure=False, priority=1)
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


def _unchanged(total: Partial) -> Partial:
    return total


def layer_states(block: xr.Dataset, variable: str = "hidden") -> Iterator[np.ndarray]:
    """Yield ``variable`` of a block of images one layer at a time, as float64 (image, token, feature) or (image, feature)."""
    array = block[variable]
    for index in range(block.sizes["layer"]):
        yield finite(np.asarray(array.isel(layer=index).values, dtype=np.float64), array.isel(layer=index))


def finite(values: np.ndarray, where: xr.DataArray) -> np.ndarray:
    """``values`` (read from ``where``, image first) if all are finite; else a one-line `ValueError`
    naming the variable, its layer(s) and the images.
    """
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


def unit(x: np.ndarray) -> np.ndarray:
    """Unit vectors along the last axis; zero vectors stay zero."""
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)
