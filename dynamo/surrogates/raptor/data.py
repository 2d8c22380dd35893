"""Training batches of trajectory segments: a chunk-aware order that depends only on (seed, epoch), served
by a DataLoader whose reader process reads each chunk once and frees it after its last batch."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator

import dask
import numpy as np
import torch
import xarray as xr
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["PlannedBatches", "TrajectorySegments", "batch_plan", "trajectory_loader"]


def batch_plan(
    images: np.ndarray, chunk_size: int, batch_size: int, seed: int, epoch: int, buffer_chunks: int
) -> list[np.ndarray]:
    """The batches of one epoch, arrays of positions in ``images``, a function of ``seed`` and ``epoch`` alone.

    ``buffer_chunks`` chunks of ``chunk_size`` images are shuffled together; the incomplete last batch is dropped.
    """
    rng = np.random.default_rng([seed, epoch])
    chunks = np.unique(images // chunk_size)
    rng.shuffle(chunks)
    order = []
    for group in range(0, len(chunks), buffer_chunks):
        rows = images[np.isin(images // chunk_size, chunks[group : group + buffer_chunks])]
        order.append(rng.permutation(rows))
    order = np.concatenate(order)
    return [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]


class PlannedBatches(Sampler):
    """Endless `batch_plan` batches from ``first_step`` on, yielding ``(images, done)``: positions and the chunks they finish."""

    def __init__(self, images, chunk_size: int, batch_size: int, seed: int, first_step: int = 0, buffer_chunks: int = 4):
        self.images = np.sort(np.asarray(images, dtype=np.int64))
        self.chunk_size, self.batch_size, self.seed = chunk_size, batch_size, seed
        self.first_step, self.buffer_chunks = first_step, buffer_chunks

    def __iter__(self) -> Iterator[tuple[np.ndarray, list[int]]]:
        skip, epoch = self.first_step, 0
        while True:
            plan = batch_plan(self.images, self.chunk_size, self.batch_size, self.seed, epoch, self.buffer_chunks)
            last = {chunk: index for index, batch in enumerate(plan) for chunk in np.unique(batch // self.chunk_size).tolist()}
            done = [[] for _ in plan]
            for chunk, index in last.items():
                done[index].append(chunk)
            yield from zip(plan[skip:], done[skip:])
            skip, epoch = max(0, skip - len(plan)), epoch + 1


class TrajectorySegments(Dataset):
    """Layers ``start..stop`` of a dataset's images, read a chunk at a time: item ``(images, done)`` -> (B, stop - start + 1, T, D)."""

    def __init__(self, hidden: xr.DataArray, start: int, stop: int, chunk_size: int):
        self.hidden = hidden.isel(layer=slice(start, stop + 1))
        self.chunk_size = chunk_size
        self.chunks: dict[int, np.ndarray] = {}

    def __getitem__(self, item: tuple[np.ndarray, list[int]]) -> torch.Tensor:
        images, done = item
        chunks, offsets = np.divmod(images, self.chunk_size)
        for chunk in set(chunks.tolist()) - self.chunks.keys():
            rows = slice(chunk * self.chunk_size, (chunk + 1) * self.chunk_size)
            with dask.config.set(scheduler="synchronous"):  # dask's thread pool does not survive a fork
                self.chunks[chunk] = np.asarray(self.hidden[rows].values, dtype=np.float32)
        batch = torch.from_numpy(np.stack([self.chunks[c][o] for c, o in zip(chunks, offsets)]))
        for chunk in done:
            self.chunks.pop(chunk, None)
        return batch


def trajectory_loader(
    ds: xr.Dataset,
    images,
    start: int,
    stop: int,
    batch_size: int,
    seed: int = 0,
    first_step: int = 0,
    buffer_chunks: int = 4,
    workers: int = 1,
    prefetch: int = 4,
) -> DataLoader:
    """A DataLoader of endless shuffled (batch_size, stop - start + 1, T, D) float32 batches of ``hidden[images, start..stop]``.

    ``images`` are positions; ``first_step`` batches are skipped (resume) without reading; ``buffer_chunks`` chunks are
    shuffled together; ``workers`` reader processes (0: this one) keep ``prefetch`` batches each ready.
    """
    if len(images) < batch_size:
        raise ValueError(f"{len(images)} training images are fewer than batch_size={batch_size}; lower --batch-size")
    hidden = _stored_hidden(ds)
    chunk_size = int(hidden.encoding.get("chunks", [len(images)])[0])
    return DataLoader(
        TrajectorySegments(hidden, start, stop, chunk_size),
        sampler=PlannedBatches(images, chunk_size, batch_size, seed, first_step, buffer_chunks),
        batch_size=None,
        num_workers=workers,
        prefetch_factor=prefetch if workers else None,
        multiprocessing_context=reader_context() if workers else None,
        generator=torch.Generator().manual_seed(seed),  # leaves the global torch RNG alone
    )


def reader_context():
    """The reader processes' start method: fork where the platform has it, whatever the caller's default.

    A loader is made per training segment; under ``spawn`` (the default inside a spawned worker, e.g. a
    ``ProcessPoolExecutor`` running fits) each reader would import torch again, costing seconds per segment.
    """
    return multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None


def _stored_hidden(ds: xr.Dataset) -> xr.DataArray:
    """``ds.hidden``, read from the dataset's store without dask where it has one (dask costs ms a chunk)."""
    source = ds.encoding.get("source")
    if source is None:
        return ds["hidden"]
    hidden = xr.open_zarr(source, chunks=None, consolidated=False)["hidden"]
    return hidden if hidden.sizes["image"] == ds.sizes["image"] else hidden.isel(image=ds["image"].values)
