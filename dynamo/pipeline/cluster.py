"""Connecting to a dask.distributed cluster for the store-only analyses (``--cluster``)."""

from __future__ import annotations

import contextlib

import dask

# dask's nannies start workers with MALLOC_TRIM_THRESHOLD_=65536, which also stops glibc from
# adapting its mmap threshold: every array over 128 KiB is then a fresh mmap, and the analyses'
# per-block float64 arrays run about 2x slower. Local clusters here start without it.
FAST_ALLOCATION = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}


def local_cluster(n_workers: int, **options):
    """A ``LocalCluster`` of ``n_workers`` one-thread worker processes, without a dashboard."""
    from distributed import LocalCluster

    if n_workers < 1:
        raise ValueError(f"a local cluster needs at least 1 worker, got {n_workers}")
    with dask.config.set(FAST_ALLOCATION):
        return LocalCluster(
            n_workers=n_workers, threads_per_worker=1, dashboard_address=None, **options
        )


@contextlib.contextmanager
def connect(address: str | None):
    """A ``distributed.Client`` (the default client while open) for ``address``, closed after.

    ``address``: a scheduler (``tcp://host:port``), ``local:N`` for a `local_cluster` of N workers, or None for none.
    """
    if address is None:
        yield None
        return
    from distributed import Client

    if address.startswith("local:"):
        workers = address.removeprefix("local:")
        if not workers.isdigit() or int(workers) < 1:
            raise ValueError(f"--cluster {address!r}: local:N needs a positive number of workers, e.g. local:2")
        with local_cluster(int(workers)) as cluster, Client(cluster) as client:
            yield client
        return
    try:
        client = Client(address, timeout="10s")
    except (OSError, TimeoutError, ValueError, TypeError) as error:
        raise ValueError(
            f"--cluster {address!r}: cannot reach a dask scheduler there ({error}); give its address "
            "(tcp://host:port, as printed by `dask scheduler`) or local:N"
        ) from None
    with client:
        yield client
