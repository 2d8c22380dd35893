"""The one pass over a store's ``hidden`` that feeds every accumulator, and small helpers the analyses share."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
import xarray as xr
from threadpoolctl import threadpool_limits

from dynamo.blocks import Partial, add_partials, cluster_client, finite, fold_on_cluster, image_blocks
from dynamo.progress import progress_bar

IMAGE_COORDS = ("label", "label_name", "image_id")


class Chunk:
    """One layer of ``hidden`` for a block of images, decoded once to float32 and checked finite (`finite`).

    ``states`` is (image, token, feature), ``norms`` (image, token); ``index`` is the layer's position.
    """

    def __init__(self, values: np.ndarray, index: int, where: xr.DataArray):
        self.index = index
        self.states = np.asarray(values, dtype=np.float32)
        squared = np.einsum("itf,itf->it", self.states, self.states)
        if not np.isfinite(squared).all():  # a NaN or inf in a token makes its squared norm one
            finite(self.states, where)  # raises, naming the layer and the images
            squared = np.einsum("itf,itf->it", self.states.astype(np.float64), self.states)  # float32 overflow only
        self.norms = np.sqrt(squared).astype(np.float32)

    def directions(self, tokens=slice(None)) -> np.ndarray:
        """Unit vectors of the states of ``tokens`` (image, token, feature); zero vectors stay zero."""
        norms = self.norms[:, tokens, None]
        return np.divide(self.states[:, tokens], norms, out=np.zeros_like(self.states[:, tokens]), where=norms > 0)


def cosines(a: Chunk, b: Chunk) -> np.ndarray:
    """(image, token) cosine between the same tokens in two chunks of one block (0 for a zero vector)."""
    dots = np.einsum("itf,itf->it", a.states, b.states)
    scale = a.norms * b.norms
    return np.divide(dots, scale, out=np.zeros_like(dots), where=scale > 0)


class Accumulator:
    """One analysis' share of `stream`, the one pass over ``hidden``.

    Per block of images `stream` calls ``state = open_block(block, total)``, ``update(state, chunk,
    previous, final)`` per layer in order (``final`` is the last layer when ``reads_final``), and
    ``close_block(state, total)``; then ``finish(total, dataset)``. On a cluster each block starts
    from its own ``start()`` and ``merge(total, part)`` must give the numbers of the in-place
    additions. Subclasses are pickled to the workers: keep them small.
    """

    reads_final = False  # the last layer is read first and given to every `update` as ``final``

    def start(self) -> Partial:
        return {}

    def open_block(self, block: xr.Dataset, total: Partial):
        return {}

    def update(self, state, chunk: Chunk, previous: Chunk | None, final: Chunk | None) -> None:
        raise NotImplementedError

    def close_block(self, state, total: Partial) -> None:
        add_partials(total, state, in_place=True) if total else total.update(state)

    def merge(self, total: Partial, part: Partial) -> Partial:
        return add_partials(total, part)

    def finish(self, total: Partial, dataset: xr.Dataset) -> xr.Dataset:
        raise NotImplementedError


def stream(dataset: xr.Dataset, accumulators: dict[str, Accumulator], *, description: str = "reading hidden",
           progress: bool = True) -> dict[str, xr.Dataset]:
    """Read every chunk of ``hidden`` once and feed it to every accumulator; each one's ``finish``.

    In this process the next layer is read by a helper thread while the current one is computed; with
    a ``distributed`` default client, blocks are merged on the workers in block order (`fold_image_blocks`).
    """
    blocks = image_blocks(dataset)
    client = cluster_client()
    with progress_bar(total=len(blocks), desc=description, enabled=progress, leave=False) as bar:
        if client is None:
            totals = {name: accumulator.start() for name, accumulator in accumulators.items()}
            with ThreadPoolExecutor(max_workers=1) as reader:
                for images in blocks:
                    _stream_block(dataset.isel(image=images), accumulators, totals, reader)
                    bar.update()
        else:
            totals = fold_on_cluster(client, partial(_block_totals, accumulators=accumulators), dataset, blocks, bar,
                                     merge=partial(_merge_totals, accumulators=accumulators))
    return {name: accumulator.finish(totals[name], dataset) for name, accumulator in accumulators.items()}


def _block_totals(block: xr.Dataset, accumulators: dict[str, Accumulator]) -> dict[str, Partial]:
    """One block closed into fresh totals (a cluster task)."""
    totals = {name: accumulator.start() for name, accumulator in accumulators.items()}
    with ThreadPoolExecutor(max_workers=1) as reader:
        _stream_block(block, accumulators, totals, reader)
    return totals


def _merge_totals(total: dict, part: dict, accumulators: dict[str, Accumulator]) -> dict:
    return {name: accumulator.merge(total[name], part[name]) for name, accumulator in accumulators.items()}


def _stream_block(block: xr.Dataset, accumulators: dict[str, Accumulator], totals: dict, reader) -> None:
    """Read a block's layers once, in order, feeding every accumulator; close it into ``totals``.

    BLAS runs on one thread: the reader thread decodes the next layer on the other core.
    """
    with threadpool_limits(limits=1, user_api="blas"):
        _stream_layers(block, accumulators, totals, reader)


def _stream_layers(block: xr.Dataset, accumulators: dict[str, Accumulator], totals: dict, reader) -> None:
    states = {name: accumulator.open_block(block, totals[name]) for name, accumulator in accumulators.items()}
    last = block.sizes["layer"] - 1
    final = read_chunk(block, last) if any(a.reads_final for a in accumulators.values()) else None
    order = [index for index in range(last + 1) if not (final is not None and index == last)]
    pending = {index: reader.submit(_read_values, block, index) for index in order[:1]}
    previous = None
    for position, index in enumerate(order):
        if position + 1 < len(order):  # the next layer is read while this one is computed
            pending[order[position + 1]] = reader.submit(_read_values, block, order[position + 1])
        chunk = Chunk(pending.pop(index).result(), index, block["hidden"].isel(layer=index))
        for name, accumulator in accumulators.items():
            accumulator.update(states[name], chunk, previous, final)
        previous = chunk
    if final is not None:
        for name, accumulator in accumulators.items():
            accumulator.update(states[name], final, previous, final)
    for name, accumulator in accumulators.items():
        accumulator.close_block(states[name], totals[name])


def read_chunk(block: xr.Dataset, index: int) -> Chunk:
    """Layer ``index`` of ``hidden`` for a block of images, as a `Chunk`."""
    return Chunk(_read_values(block, index), index, block["hidden"].isel(layer=index))


def _read_values(block: xr.Dataset, index: int) -> np.ndarray:
    """One chunk of ``hidden`` in its stored dtype (read with dask's synchronous scheduler)."""
    data = block["hidden"].data[:, index]
    return np.asarray(data.compute(scheduler="synchronous") if hasattr(data, "dask") else data)


def contiguous(positions: np.ndarray) -> slice | np.ndarray:
    """``positions`` as a slice when they are a contiguous run (a view instead of a copy), else unchanged."""
    positions = np.asarray(positions)
    if len(positions) and (np.diff(positions) == 1).all():
        return slice(int(positions[0]), int(positions[-1]) + 1)
    return positions


def token_sample(n_tokens: int, per_image: int | None, images: np.ndarray, seed: int | tuple) -> np.ndarray | None:
    """Seeded subsets of a token kind's positions, one per image, or None to keep every token.

    Each image's subset depends only on ``seed`` and its position in ``images``, so it is the same
    in every block layout and on every worker; returns (image, per_image) sorted indices.
    """
    if per_image is None or per_image >= n_tokens:
        return None
    key = tuple(np.atleast_1d(seed).tolist())
    return np.stack([np.sort(np.random.default_rng([*key, int(image)]).choice(n_tokens, per_image, replace=False))
                     for image in images])


def read_block(block: xr.Dataset, variable: str) -> np.ndarray:
    """A small per-image variable (a reduced view) of a block of images, as float64."""
    return finite(np.asarray(block[variable].values, dtype=np.float64), block[variable])


def principal_directions(scatter: np.ndarray, total: np.ndarray, count: int, n_components: int):
    """Principal directions of rows from their moments: ``scatter`` Σxxᵀ (feature, feature), ``total`` Σx, ``count``.

    Returns
    -------
    mean : numpy.ndarray, (feature,)
    components : numpy.ndarray, (feature, n_components)
        Unit directions as columns by decreasing variance, each with its largest-magnitude entry positive.
    explained_variance_ratio : numpy.ndarray, (n_components,)
        nan when the rows do not vary.
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


def angle_deg(cosine: np.ndarray) -> np.ndarray:
    """Angle in degrees from a cosine, clipped to [-1, 1] against rounding."""
    return np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0)))


def image_coords(dataset: xr.Dataset) -> dict[str, np.ndarray]:
    """The store's per-image coordinates present (``label``, ``label_name``, ``image_id``), as plain (image,) arrays."""
    coords = {name: np.asarray(dataset[name].values) for name in IMAGE_COORDS if name in dataset.coords}
    return {name: v if v.dtype.kind in "iuf" else np.array(v.tolist(), dtype=str) for name, v in coords.items()}


def rounded(value):
    """A headline number: floats (also in arrays and lists) to 4 significant digits, nan to None."""
    if isinstance(value, np.ndarray | list | tuple):
        return [rounded(item) for item in value]
    if isinstance(value, float | np.floating):
        return float(f"{value:.4g}") if np.isfinite(value) else None
    return value.item() if isinstance(value, np.generic) else value


def provenance(dataset: xr.Dataset) -> dict:
    """Attrs that say which model's trajectories a result was computed from."""
    return {key: str(dataset.attrs.get(key)) for key in ("model", "weights_sha256") if key in dataset.attrs}
