"""How many threads compute may use, so that torch/BLAS and the store's reader threads never oversubscribe the cores."""

from __future__ import annotations

import os

import dask
import torch
from threadpoolctl import threadpool_limits

__all__ = ["available_cores", "set_threads"]


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS says, else ``os.cpu_count()``)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def set_threads(threads: int | None = None) -> dict:
    """Share the cores between compute (torch intra-op, BLAS) and the store's reader threads (dask).

    ``threads`` defaults to ``OMP_NUM_THREADS``, else half the available cores (at least 1). Returns ``compute``,
    ``readers`` and ``cores``; raises ValueError for ``threads`` below 1.
    """
    cores = available_cores()
    if threads is None:
        given = os.environ.get("OMP_NUM_THREADS", "")
        threads = int(given) if given.isdigit() and int(given) > 0 else max(1, cores // 2)
    if threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")
    readers = max(1, cores - threads)
    torch.set_num_threads(threads)
    threadpool_limits(threads)  # BLAS and OpenMP pools of numpy and scipy
    dask.config.set(num_workers=readers)
    return {"compute": threads, "readers": readers, "cores": cores}
