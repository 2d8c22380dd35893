"""Recording throughput: dynamo.record against a plain forward pass, in the same process.

Run by hand (not a test)::

    python benchmarks/record_throughput.py [--model vit_small_patch16_224] [--images 128] [--repeats 5]
    # on a GPU node, ViT-B, to the local disk:
    python benchmarks/record_throughput.py --model vit_base_patch16_224 --device cuda \
        --autocast bfloat16 --images 4096 --batch-size 256 --out-dir /local/scratch --repeats 3

Prints, for full trajectories in float32 and float16 and for summaries only, the throughput of
recording into a zarr store under ``--out-dir`` (images/s and GB/s written) relative to
``model(x)`` over the same batches moved to the same device (median of ``--repeats``
alternating runs), the bytes stored per image, the disk's own sequential write bandwidth
(the limit for full trajectories), and the peak memory of a recording of N and of 10 N images
from files (each in a fresh process), which should match: memory must not grow with the
number of images.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
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
from dynamo.capture import AUTOCAST_DTYPES

MODES = {  # name: record() options
    "full-float32": {"dtype": "float32"},
    "full-float16": {"dtype": "float16"},
    "summaries": {"summaries_only": True},
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_forward(model, pixels: torch.Tensor, batch_size: int, device, autocast) -> float:
    """Seconds for ``model(x)`` over all batches, each moved from host memory to ``device``."""
    context = torch.autocast(device.type, dtype=AUTOCAST_DTYPES[autocast]) if autocast else contextlib.nullcontext()
    synchronize(device)
    started = time.perf_counter()
    with torch.inference_mode(), context:
        for start in range(0, len(pixels), batch_size):
            model(pixels[start : start + batch_size].to(device, non_blocking=True))
    synchronize(device)
    return time.perf_counter() - started


def recording(loaded, pixels, batch_size, options, device, autocast, root: Path) -> tuple[float, int]:
    """Seconds to record all images into a fresh store, and the store's size in bytes."""
    out = root / "bench.zarr"
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    dynamo.record(loaded, pixels, out, batch_size=batch_size, device=str(device), autocast=autocast, progress=False, **options)
    seconds = time.perf_counter() - started
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    shutil.rmtree(out)
    return seconds, size


def disk_write_bandwidth(root: Path, total_bytes: int, block_bytes: int = 64 * 2**20) -> dict:
    """Sequential write bandwidth (GB/s) to ``root``: page-cache speed and with fsync at the end."""
    block = np.random.default_rng(0).integers(0, 255, block_bytes, dtype=np.uint8).tobytes()
    path = root / "bandwidth.bin"
    started = time.perf_counter()
    with open(path, "wb") as handle:
        for _ in range(max(1, total_bytes // block_bytes)):
            handle.write(block)
        buffered = time.perf_counter() - started
        handle.flush()
        os.fsync(handle.fileno())
    synced = time.perf_counter() - started
    written = path.stat().st_size
    path.unlink()
    return {"buffered_gb_per_s": round(written / buffered / 1e9, 2), "fsync_gb_per_s": round(written / synced / 1e9, 2)}


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
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--autocast", choices=sorted(AUTOCAST_DTYPES))
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}")
    parser.add_argument("--out-dir", help="where stores are written (default: a temporary folder)")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()

    torch.manual_seed(0)
    device = torch.device(args.device)
    loaded = dynamo.load_model(args.model, pretrained=False)
    loaded.module.to(device)
    pixels = torch.randn(args.images, *loaded.data_config["input_size"])
    if device.type == "cuda":
        pixels = pixels.pin_memory()
    root = Path(tempfile.mkdtemp(prefix="dynamo-bench-", dir=args.out_dir))
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} torch threads"
    print(f"{args.model}: {args.images} images, batch {args.batch_size}, {device} ({hardware}), "
          f"autocast {args.autocast or 'off'}, stores in {root}")
    plain_forward(loaded.module, pixels[: args.batch_size], args.batch_size, device, args.autocast)  # warm-up
    results = {"model": args.model, "device": str(device), "hardware": hardware, "autocast": args.autocast}
    for mode in args.modes.split(","):
        plain, recorded, size = [], [], 0
        for _ in range(args.repeats):
            plain.append(plain_forward(loaded.module, pixels, args.batch_size, device, args.autocast))
            seconds, size = recording(loaded, pixels, args.batch_size, MODES[mode], device, args.autocast, root)
            recorded.append(seconds)
        plain_rate = args.images / statistics.median(plain)
        record_rate = args.images / statistics.median(recorded)
        results[mode] = {
            "plain_img_per_s": round(plain_rate, 2),
            "record_img_per_s": round(record_rate, 2),
            "throughput_ratio": round(record_rate / plain_rate, 3),
            "bytes_per_image": size // args.images,
            "write_gb_per_s": round(size / statistics.median(recorded) / 1e9, 3),
        }
        print(
            f"  {mode}: plain {plain_rate:.1f} img/s, record {record_rate:.1f} img/s, "
            f"ratio {record_rate / plain_rate:.3f}, {size / args.images / 1e6:.3f} MB/image, "
            f"{results[mode]['write_gb_per_s']:.3f} GB/s written"
        )
    results["disk"] = disk_write_bandwidth(root, total_bytes=max(2**30, max(r["bytes_per_image"] for k, r in results.items() if k in MODES) * args.images))
    print(f"  disk sequential write: {results['disk']['buffered_gb_per_s']} GB/s buffered, {results['disk']['fsync_gb_per_s']} GB/s with fsync")
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
