"""Speed of the phase partitions, and memory of the similarity over a store larger than memory.

Run by hand: ``python benchmarks/phases.py [--store PATH] [--cap-mb 200]``.

1. Contiguous DP for L = 48 layers, k = 8 phases (floor: under 1 s), against a straightforward
   DP that re-sums each segment's block as the paper notebook's ``blockiness_var_explained``
   does, measured in the same run (same answer, ratio printed); and the recursive max-cut at
   L = 12 (exact) and L = 48 (networkx heuristic).
2. ``layer_similarity`` over a store at least 5x larger than a memory cap set on the process
   (RLIMIT_AS = address space after imports + cap): it records vit_small_patch16_224 with random
   weights (mechanics only; any store of that size would do) on the bundled images, then runs
   the similarity in a child process under the cap and prints its peak resident memory during
   the computation next to the store's size. CKA keeps a (layers·features)² float64
   accumulator (here (12·384)² · 8 B = 170 MiB), whatever the number of images.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from analyses.segmentation import as_matrix, contiguous_partition, maxcut_partition, to_partition


def blockwise_dp(dissimilarity: np.ndarray, k: int) -> list[list[int]]:
    """Baseline: the same DP, each segment's within-weight re-summed from its block (O(k·L⁴))."""
    weights, labels = as_matrix(dissimilarity)
    n = len(labels)
    best = [[np.inf] * (n + 1) for _ in range(k + 1)]
    start = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for phases in range(1, k + 1):
        for end in range(1, n + 1):
            for begin in range(phases - 1, end):
                block = weights[begin:end, begin:end]
                candidate = best[phases - 1][begin] + (block.sum() - np.trace(block)) / 2
                if candidate < best[phases][end]:
                    best[phases][end], start[phases][end] = candidate, begin
    segments, end = [], n
    for phases in range(k, 0, -1):
        segments.append(range(start[phases][end], end))
        end = start[phases][end]
    return to_partition(segments[::-1], labels)


def timed(function, *args, repeat: int = 5, **kwargs):
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        result = function(*args, **kwargs)
        times.append(time.perf_counter() - began)
    return result, min(times)


def partition_speed() -> None:
    rng = np.random.default_rng(0)
    matrix = rng.random((48, 48))
    matrix = (matrix + matrix.T) / 2
    np.fill_diagonal(matrix, 0)
    fast, fast_s = timed(contiguous_partition, matrix, 8)
    slow, slow_s = timed(blockwise_dp, matrix, 8, repeat=1)
    assert fast == slow, (fast, slow)
    print(f"contiguous DP, L=48, k=8: {fast_s * 1e3:.2f} ms (floor 1000 ms); "
          f"block-re-summing DP {slow_s * 1e3:.0f} ms; speed-up x{slow_s / fast_s:.0f}; same partition")
    small = matrix[:12, :12]
    _, exact_s = timed(maxcut_partition, small, 0.1)
    _, heuristic_s = timed(maxcut_partition, matrix, k=8, repeat=1)
    print(f"recursive max-cut: L=12 exact (brute force) {exact_s * 1e3:.1f} ms; "
          f"L=48, k=8 networkx one-exchange heuristic {heuristic_s:.2f} s")


CHILD = """
import json, os, resource, sys, time
import dynamo
from analyses.similarity import layer_similarity
path, cap, measure, tokens = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
ds = dynamo.open_trajectories(path)
def status(field):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field))
with open("/proc/self/clear_refs", "w") as refs:
    refs.write("5")  # restart the peak-RSS counter (VmHWM) after the imports
baseline_rss = status("VmRSS:")
limit = status("VmSize:") + cap
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
began = time.perf_counter()
matrix = layer_similarity(ds, measure, tokens, progress=False)
seconds = time.perf_counter() - began
peak = status("VmHWM:")
print(json.dumps({"seconds": seconds, "baseline_rss": baseline_rss, "peak_rss": peak,
                  "growth": peak - baseline_rss, "first_row": matrix.values[0, :4].tolist()}))
"""


def store_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def similarity_memory(store: Path, cap_mb: int) -> None:
    import dynamo
    from dynamo import zoo

    if not store.exists():
        print(f"recording {store} (vit_small_patch16_224, random weights, 360 bundled images) ...")
        dynamo.record("vit_small_patch16_224", zoo.default_images(), store, pretrained=False, batch_size=8, progress=True)
    size, cap = store_bytes(store), cap_mb * 2**20
    hidden = dynamo.open_trajectories(store)["hidden"]
    print(f"store {store}: {size / 2**20:.0f} MiB on disk, hidden {hidden.nbytes / 2**20:.0f} MiB, "
          f"chunks {tuple(c[0] for c in hidden.chunks)}; cap {cap_mb} MiB -> store / cap = {size / cap:.1f}x")
    for measure, tokens in [("cosine", "all"), ("mse", "patch"), ("cka", "cls")]:
        child = subprocess.run(
            [sys.executable, "-c", CHILD, str(store), str(cap), measure, tokens],
            capture_output=True, text=True, env={"MALLOC_ARENA_MAX": "2", "PATH": "/usr/bin:/bin"},
        )
        if child.returncode:
            print(f"{measure} over {tokens}: FAILED under the cap\n{child.stderr[-2000:]}")
            continue
        result = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"{measure} over {tokens}: {result['seconds']:.1f} s, peak RSS {result['peak_rss'] / 2**20:.0f} MiB "
              f"(+{result['growth'] / 2**20:.0f} MiB over the {result['baseline_rss'] / 2**20:.0f} MiB after imports), "
              f"under a {cap_mb} MiB address-space cap; store / growth = {size / max(result['growth'], 1):.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=Path("/tmp/dynamo-bench/vit_small_random.zarr"))
    parser.add_argument("--cap-mb", type=int, default=200)
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    partition_speed()
    if not args.skip_memory:
        similarity_memory(args.store, args.cap_mb)


if __name__ == "__main__":
    main()
