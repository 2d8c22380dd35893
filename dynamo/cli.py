"""The ``dynamo`` command: one subcommand per step of the data flow.

Each subcommand prints a human summary, or one JSON object with ``--json``; errors print one
line naming the problem and what to do, and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from dynamo import zoo
from dynamo.images import image_set
from dynamo.layout import NotAViTError
from dynamo.models import ModelLoadError
from dynamo.record import RecordingError, record
from dynamo.store import PENDING, RECORDED, StoreError, open_trajectories

USER_ERRORS = (ModelLoadError, NotAViTError, StoreError, RecordingError, FileNotFoundError, ValueError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        summary = args.run(args)
    except USER_ERRORS as error:
        print(f"dynamo {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"dynamo {args.command}: interrupted; what was written is kept, run the same "
            "command again to resume",
            file=sys.stderr,
        )
        return 130
    if args.json:
        print(json.dumps(summary, default=str))
    else:
        print(summary["text"])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dynamo", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    rec = commands.add_parser(
        "record",
        help="record token trajectories of a ViT into a zarr store",
        description="Record every token's trajectory through every block of a ViT. Re-running "
        "the same command on an interrupted store resumes it.",
    )
    rec.add_argument(
        "model",
        nargs="?",
        default=zoo.DEFAULT_MODEL,
        help=f"timm model name or zoo name (default: {zoo.DEFAULT_MODEL}); zoo: {', '.join(zoo.list_models())}",
    )
    rec.add_argument("--images", help="image folder (class sub-folders give labels); default: the bundled held-out digits")
    rec.add_argument("--out", required=True, help="store path, e.g. trajectories.zarr")
    rec.add_argument("--checkpoint", help="local weights for a timm name (.safetensors, or a torch file of tensors)")
    rec.add_argument("--no-pretrained", action="store_true", help="random weights (tests of mechanics only)")
    rec.add_argument("--batch-size", type=int, default=32)
    rec.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    rec.add_argument("--limit", type=int, help="record only the first N images")
    rec.add_argument("--layers", type=_int_list, help="comma-separated layers to keep (0 = embedding), default all")
    rec.add_argument("--patch-tokens", type=int, help="keep only N patch tokens, drawn with --seed")
    rec.add_argument("--seed", type=int, default=0)
    rec.add_argument("--compression", choices=["none", "zstd"], default="none")
    rec.add_argument("--device", default="cpu")
    rec.add_argument("--overwrite", action="store_true", help="replace a store recorded with other settings")
    rec.add_argument("--quiet", action="store_true", help="no progress bar")
    rec.add_argument("--json", action="store_true", help="print a JSON summary")
    rec.set_defaults(run=_record)

    info = commands.add_parser("info", help="describe a trajectory store")
    info.add_argument("store")
    info.add_argument("--json", action="store_true")
    info.set_defaults(run=_info)

    from dynamo.zoo import train as zoo_train

    train = commands.add_parser("train-zoo", help="train a zoo ViT on the bundled digits")
    zoo_train.configure_parser(train)
    train.add_argument("--json", action="store_true")
    train.set_defaults(run=_train_zoo)
    return parser


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _record(args) -> dict:
    images = args.images or zoo.default_images()
    started = time.perf_counter()
    record(
        args.model,
        image_set(images),
        args.out,
        checkpoint=args.checkpoint,
        pretrained=not args.no_pretrained,
        batch_size=args.batch_size,
        dtype=args.dtype,
        layers=args.layers,
        patch_tokens=args.patch_tokens,
        seed=args.seed,
        compression=args.compression,
        limit=args.limit,
        device=args.device,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    summary = describe(args.out)
    summary["seconds"] = round(time.perf_counter() - started, 2)
    summary["text"] += f"\nrecorded in {summary['seconds']} s"
    return summary


def _info(args) -> dict:
    return describe(args.store)


def _train_zoo(args) -> dict:
    from dynamo.zoo import train as zoo_train

    summary = zoo_train.run_from_args(args)
    summary.setdefault("text", json.dumps(summary, indent=2, default=str))
    return summary


def describe(path: str | Path) -> dict:
    """Headline facts of a store: model, sizes, completeness, and where it is."""
    dataset = open_trajectories(path, recorded_only=False)
    status = dataset["status"].values
    hidden = dataset["hidden"]
    attrs = dataset.attrs
    size_bytes = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    summary = {
        "store": str(path),
        "model": attrs["model"],
        "weights_sha256": attrs["weights_sha256"],
        "n_images": int(status.size),
        "n_recorded": int((status == RECORDED).sum()),
        "n_pending": int((status == PENDING).sum()),
        "unreadable_images": list(attrs.get("unreadable_images", [])),
        "layers": int(hidden.sizes["layer"]),
        "tokens": int(hidden.sizes["token"]),
        "features": int(hidden.sizes["feature"]),
        "token_kinds": {k: int((dataset["token_kind"] == k).sum()) for k in ("cls", "dist", "register", "patch")},
        "dtype": str(hidden.dtype),
        "bytes": size_bytes,
        "complete": bool(attrs.get("complete")),
    }
    kinds = ", ".join(f"{n} {k}" for k, n in summary["token_kinds"].items() if n)
    summary["text"] = (
        f"{summary['store']}: {summary['model']} (weights sha256 {summary['weights_sha256'][:12]})\n"
        f"{summary['n_recorded']}/{summary['n_images']} images recorded"
        f"{', ' + str(len(summary['unreadable_images'])) + ' unreadable (skipped)' if summary['unreadable_images'] else ''}"
        f"{', INCOMPLETE: run the same record command to resume' if summary['n_pending'] else ''}\n"
        f"hidden: {summary['layers']} layers x {summary['tokens']} tokens ({kinds}) x "
        f"{summary['features']} features, {summary['dtype']}, {size_bytes / 1e6:.1f} MB on disk"
    )
    return summary


if __name__ == "__main__":
    sys.exit(main())
