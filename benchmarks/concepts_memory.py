"""Time and peak memory of `dynamo concepts` on the default store and on a store larger than a memory cap.

Run by hand::

    python benchmarks/concepts_memory.py [--source STORE] [--copies 25] [--cap-gb 1.5]

1. Records the zoo model on its 360 bundled digits (or takes ``--source``) and writes a large
   store by repeating that store's images ``--copies`` times (`analyses_memory.repeated_store`:
   streamed, real trajectories).
2. Runs ``dynamo concepts`` (TopK, default settings: 8 x width concepts, k = 8, 1500 steps of
   1024 tokens) on the small and the large store, each in a child process whose data memory is
   capped at ``--cap-gb`` with ``setrlimit(RLIMIT_DATA)`` and one BLAS/OpenMP thread
   (`analyses_memory.capped_run`), and prints each run's wall time, peak resident memory and
   the ratio of the two peaks. Training reads a bounded round of chunks whatever the store's
   size; the profile and example passes stream the store a block of images at a time, so the
   peak should not grow with the store.
3. Checks the two dictionaries reconstruct alike (R² per layer within 0.02: repetition changes
   nothing the dictionary can see but the draw of training tokens).
"""

from __future__ import annotations

import os
import resource

import numpy as np
from analyses_memory import capped_run, size_gb, small_and_large_stores

import dynamo

CONCEPTS = ["-m", "dynamo.pipeline.cli", "concepts", "--quiet", "--json"]


def main() -> None:
    args, source, big, cap = small_and_large_stores(__doc__.splitlines()[0], "dynamo-concepts-memory")
    runs = {}
    for name, store in (("small", source), ("large", big)):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        summary, peak, seconds = capped_run([*CONCEPTS[:3], str(store), "--out", str(args.workdir / f"out_{name}"),
                                             *CONCEPTS[3:]], cap)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        runs[name] = (summary, peak, seconds, store, cpu)
    print(f"data-memory cap (RLIMIT_DATA) per run: {args.cap_gb:.2f} GB; one BLAS/OpenMP thread")
    for name, (_, peak, seconds, store, cpu) in runs.items():
        images = dynamo.open_trajectories(store).sizes["image"]
        print(f"{name} store: {images:>6} images, {size_gb(store):.2f} GB on disk, peak RSS {peak:.2f} GB, "
              f"{seconds:.0f} s wall, {cpu:.0f} s CPU (fit, profiles, examples, figures; load average "
              f"{os.getloadavg()[0]:.1f} at the end)")
    small, large = runs["small"], runs["large"]
    print(f"large store / cap = {size_gb(big) / args.cap_gb:.2f}; peak RSS large / small = {large[1] / small[1]:.2f}")
    gap = np.abs(np.array(small[0]["r2_per_layer"]) - np.array(large[0]["r2_per_layer"])).max()
    print(f"R² per layer, small store: {small[0]['r2_per_layer']}")
    print(f"max |Δ R² per layer| small vs large: {gap:.4f}")


if __name__ == "__main__":
    main()
