"""Speed of the phase partitions, and memory of the similarity over a store larger than memory.

Run by hand: ``python benchmarks/phases.py [--store PATH] [--cap-mb 200] [--skip-memory]``.

1. Contiguous DP for L = 48 layers, k = 8 phases (floor: under 1 s), against a straightforward
   DP that re-sums each segment's block as the paper notebook's ``blockiness_var_explained``
   does, measured in the same run (same answer, ratio printed).
2. The exact max-cut (`exact_maxcut`, branch and bound; three matrices each) and the recursive
   max-cut at L = 24, 32, 40 and 48 (the exact limit; floor: L = 40 under 10 s on 2 cores), on
   ViT-like block matrices and on uniform random ones (the hard case: no structure to prune on). Baselines in the same
   run: the brute force over all 2^(L−1) assignments, vectorised (chunks of assignments as a bit
   matrix, one matrix product per chunk; the former solver up to 20 layers) at L = 24;
   ``scipy.optimize.milp`` (HiGHS) on the standard max-cut linearisation at L = 24 (a 60 s
   limit); networkx's one-exchange heuristic (the former solver above 20 layers) at every L,
   with the share of the maximum it reaches.
3. ``layer_similarity`` over a store at least 5x larger than a memory cap set on the process
   (RLIMIT_AS = address space after imports + cap): it records vit_small_patch16_224 with random
   weights (mechanics only; any store of that size would do) on the bundled images, then runs
   the similarity in a child process under the cap and prints its peak resident memory during
   the computation next to the store's size. CKA keeps a (layers·features)² float64
   accumulator (here (12·384)² · 8 B = 170 MiB), whatever the number of images.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_array
from threadpoolctl import threadpool_limits

from analyses.segmentation import (
    as_matrix,
    contiguous_partition,
    exact_maxcut,
    heuristic_maxcut,
    maxcut_partition,
    to_partition,
)


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


def vit_like(n_layers: int, rng: np.random.Generator, n_phases: int = 4, width: int = 256) -> np.ndarray:
    """A ViT-like layer dissimilarity (1 − cosine, as the paper's matrix), (n_layers, n_layers).

    The residual stream as a random walk whose drift direction changes at ``n_phases − 1``
    random phase boundaries (steps of random length plus isotropic noise): dissimilarity grows
    with depth distance, faster across phases, the block structure of the DINOv2 matrices.
    """
    cuts = np.sort(rng.choice(np.arange(2, n_layers - 1), n_phases - 1, replace=False))
    phase = np.searchsorted(cuts, np.arange(n_layers), side="right")
    drift = rng.standard_normal((n_phases, width))
    steps = drift[phase] * rng.uniform(0.3, 1.0, (n_layers, 1)) + 0.3 * rng.standard_normal((n_layers, width))
    states = rng.standard_normal(width) + np.cumsum(steps, axis=0)
    states /= np.linalg.norm(states, axis=1, keepdims=True)
    dissimilarity = 1 - states @ states.T
    np.fill_diagonal(dissimilarity, 0.0)
    return (dissimilarity + dissimilarity.T) / 2


def uniform_random(n_layers: int, rng: np.random.Generator) -> np.ndarray:
    """Symmetric uniform [0, 1) weights, zero diagonal: no structure for the bounds to use."""
    weights = rng.random((n_layers, n_layers))
    weights = (weights + weights.T) / 2
    np.fill_diagonal(weights, 0.0)
    return weights


def brute_force_maxcut(weights: np.ndarray, chunk: int = 1 << 16) -> float:
    """Baseline: the largest cut over all 2^(n−1) assignments (vertex 0 pinned), a bit matrix
    of ``chunk`` assignments and one matrix product per chunk."""
    n = len(weights)
    degree, shifts, best = weights.sum(1), np.arange(n - 2, -1, -1), -np.inf
    for start in range(0, 1 << (n - 1), chunk):
        codes = np.arange(start, min(start + chunk, 1 << (n - 1)))
        sides = np.zeros((len(codes), n))
        sides[:, 1:] = (codes[:, None] >> shifts) & 1
        best = max(best, float((sides @ degree - np.einsum("ai,ai->a", sides @ weights, sides)).max()))
    return best


def milp_maxcut(weights: np.ndarray, time_limit: float = 60.0) -> tuple[float, bool]:
    """Baseline: max-cut as a MILP, x_i binary sides, y_ij ≤ x_i + x_j, y_ij ≤ 2 − x_i − x_j,
    maximise Σ W_ij y_ij (HiGHS through scipy). Returns the value and whether it was proven optimal."""
    n = len(weights)
    rows, cols = np.triu_indices(n, 1)
    pairs = np.arange(len(rows))
    index = (np.tile(pairs, 3), np.concatenate([n + pairs, rows, cols]))
    below_sum = coo_array((np.r_[np.ones(len(pairs)), -np.ones(2 * len(pairs))], index), shape=(len(pairs), n + len(pairs)))
    below_rest = coo_array((np.ones(3 * len(pairs)), index), shape=(len(pairs), n + len(pairs)))
    upper = np.ones(n + len(pairs))
    upper[0] = 0  # vertex 0 pinned
    result = milp(
        np.r_[np.zeros(n), -weights[rows, cols]],
        constraints=[LinearConstraint(below_sum, -np.inf, 0), LinearConstraint(below_rest, -np.inf, 2)],
        integrality=np.r_[np.ones(n), np.zeros(len(pairs))],
        bounds=Bounds(np.zeros(n + len(pairs)), upper),
        options={"time_limit": time_limit},
    )
    return -float(result.fun), result.status == 0


def maxcut_speed(n_matrices: int = 3) -> None:
    """The exact max-cut at L = 24..48 against the baselines, on two kinds of matrix."""
    rng = np.random.default_rng(0)
    print(f"max-cut (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
          f"exact: median and slowest of {n_matrices} matrices, each solved once)")
    for kind, make in [("ViT-like", vit_like), ("random", uniform_random)]:
        for n_layers in (24, 32, 40, 48):
            matrices = [make(n_layers, rng) for _ in range(n_matrices)]
            solved = [timed(exact_maxcut, weights, repeat=1) for weights in matrices]
            times = [seconds for _, seconds in solved]
            weights, value, exact_s = matrices[0], solved[0][0][0], times[0]
            _, recursive_s = timed(maxcut_partition, weights, 0.1, repeat=1)
            (heuristic, _), heuristic_s = timed(heuristic_maxcut, weights, repeat=1)
            line = (f"  {kind:8s} L={n_layers}: exact {np.median(times):6.2f} s, slowest {max(times):6.2f} s"
                    f"{' (floor 10 s)' if n_layers == 40 else ''}; recursive (f=0.1) {recursive_s:5.2f} s; "
                    f"networkx one-exchange {heuristic_s:5.2f} s reaching {heuristic / value:.4f} of the maximum")
            if n_layers == 24:
                with threadpool_limits(limits=1, user_api="blas"):  # as the exact solver runs
                    brute, brute_s = timed(brute_force_maxcut, weights, repeat=1)
                (mixed, proven), milp_s = timed(milp_maxcut, weights, repeat=1)
                assert np.isclose(brute, value), (brute, value)
                line += (f"; brute force {brute_s:.2f} s (x{brute_s / exact_s:.0f}, same value); scipy milp "
                         f"{milp_s:.2f} s (x{milp_s / exact_s:.0f}, "
                         f"{'same value' if proven and np.isclose(mixed, value) else 'not proven optimal in 60 s'})")
            print(line, flush=True)


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
    maxcut_speed()
    if not args.skip_memory:
        similarity_memory(args.store, args.cap_mb)


if __name__ == "__main__":
    main()
