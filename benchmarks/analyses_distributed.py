"""Wall time and peak memory of the store-only analyses in-process and on 1, 2 and 4 local dask workers.

Run by hand::

    python benchmarks/analyses_distributed.py [--source STORE] [--copies 10] [--workers 1,2,4]

1. Records the zoo model on its 360 bundled digits (or takes ``--source``) and writes a larger
   store by repeating its images ``--copies`` times (`analyses_memory.repeated_store`).
2. Runs layer similarity (cosine, the paper's), basins, token dynamics and update rank (20
   bootstrap replicates) on it, each configuration in a fresh child process: in-process (the
   baseline), then on a fresh `dynamo.pipeline.cluster.local_cluster` (N one-thread worker processes) per N. Each
   child reports its wall time, its own peak RSS (the client) and every worker process's peak
   RSS (``client.run`` of ``getrusage``), and saves its results.
3. Prints time and the ratio to the in-process run per configuration, and checks every
   configuration's results equal the in-process ones (max |difference|).

Also prints the pickled size of one block's task (the block dataset after ``dask.optimize``),
which stays small however many chunks the store has. Timings depend on the cores free: with N
workers on fewer than N cores there is no speed-up to expect.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dask
import numpy as np
import xarray as xr

import dynamo
from dynamo import zoo
from dynamo.pipeline.cluster import local_cluster
from dynamo.store import save_result

sys.path.insert(0, str(Path(__file__).parent))
from analyses_memory import repeated_store, size_gb  # noqa: E402

ANALYSES = ("similarity", "basins", "tokens", "rank")


def run_analyses(store: Path, out: Path) -> dict:
    """Run every analysis on ``store`` (on the default client if any); seconds per analysis."""
    from analyses import basins, rank, similarity, tokens

    dataset = dynamo.open_trajectories(store)
    runs = {
        "similarity": lambda: similarity.layer_similarity(dataset, progress=False).to_dataset(name="dissimilarity"),
        "basins": lambda: basins.compute(dataset, progress=False),
        "tokens": lambda: tokens.compute(dataset, progress=False),
        "rank": lambda: rank.compute(dataset, n_bootstrap=20, progress=False),
    }
    seconds = {}
    out.mkdir(parents=True, exist_ok=True)
    for name in ANALYSES:
        started = time.perf_counter()
        result = runs[name]()
        seconds[name] = time.perf_counter() - started
        save_result(result, out / f"{name}.zarr")
    return seconds


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def child(store: Path, workers: int, out: Path) -> None:
    """One configuration, in this (fresh) process; prints its JSON report."""
    report = {"workers": workers}
    if workers == 0:
        started = time.perf_counter()
        report["seconds"] = run_analyses(store, out)
    else:
        from distributed import Client

        with local_cluster(workers) as cluster, Client(cluster) as client:
            started = time.perf_counter()
            report["seconds"] = run_analyses(store, out)
            report["worker_peak_gb"] = sorted(client.run(peak_rss_gb).values())
    report["total_seconds"] = time.perf_counter() - started
    report["client_peak_gb"] = peak_rss_gb()
    print(json.dumps(report))


def block_task_bytes(store: Path) -> tuple[int, int, int]:
    """Pickled bytes of one block's dataset after ``dask.optimize``, of the whole store's, and the chunk count."""
    from dynamo.blocks import image_blocks

    dataset = dynamo.open_trajectories(store)
    (block,) = dask.optimize(dataset.isel(image=image_blocks(dataset)[0]))
    return len(pickle.dumps(block)), len(pickle.dumps(dataset)), dataset["hidden"].data.npartitions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, help="a recorded store (default: record the zoo model)")
    parser.add_argument("--copies", type=int, default=10)
    parser.add_argument("--workers", default="1,2,4", help="comma-separated worker counts")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "dynamo-analyses-distributed")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.store, args.child, args.workdir / f"results_{args.child}")
        return

    args.workdir.mkdir(parents=True, exist_ok=True)
    source = args.source or args.workdir / "small.zarr"
    if not source.exists():
        dynamo.record("dynamo-zoo/vit-digits-reg4", zoo.default_images(), source, progress=False)
    big = args.workdir / f"big{args.copies}.zarr"
    if not big.exists():
        repeated_store(source, big, args.copies)
    dataset = dynamo.open_trajectories(big)
    print(f"store: {dataset.sizes['image']} images, {size_gb(big):.2f} GB on disk, "
          f"{len(dataset['hidden'].data.chunks[0])} blocks of {dataset['hidden'].data.chunks[0][0]} images; "
          f"{os.cpu_count()} CPU cores")
    block_bytes, store_bytes, n_chunks = block_task_bytes(big)
    print(f"one block's task argument pickles to {block_bytes / 1e3:.0f} kB "
          f"(the whole lazy store: {store_bytes / 1e3:.0f} kB, {n_chunks} chunks of hidden)")

    environment = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    reports = []
    for workers in [0, *(int(n) for n in args.workers.split(","))]:
        done = subprocess.run(
            [sys.executable, __file__, "--child", str(workers), "--store", str(big), "--workdir", str(args.workdir)],
            capture_output=True, text=True, env=environment,
        )
        if done.returncode:
            raise RuntimeError(f"configuration with {workers} workers failed:\n{done.stderr[-3000:]}")
        reports.append(json.loads(done.stdout.strip().splitlines()[-1]))

    baseline = reports[0]
    print(f"\n{'configuration':<16}{'total s':>9}{'x in-proc':>10}  " + "".join(f"{n + ' s':>12}" for n in ANALYSES)
          + f"{'client GB':>11}  worker peak GB")
    for report in reports:
        label = "in-process" if report["workers"] == 0 else f"{report['workers']} worker" + "s" * (report["workers"] > 1)
        print(f"{label:<16}{report['total_seconds']:>9.1f}{report['total_seconds'] / baseline['total_seconds']:>10.2f}  "
              + "".join(f"{report['seconds'][n]:>12.1f}" for n in ANALYSES)
              + f"{report['client_peak_gb']:>11.2f}  " + ", ".join(f"{g:.2f}" for g in report.get("worker_peak_gb", [])))

    for report in reports[1:]:
        gap = 0.0
        for name in ANALYSES:
            here = xr.open_zarr(args.workdir / "results_0" / f"{name}.zarr", consolidated=False)
            there = xr.open_zarr(args.workdir / f"results_{report['workers']}" / f"{name}.zarr", consolidated=False)
            for variable in here.data_vars:
                gap = max(gap, float(np.nanmax(np.abs(here[variable].values - there[variable].values))))
        print(f"{report['workers']} workers vs in-process: max |difference| over all results = {gap:.3g}")


if __name__ == "__main__":
    main()
