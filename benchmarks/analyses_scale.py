"""Store-only analyses at the paper's teacher shape: time and peak memory against a plain read.

Run by hand (stores are recorded once into ``--workdir`` and reused by later runs)::

    python benchmarks/analyses_scale.py [--workdir /tmp/scale] [--sizes 512,2048] [--large 512]
        [--tile-above 512] [--alone 512,large|all] [--fit-steps 50 --fit-batch-size 16] [--repeat-ratio]

1. Makes N real photographs (scikit-image's bundled ones, random crops, flipped at random,
   seeded) and records a random-weight ``vit_base_patch14_reg4_dinov2`` at 224 px (261 tokens
   x 768 features x 13 layers, float16) on N = 512 and N = 2048 of them; with ``--large N``,
   also ``vit_large_patch14_reg4_dinov2`` (24 blocks, 1024 features) on N images.
2. For each store, each configuration in a fresh child process (so that its peak RSS is its own):
   (a) one plain read and decode of every chunk of ``hidden`` (zarr, in the store's dtype);
   (b) each store-only analysis alone (phases, basins, tokens, rank, export of the register tokens);
   (c) the whole store-only profile (`dynamo.pipeline.profile.profile_store`: phases, the one
       pass of the dynamics, figures, report), and the same profile on a 32-image store, whose
       time is the fixed cost (imports, figures, report, the N-independent part of the
       analyses);
   each with wall seconds, the process's CPU seconds and peak RSS (``ru_maxrss``); results go to
   ``WORKDIR/analyses_scale.json``. ``--tile-above M`` makes larger ViT-B stores by repeating the
   M-image one (when recording them takes too long), ``--alone`` limits (b) to some stores.
3. Prints the floors, on wall and on CPU time: profile <= 3 x the plain read + the fixed cost;
   peak RSS < 4 GB; time linear in N (the ratio of the two sizes' profiles less their fixed cost, 4.0 +- 0.6 for
   N = 512 and 2048); the validation's and the finite check's share (issue 20).
4. Raptor's fitter on the first two ViT-B stores (one block, stage 1, rollout over every layer, as
   ``benchmarks/raptor_step.py``; ``--fit-steps`` steps of ``--fit-batch-size``): its step time
   against a bare PyTorch loop of the same block, loss and optimizer on batches already in memory,
   the share of step time spent waiting for data, and the fitting process's peak RSS.

Random weights: the numbers measure mechanics (time, memory), never findings. The machine's
cores may be shared with other work, so timings are noisy; ``--repeat-ratio`` runs the key ratio
(profile / plain read at the largest N) once more.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import xarray as xr

sys.path.insert(0, str(Path(__file__).parent))
from analyses_memory import repeated_store  # noqa: E402

BASE = "vit_base_patch14_reg4_dinov2"
LARGE = "vit_large_patch14_reg4_dinov2"
PHOTOGRAPHS = (
    "astronaut", "camera", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
    "retina", "brick", "grass", "gravel", "moon", "coins", "clock", "page",
)
FIXED_IMAGES = 32  # the small store whose profile time is the fixed cost
GB = 1e9


def photographs(n: int, folder: Path, seed: int = 0) -> Path:
    """``n`` JPEG crops (256 x 256) of scikit-image's bundled photographs, some flipped; seeded."""
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.jpg"))) == n:
        return folder
    sources = [getattr(data, name)() for name in PHOTOGRAPHS]
    sources += list(data.stereo_motorcycle()[:2])
    rng = np.random.default_rng(seed)
    for index in range(n):
        photo = sources[index % len(sources)]
        photo = np.repeat(photo[..., None], 3, axis=2) if photo.ndim == 2 else photo[..., :3]
        height, width = photo.shape[:2]
        side = int(rng.uniform(0.35, 1.0) * min(height, width))
        top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
        crop = photo[top : top + side, left : left + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        Image.fromarray(np.ascontiguousarray(crop)).resize((256, 256), Image.BILINEAR).save(
            folder / f"photo{index:05d}.jpg", quality=90
        )
    return folder


def recorded_store(workdir: Path, model: str, n: int) -> Path:
    """The store of ``model`` (random weights, 224 px, float16) on ``n`` photographs, recorded once."""
    import dynamo

    store = workdir / f"{model.split('_patch')[0]}_{n}.zarr"
    if store.exists() and dynamo.open_trajectories(store).attrs.get("complete"):
        return store
    images = photographs(n, workdir / f"photos{n}")
    started = time.perf_counter()
    loaded = dynamo.load_model(model, pretrained=False, img_size=224)
    dynamo.record(loaded, images, store, dtype="float16", batch_size=32, progress=True)
    print(f"recorded {store} ({n} images) in {time.perf_counter() - started:.0f} s", flush=True)
    return store


def tiled_store(workdir: Path, source: Path, n: int) -> Path:
    """A store of ``n`` images made by repeating ``source``'s (`analyses_memory.repeated_store`), made once.

    For a machine where recording ``n`` images takes too long: the bytes to read and the work per
    image are those of a recorded store of ``n`` images; the trajectories repeat.
    """
    store = workdir / f"{source.stem}_tiled{n}.zarr"
    if not store.exists():
        copies = n // xr.open_zarr(source, consolidated=False).sizes["image"]
        started = time.perf_counter()
        repeated_store(source, store, copies)
        print(f"tiled {store} ({copies} copies of {source.name}) in {time.perf_counter() - started:.0f} s", flush=True)
    return store


def subset_store(workdir: Path, source: Path, n: int) -> Path:
    """The first ``n`` images of ``source`` as a store of their own (for the fixed cost), made once."""
    store = workdir / f"{source.stem}_first{n}.zarr"
    if not store.exists():
        small = xr.open_zarr(source, consolidated=False).isel(image=slice(0, n))
        small = small.chunk({"image": small["hidden"].chunks[0][0]})
        for name in small.variables:
            small[name].encoding = {}
        small.to_zarr(store, mode="w", consolidated=False)
    return store


def size_gb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / GB


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB  # ru_maxrss: KiB on Linux


# --- children: each measurement in a fresh process, which prints one JSON line -----------------


def child_read(store: Path) -> dict:
    """(a) One plain read and decode of every chunk of ``hidden``; the finite check and the validation alone."""
    import zarr

    import dynamo

    started = time.perf_counter()
    dynamo.open_trajectories(store)
    validated = time.perf_counter() - started
    started = time.perf_counter()
    dynamo.open_trajectories(store, validate=False)
    validation = max(validated - (time.perf_counter() - started), 0.0)
    hidden = zarr.open_group(str(store), mode="r")["hidden"]
    batch = hidden.chunks[0]
    seconds = finite_seconds = cpu = 0.0
    for start in range(0, hidden.shape[0], batch):
        for layer in range(hidden.shape[1]):
            began, began_cpu = time.perf_counter(), time.process_time()
            values = hidden[start : start + batch, layer]
            seconds, cpu = seconds + time.perf_counter() - began, cpu + time.process_time() - began_cpu
            states = values.astype(np.float32)
            squared = np.einsum("itf,itf->it", states, states)
            began = time.perf_counter()
            assert np.isfinite(squared).all()  # what `analyses.streaming.Chunk` adds to the norms it needs anyway
            finite_seconds += time.perf_counter() - began
    return {"seconds": seconds, "cpu_seconds": cpu, "gb": hidden.nbytes / GB, "validation_seconds": validation,
            "finite_check_seconds": finite_seconds}


def child_analysis(name: str, store: Path, out: Path) -> dict:
    """(b) One store-only analysis alone, as `dynamo analyze` / `profile` run it."""
    import dynamo
    from analyses import basins, export, phases, rank, tokens

    dataset = dynamo.open_trajectories(store)
    runs = {
        "phases": lambda: phases.compute(dataset, n_bootstrap=100, progress=False),
        "basins": lambda: basins.compute(dataset, progress=False),
        "tokens": lambda: tokens.compute(dataset, progress=False),
        "rank": lambda: rank.compute(dataset, n_bootstrap=100, progress=False),
        "export": lambda: export.export_trajectories(dataset, out, "register", sphere=True, progress=False),
    }
    started, cpu = time.perf_counter(), time.process_time()
    runs[name]()
    return {"seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu}


def child_profile(store: Path, out: Path) -> dict:
    """(c) The whole store-only profile: phases, the one pass of the dynamics, figures, report."""
    from dynamo.pipeline.profile import profile_store

    started, cpu = time.perf_counter(), time.process_time()
    summary = profile_store(store, out, progress=False)
    return {"seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu, "stages": summary["seconds"]}


def child_fit(store: Path, steps: int, batch_size: int) -> dict:
    """Raptor's fitter on ``store`` (stage 1, one block, rollout over every layer, as benchmarks/raptor_step.py)
    and a bare PyTorch loop of the same block, loss and optimizer on batches already in memory."""
    import torch
    from raptor_step import bare_loop

    import dynamo
    from dynamo.layout import token_groups
    from dynamo.models import load_recorded_model
    from dynamo.surrogates.raptor import RaptorFitter

    torch.set_num_threads(2)
    dataset = dynamo.open_trajectories(store)
    teacher = load_recorded_model(dataset.attrs)  # random weights: rebuilt from their seed
    fitter = RaptorFitter(k=1, steps=steps, stage2_steps=0, tf_anneal=0.0, batch_size=batch_size,
                          validate_every=10**9, progress=False, seed=0).fit(dataset, teacher=teacher)
    (timing,) = fitter.timings_.values()
    step_seconds, wait_seconds = timing["step_seconds"][2:], timing["wait_seconds"][2:]  # the reader starts
    fit_rss = peak_rss_gb()
    rows = fitter.training_images_[: 4 * batch_size]
    hidden = torch.from_numpy(np.asarray(dataset["hidden"].sel(image=rows).values, dtype=np.float32))
    groups = {k: torch.from_numpy(v) for k, v in token_groups(dataset["token_kind"]).items()}
    bare = bare_loop(hidden, groups, fitter.block_config_, steps, batch_size, fitter.lr)[2:]
    return {"fit_step": float(np.median(step_seconds)), "bare_step": float(np.median(bare)),
            "wait_share": float(np.sum(wait_seconds) / np.sum(step_seconds)), "fit_rss_gb": fit_rss}


CHILDREN = {"read": child_read, "analysis": child_analysis, "profile": child_profile, "fit": child_fit}


def measure(kind: str, *arguments) -> dict:
    """Run one child in a fresh process (one BLAS thread, as the analyses run); its report and peak RSS."""
    environment = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, __file__, "--child", kind, *map(str, arguments)], capture_output=True,
                          text=True, env=environment)
    if done.returncode:
        raise RuntimeError(f"{kind} {arguments} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_store(label: str, store: Path, workdir: Path, alone: bool = True) -> dict:
    """(a), (b) when ``alone``, and (c) on one store; prints each figure as it comes."""
    out = workdir / f"out_{store.stem}"
    shutil.rmtree(out, ignore_errors=True)  # a profile reuses finished stages: measure from nothing
    results = {"store": str(store), "gb": size_gb(store), "read": measure("read", store)}
    read = results["read"]
    print(f"[{label}] {store.name}: {results['gb']:.2f} GB on disk; plain read+decode of hidden "
          f"{read['seconds']:.1f} s ({read['gb'] / read['seconds']:.2f} GB/s; CPU {read['cpu_seconds']:.1f} s), "
          f"peak RSS {read['rss_gb']:.2f} GB", flush=True)
    for name in ("phases", "basins", "tokens", "rank", "export") if alone else ():
        results[name] = measure("analysis", name, store, out / name)
        print(f"[{label}]   {name:<8} alone {results[name]['seconds']:7.1f} s  "
              f"({results[name]['seconds'] / read['seconds']:.1f}x the read; CPU {results[name]['cpu_seconds']:.1f} s = "
              f"{results[name]['cpu_seconds'] / read['cpu_seconds']:.1f}x the read's), peak RSS {results[name]['rss_gb']:.2f} GB",
              flush=True)
    results["profile"] = measure("profile", store, out / "profile")
    profile = results["profile"]
    print(f"[{label}]   store-only profile {profile['seconds']:7.1f} s ({profile['seconds'] / read['seconds']:.1f}x the "
          f"read; CPU {profile['cpu_seconds']:.1f} s = {profile['cpu_seconds'] / read['cpu_seconds']:.1f}x the read's), "
          f"peak RSS {profile['rss_gb']:.2f} GB; stages {profile['stages']}", flush=True)
    return results


def child_main(kind: str, arguments: list[str]) -> None:
    if kind == "analysis":
        report = child_analysis(arguments[0], Path(arguments[1]), Path(arguments[2]))
    elif kind == "fit":
        report = child_fit(Path(arguments[0]), int(arguments[1]), int(arguments[2]))
    else:
        report = CHILDREN[kind](*map(Path, arguments))
    print(json.dumps({**report, "rss_gb": peak_rss_gb()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/scale"))
    parser.add_argument("--sizes", default="512,2048", help="numbers of images of the ViT-B stores")
    parser.add_argument("--large", type=int, default=512, help="images of the ViT-L store (0: none)")
    parser.add_argument("--tile-above", type=int, default=None,
                        help="make ViT-B stores larger than this many images by repeating the store of this size")
    parser.add_argument("--fit-steps", type=int, default=50, help="steps of the fit comparison (0: skip it)")
    parser.add_argument("--fit-batch-size", type=int, default=16)
    parser.add_argument("--alone", default="all",
                        help="stores (sizes, 'large' or 'all') on which each analysis is also timed alone")
    parser.add_argument("--repeat-ratio", action="store_true", help="measure profile / read at the largest N again")
    parser.add_argument("--record-only", action="store_true", help="record the stores and stop")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args.child[0], args.child[1:])
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    sizes = [int(part) for part in args.sizes.split(",")]
    stores = {}
    for n in sizes:
        if args.tile_above and n > args.tile_above:
            stores[n] = tiled_store(args.workdir, recorded_store(args.workdir, BASE, args.tile_above), n)
        else:
            stores[n] = recorded_store(args.workdir, BASE, n)
    if args.large:
        stores["large"] = recorded_store(args.workdir, LARGE, args.large)
    if args.record_only:
        return

    small = subset_store(args.workdir, stores[sizes[0]], FIXED_IMAGES)
    for stale in ("out_fixed", "out_repeat"):
        shutil.rmtree(args.workdir / stale, ignore_errors=True)
    fixed = measure("profile", small, args.workdir / "out_fixed")
    print(f"fixed cost: store-only profile of {FIXED_IMAGES} images {fixed['seconds']:.1f} s (CPU {fixed['cpu_seconds']:.1f} s) "
          f"(imports, figures, report, the N-independent work), peak RSS {fixed['rss_gb']:.2f} GB", flush=True)
    alone = {str(n) for n in stores} if args.alone == "all" else set(args.alone.split(","))
    results = {n: bench_store(f"ViT-B N={n}", store, args.workdir, str(n) in alone)
               for n, store in stores.items() if n != "large"}
    if "large" in stores:
        results["large"] = bench_store(f"ViT-L N={args.large}", stores["large"], args.workdir, "large" in alone)

    print("\nfloors (wall seconds, and CPU seconds of the process: on a shared machine the wall time also counts the"
          " other work's share of the cores)", flush=True)
    for n, result in results.items():
        read, profile = result["read"], result["profile"]
        peak = max(value["rss_gb"] for value in result.values() if isinstance(value, dict) and "rss_gb" in value)
        for clock, key in (("wall", "seconds"), ("CPU", "cpu_seconds")):
            variable = profile[key] - fixed[key]
            print(f"  {n} ({clock}): profile {profile[key]:.1f} s = fixed {fixed[key]:.1f} s + {variable:.1f} s = fixed + "
                  f"{variable / read[key]:.2f}x the read's {read[key]:.1f} s (floor <= 3x, fixed < 30 s)")
        print(f"  {n}: peak RSS {peak:.2f} GB (floor < 4 GB); validation {read['validation_seconds']:.2f} s + finite check "
              f"{read['finite_check_seconds']:.3f} s = "
              f"{100 * (read['validation_seconds'] + read['finite_check_seconds']) / profile['seconds']:.2f}% of the "
              "profile's wall time (floor < 5%)")
    base = [n for n in sizes if n in results]
    if len(base) >= 2:
        for clock, key in (("wall", "seconds"), ("CPU", "cpu_seconds")):
            a, b = (results[n]["profile"][key] for n in base[:2])
            print(f"  {clock} time ratio N={base[1]} / N={base[0]}: {b / a:.2f} (total), "
                  f"{(b - fixed[key]) / (a - fixed[key]):.2f} (less the fixed cost); floor {base[1] / base[0]:.1f} +- 0.6")
    if args.repeat_ratio:
        n = base[-1]
        read, profile = measure("read", stores[n]), measure("profile", stores[n], args.workdir / "out_repeat")
        print(f"  repeated at N={n}: profile / read = {profile['seconds'] / read['seconds']:.2f} wall, "
              f"{profile['cpu_seconds'] / read['cpu_seconds']:.2f} CPU (first run "
              f"{results[n]['profile']['seconds'] / results[n]['read']['seconds']:.2f} wall, "
              f"{results[n]['profile']['cpu_seconds'] / results[n]['read']['cpu_seconds']:.2f} CPU)")
    (args.workdir / "analyses_scale.json").write_text(json.dumps({"fixed": fixed, **{str(n): r for n, r in results.items()}},
                                                                 indent=1))
    if args.fit_steps:
        for n in base[:2]:
            fit = measure("fit", stores[n], args.fit_steps, args.fit_batch_size)
            print(f"  fit on N={n}: fitter step {fit['fit_step']:.2f} s vs bare loop {fit['bare_step']:.2f} s "
                  f"= {fit['fit_step'] / fit['bare_step']:.2f}x (floor <= 1.1x); data wait {100 * fit['wait_share']:.2f}% "
                  f"of step time (floor < 5%); peak RSS while fitting {fit['fit_rss_gb']:.2f} GB", flush=True)


if __name__ == "__main__":
    main()
