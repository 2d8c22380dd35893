"""Recording overhead: dynamo.record against a plain forward pass, in the same process.

Run by hand (not a test)::

    python benchmarks/record_overhead.py [--model vit_small_patch16_224] [--images 128] [--repeats 5]

Prints, for float32 and float16 stores, the throughput of recording full trajectories into a
local zarr store relative to ``model(x)`` over the same preprocessed batches (median of
``--repeats`` alternating runs), the bytes stored per image, and the peak memory of a
recording of N and of 10 N images from files (each in a fresh process), which should match:
memory must not grow with the number of images.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_sample_images

import dynamo


def plain_forward(model, pixels: torch.Tensor, batch_size: int) -> float:
    """Seconds for ``model(x)`` over all batches."""
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(pixels), batch_size):
            model(pixels[start : start + batch_size])
    return time.perf_counter() - started


def recording(loaded, pixels: torch.Tensor, batch_size: int, dtype: str, root: Path) -> tuple[float, int]:
    """Seconds to record all images into a fresh store, and the store's size in bytes."""
    out = root / f"bench-{dtype}.zarr"
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    dynamo.record(loaded, pixels, out, batch_size=batch_size, dtype=dtype, progress=False)
    seconds = time.perf_counter() - started
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    shutil.rmtree(out)
    return seconds, size


def peak_memory_mb(model: str, files: list[str], batch_size: int, root: Path) -> float:
    """Peak resident memory (MB) of a fresh process that records ``files``."""
    script = (
        "import json, resource, sys, dynamo\n"
        "model, files, out, batch = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4])\n"
        "dynamo.record(model, files, out, pretrained=False, batch_size=batch, progress=False)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
    )
    out = root / "memory.zarr"
    shutil.rmtree(out, ignore_errors=True)
    result = subprocess.run(
        [sys.executable, "-c", script, model, json.dumps(files), str(out), str(batch_size)],
        check=True, capture_output=True, text=True,
    )
    shutil.rmtree(out)
    return float(result.stdout.strip().splitlines()[-1])


def photo_files(root: Path, n: int, size: int) -> list[str]:
    """``n`` real photo crops (scikit-learn's sample images) saved as JPEG files."""
    photos = load_sample_images().images
    rng = np.random.default_rng(0)
    files = []
    for i in range(n):
        photo = photos[i % len(photos)]
        top, left = rng.integers(0, photo.shape[0] - size), rng.integers(0, photo.shape[1] - size)
        path = root / f"photo{i}.jpg"
        Image.fromarray(photo[top : top + size, left : left + size]).save(path)
        files.append(str(path))
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()

    torch.manual_seed(0)
    loaded = dynamo.load_model(args.model, pretrained=False)
    pixels = torch.randn(args.images, *loaded.data_config["input_size"])
    root = Path(tempfile.mkdtemp(prefix="dynamo-bench-"))
    print(f"{args.model}: {args.images} images, batch {args.batch_size}, {torch.get_num_threads()} torch threads")
    plain_forward(loaded.module, pixels[: args.batch_size], args.batch_size)  # warm-up
    results = {}
    for dtype in ("float32", "float16"):
        plain, recorded, size = [], [], 0
        for _ in range(args.repeats):
            plain.append(plain_forward(loaded.module, pixels, args.batch_size))
            seconds, size = recording(loaded, pixels, args.batch_size, dtype, root)
            recorded.append(seconds)
        plain_rate = args.images / statistics.median(plain)
        record_rate = args.images / statistics.median(recorded)
        results[dtype] = {
            "plain_img_per_s": round(plain_rate, 2),
            "record_img_per_s": round(record_rate, 2),
            "throughput_ratio": round(record_rate / plain_rate, 3),
            "bytes_per_image": size // args.images,
        }
        print(
            f"  {dtype}: plain {plain_rate:.1f} img/s, record {record_rate:.1f} img/s, "
            f"ratio {record_rate / plain_rate:.3f}, {size / args.images / 1e6:.2f} MB/image"
        )
    if not args.skip_memory:
        small = args.images // 4
        files = photo_files(root, small, 256)
        low = peak_memory_mb(args.model, files, args.batch_size, root)
        high = peak_memory_mb(args.model, files * 10, args.batch_size, root)
        results["peak_memory_mb"] = {str(small): round(low, 1), str(10 * small): round(high, 1), "ratio": round(high / low, 3)}
        print(f"  peak memory: {small} images {low:.0f} MB, {10 * small} images {high:.0f} MB, ratio {high / low:.3f}")
    shutil.rmtree(root)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
