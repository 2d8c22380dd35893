"""Peak memory of `dynamo analyze` (store-only analyses) on a store larger than a memory cap.

Run by hand::

    python benchmarks/analyses_memory.py [--source STORE] [--copies 25] [--cap-gb 1.5]

1. Records the zoo model on its 360 bundled digits (or takes ``--source``) and writes a large
   store by repeating that store's images ``--copies`` times (streamed, chunk by chunk: real
   trajectories, so every analysis has real work to do).
2. Runs ``dynamo analyze`` on the small and the large store, each in a child process whose
   data memory (heap and anonymous mappings) is capped at ``--cap-gb`` with
   ``setrlimit(RLIMIT_DATA)``, and reports each run's peak resident memory (ru_maxrss) next to
   the store sizes. (RLIMIT_AS cannot be used: importing torch alone maps about 4.7 GB of
   address space for its libraries.) Both runs use one BLAS thread, so that timings on a
   shared machine compare.
3. Checks the large store's results equal the small store's where repetition leaves them
   unchanged (γ per kind, rank measures of the updates), so the streamed run is also right.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import xarray as xr

import dynamo
from dynamo import zoo

ANALYZE = ["-m", "dynamo.pipeline.cli", "analyze", "--only", "basins,tokens,rank", "--bootstrap", "20", "--quiet", "--json"]


def repeated_store(source: Path, out: Path, copies: int) -> Path:
    """Write ``copies`` repetitions of ``source``'s images as one trajectory store (streamed)."""
    small = xr.open_zarr(source, consolidated=False)
    big = xr.concat([small] * copies, dim="image", data_vars="all", coords="different", compat="equals")
    n = big.sizes["image"]
    big = big.assign_coords(image=np.arange(n), image_id=("image", [f"{i}" for i in range(n)]))
    big = big.chunk({"image": small["hidden"].chunks[0][0]})
    big.attrs = dict(small.attrs)
    for name in big.variables:
        big[name].encoding = {}
    big.to_zarr(out, mode="w", consolidated=False)
    return out


def capped_run(arguments: list[str], cap_bytes: int) -> tuple[dict, float, float]:
    """Run ``python ARGUMENTS`` under an address-space cap; its JSON summary, peak RSS (GB), seconds."""

    def cap():
        resource.setrlimit(resource.RLIMIT_DATA, (cap_bytes, cap_bytes))

    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    environment = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *arguments], preexec_fn=cap, capture_output=True, text=True, env=environment)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise RuntimeError(f"analyze failed under the cap:\n{done.stderr[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak <= before:
        raise RuntimeError("the child's peak RSS is hidden by an earlier, larger child; run this script fresh")
    return json.loads(done.stdout), peak / 1e6, seconds  # ru_maxrss is in KiB on Linux


def size_gb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e9


def small_and_large_stores(description: str, workdir: str) -> tuple[argparse.Namespace, Path, Path, int]:
    """Parse the memory benchmarks' shared flags and make their two stores.

    Returns the arguments, the small store (``--source``, or the zoo model recorded on the default
    images), the large one (``--copies`` copies of it, made once in ``--workdir``) and the memory
    cap in bytes.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--source", type=Path, help="a recorded store (default: record the zoo model)")
    parser.add_argument("--copies", type=int, default=25)
    parser.add_argument("--cap-gb", type=float, default=1.5)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / workdir)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    source = args.source or args.workdir / "small.zarr"
    if not source.exists():
        dynamo.record("dynamo-zoo/vit-digits-reg4", zoo.default_images(), source, progress=False)
    big = args.workdir / "big.zarr"
    if not big.exists():
        started = time.perf_counter()
        repeated_store(source, big, args.copies)
        print(f"wrote {big} ({args.copies} copies) in {time.perf_counter() - started:.0f} s")
    return args, source, big, int(args.cap_gb * 1e9)


def main() -> None:
    args, source, big, cap = small_and_large_stores(__doc__.splitlines()[0], "dynamo-analyses-memory")
    small_summary, small_peak, small_s = capped_run(
        [*ANALYZE[:3], str(source), "--out", str(args.workdir / "out_small"), *ANALYZE[3:]], cap
    )
    big_summary, big_peak, big_s = capped_run(
        [*ANALYZE[:3], str(big), "--out", str(args.workdir / "out_big"), *ANALYZE[3:]], cap
    )
    print(f"data-memory cap (RLIMIT_DATA) per run: {args.cap_gb:.2f} GB")
    print(f"small store: {small_summary['n_images']:>6} images, {size_gb(source):.2f} GB on disk, "
          f"peak RSS {small_peak:.2f} GB, {small_s:.0f} s")
    print(f"large store: {big_summary['n_images']:>6} images, {size_gb(big):.2f} GB on disk, "
          f"peak RSS {big_peak:.2f} GB, {big_s:.0f} s")
    print(f"large store / cap = {size_gb(big) / args.cap_gb:.2f}; peak RSS large / small = {big_peak / small_peak:.2f}")

    small_results = {n: xr.open_zarr(args.workdir / "out_small" / f"{n}.zarr", consolidated=False) for n in ("basins", "rank")}
    big_results = {n: xr.open_zarr(args.workdir / "out_big" / f"{n}.zarr", consolidated=False) for n in ("basins", "rank")}
    gamma_gap = float(abs(small_results["basins"]["gamma"].mean("image") - big_results["basins"]["gamma"].mean("image")).max())
    rank_gap = float(abs(small_results["rank"]["rank"] - big_results["rank"]["rank"]).max())
    print(f"repetition leaves results unchanged: max |Δ mean γ| = {gamma_gap:.2e}, max |Δ rank measure| = {rank_gap:.2e}")


if __name__ == "__main__":
    main()
