"""Stream training batches of trajectory segments from a store, shuffled, with prefetch.

Following the paper's loader (contiguous chunks read in a shuffled chunk order), a batch plan is
drawn per epoch: the store's image chunks in a random order, grouped ``buffer_chunks`` at a time,
the chosen images of each group permuted, and the sequence cut into batches. A background thread
reads each chunk once (only the layers asked for), assembles batches and keeps up to ``prefetch``
ready; a chunk leaves memory as soon as its images are served, so memory is bounded by a few
chunks whatever the store's size. The plan depends only on (seed, epoch), so a stream can start
at any step without reading what comes before it: resuming a fit replays the same batches.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from dynamo.store import open_group

__all__ = ["TrajectoryStream", "batch_plan"]


def batch_plan(images: np.ndarray, chunk_size: int, batch_size: int, seed: int, epoch: int, buffer_chunks: int) -> list[np.ndarray]:
    """The batches of one epoch, as arrays of store rows.

    Parameters
    ----------
    images : numpy.ndarray
        Store rows (positions along ``image``) to draw from.
    chunk_size : int
        Images per chunk of the store's ``hidden``.
    batch_size : int
    seed, epoch : int
        The plan is a function of these alone.
    buffer_chunks : int
        Chunks whose images are shuffled together.

    Returns
    -------
    list of numpy.ndarray
        ``len(images) // batch_size`` batches (the incomplete last one is dropped).
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


class TrajectoryStream:
    """Endless shuffled batches of ``hidden[images, start..stop]`` as float32 tensors.

    Parameters
    ----------
    path : str or Path
        A trajectory store.
    images : array-like of int
        Store rows to train on (e.g. the recorded images of a training split).
    start, stop : int
        Layers ``start..stop`` (inclusive) of each image are served.
    batch_size : int
    seed : int
    first_step : int
        Skip this many batches (resume); no data are read for them.
    buffer_chunks : int
        Store chunks shuffled together (more mixes better, holds more in memory).
    prefetch : int
        Batches kept ready by the reader thread.

    Attributes
    ----------
    wait_seconds : float
        Total time the consumer spent waiting for a batch (loading stalls).
    waits : list of float
        The wait before each batch served.

    Yields
    ------
    torch.Tensor
        (batch_size, stop - start + 1, T, D) float32.
    """

    def __init__(
        self,
        path: str | Path,
        images,
        start: int,
        stop: int,
        batch_size: int,
        seed: int = 0,
        first_step: int = 0,
        buffer_chunks: int = 4,
        prefetch: int = 4,
    ):
        self.hidden = open_group(path)["hidden"]
        self.images = np.sort(np.asarray(images, dtype=np.int64))
        if len(self.images) < batch_size:
            raise ValueError(f"{len(self.images)} training images are fewer than batch_size={batch_size}; lower --batch-size")
        self.start, self.stop = start, stop
        self.batch_size, self.seed, self.first_step = batch_size, seed, first_step
        self.buffer_chunks, self.prefetch = buffer_chunks, prefetch
        self.chunk_size = self.hidden.chunks[0]
        self.waits: list[float] = []
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._produce, daemon=True)
        self._thread.start()

    @property
    def wait_seconds(self) -> float:
        return float(sum(self.waits))

    def _epochs(self) -> Iterator[list[np.ndarray]]:
        skip, epoch = self.first_step, 0
        while True:
            plan = batch_plan(self.images, self.chunk_size, self.batch_size, self.seed, epoch, self.buffer_chunks)
            yield plan[skip:]
            skip = max(0, skip - len(plan))
            epoch += 1

    def _read_chunk(self, chunk: int) -> np.ndarray:
        rows = slice(chunk * self.chunk_size, (chunk + 1) * self.chunk_size)
        return np.asarray(self.hidden[rows, self.start : self.stop + 1], dtype=np.float32)

    def _produce(self) -> None:
        try:
            for plan in self._epochs():
                # rows of each chunk still to serve this epoch; a chunk is freed when it reaches 0
                remaining = dict(zip(*np.unique(np.concatenate(plan) // self.chunk_size, return_counts=True))) if plan else {}
                cache: dict[int, np.ndarray] = {}
                for batch in plan:
                    chunks, offsets = np.divmod(batch, self.chunk_size)
                    for chunk in set(chunks.tolist()) - cache.keys():
                        cache[chunk] = self._read_chunk(chunk)
                    tensor = torch.from_numpy(np.stack([cache[c][o] for c, o in zip(chunks, offsets)]))
                    for chunk, count in zip(*np.unique(chunks, return_counts=True)):
                        remaining[chunk] -= count
                        if not remaining[chunk]:
                            del cache[chunk]
                    if not self._put(tensor):
                        return
        except BaseException as error:  # handed to the consumer, raised there
            self._put(error)

    def _put(self, item) -> bool:
        """Queue an item unless the stream is closed; False once it is."""
        while not self._stopped.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> TrajectoryStream:
        return self

    def __next__(self) -> torch.Tensor:
        began = time.perf_counter()
        item = self._queue.get()
        self.waits.append(time.perf_counter() - began)
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Stop the reader thread."""
        self._stopped.set()
        self._thread.join()

    def __enter__(self) -> TrajectoryStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
