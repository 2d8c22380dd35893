"""The ``dynamo`` command: one subcommand per step of the data flow.

Each subcommand prints a human summary, or one JSON object with ``--json``; errors print one
line naming the problem and what to do, and exit with status 2.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
import warnings

from safetensors import SafetensorError

from dynamo import zoo
from dynamo.capture import AUTOCAST_DTYPES
from dynamo.images import image_set
from dynamo.layout import NotAViTError
from dynamo.models import ModelLoadError
from dynamo.pipeline import analyze as analyzing
from dynamo.pipeline.cluster import connect
from dynamo.pipeline.fit import fit
from dynamo.pipeline.phases import phases as phase_stage
from dynamo.pipeline.profile import profile, profile_store
from dynamo.pipeline.registry import comma_list, int_list
from dynamo.pipeline.study import compare
from dynamo.record import RecordingError, record
from dynamo.shards import consolidate
from dynamo.store import StoreError, describe, is_trajectory_store, jsonable, open_trajectories, writer_lock
from dynamo.zoo import train as zoo_train

USER_ERRORS = (ModelLoadError, NotAViTError, StoreError, RecordingError, FileNotFoundError, ValueError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with connect(getattr(args, "cluster", None)), warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            summary = args.run(args)
    except (*USER_ERRORS, OSError, SafetensorError) as error:
        if args.debug:
            raise
        print(f"dynamo {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"dynamo {args.command}: interrupted; what was written is kept, run the same "
            "command again to resume",
            file=sys.stderr,
        )
        return 130
    if args.json:
        print(json.dumps(jsonable(summary), allow_nan=False))
    else:
        print(summary["text"])
    return 0


def _one_line(error: BaseException) -> str:
    """The error as one line; a file-system error says what to do (finished work is kept)."""
    if isinstance(error, (OSError, SafetensorError)) and not isinstance(error, FileNotFoundError):
        reason = "the disk is full" if getattr(error, "errno", None) == errno.ENOSPC else str(error)
        return (f"could not write ({reason}); what was written before is kept: free space or fix the cause and "
                "run the same command again")
    return " ".join(str(error).split())


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as ``dynamo: warning: ...`` lines, without the source line they came from."""
    print(f"dynamo: warning: {message}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dynamo", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
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
    rec.add_argument("--layers", type=int_list, help="comma-separated layers to keep (0 = embedding), default all")
    rec.add_argument("--patch-tokens", type=int, help="keep only N patch tokens, drawn with --seed")
    rec.add_argument("--seed", type=int, default=0)
    rec.add_argument("--compression", choices=["none", "zstd"], default="none")
    rec.add_argument("--device", default="cpu", help="torch device; with --shard auto under torchrun, 'cuda' means cuda:$LOCAL_RANK")
    rec.add_argument("--autocast", choices=sorted(AUTOCAST_DTYPES), help="run the forward under torch.autocast with this dtype (GPU speed)")
    rec.add_argument("--summaries-only", action="store_true", help="store cls / patch-mean / register-mean views and logits, not every token")
    rec.add_argument("--writers", type=int, default=2, help="threads writing batches to the store (default 2)")
    rec.add_argument(
        "--shard",
        help="record only shard I/N of the store's blocks (0-based; run all N, in parallel, anywhere that sees --out); "
        "'auto' reads SLURM_ARRAY_TASK_ID/COUNT, RANK/WORLD_SIZE (torchrun) or SLURM_PROCID/NTASKS",
    )
    rec.add_argument("--overwrite", action="store_true", help="replace a store recorded with other settings")
    rec.add_argument("--quiet", action="store_true", help="no progress bar")
    rec.add_argument("--json", action="store_true", help="print a JSON summary")
    rec.set_defaults(run=_record)

    cons = commands.add_parser(
        "consolidate",
        help="check that every shard of a recording finished, and mark the store complete",
        description="Validate a store written by `dynamo record --shard I/N` processes: every image recorded "
        "(or unreadable) and every recorded block's chunks on disk. Names the shards to run again otherwise.",
    )
    cons.add_argument("store")
    cons.add_argument("--json", action="store_true")
    cons.set_defaults(run=_consolidate)

    info = commands.add_parser("info", help="describe a trajectory store")
    info.add_argument("store")
    info.add_argument("--json", action="store_true")
    info.set_defaults(run=_info)

    train = commands.add_parser("train-zoo", help="train a zoo ViT on the bundled digits")
    zoo_train.configure_parser(train)
    train.add_argument("--json", action="store_true")
    train.set_defaults(run=_train_zoo)

    analyze = commands.add_parser(
        "analyze",
        help="dynamics analyses of a store: basins, token motion, update rank (+ live-model ones)",
        description="Run the dynamics analyses over a trajectory store; write <name>.zarr results, "
        "PNG figures with phase boundaries marked, and summary.json to --out.",
    )
    analyzing.configure_parser(analyze)
    _cluster_argument(analyze)
    analyze.add_argument("--json", action="store_true", help="print a JSON summary")
    analyze.set_defaults(run=_analyze)
    prof = commands.add_parser(
        "profile",
        help="record, phases, dynamics (and Raptor) of a ViT, as a report",
        description="One command from a model and images to DIR/report.html and DIR/summary.json. "
        "A re-run resumes: the recording and every finished stage are reused.",
    )
    prof.add_argument(
        "model", nargs="?", default=zoo.DEFAULT_MODEL,
        help=f"timm or zoo name, or an existing trajectory store (default: {zoo.DEFAULT_MODEL})",
    )
    prof.add_argument("--images", help="image folder (class sub-folders give labels); default: the bundled held-out digits")
    prof.add_argument("--checkpoint", help="local weights for a timm name (.safetensors, or a torch file of tensors)")
    prof.add_argument("--no-pretrained", action="store_true", help="random weights (tests of mechanics only)")
    prof.add_argument("--out", required=True, help="output folder")
    prof.add_argument("--limit", type=int, help="use only the first N images")
    prof.add_argument("--batch-size", type=int, default=32)
    prof.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    prof.add_argument("--method", choices=["maxcut", "contiguous"], default="maxcut", help="phase partition method")
    prof.add_argument("--eps", type=float, default=0.1, help="the paper's max-cut fraction f (default 0.1)")
    prof.add_argument("--k", type=int, help="number of phases (overrides --eps)")
    prof.add_argument("--bootstrap", type=int, default=100, help="bootstrap replicates for boundary stability")
    prof.add_argument("--only", type=comma_list, help="comma-separated dynamics analyses (default all)")
    prof.add_argument("--fit-raptor", type=int, metavar="K", help="also fit a K-block Raptor surrogate")
    prof.add_argument("--raptor-steps", type=int, help="Raptor training steps per stage")
    prof.add_argument("--seed", type=int, default=0)
    prof.add_argument("--device", default="cpu")
    prof.add_argument("--overwrite", action="store_true", help="replace a store in --out recorded with other settings")
    prof.add_argument("--quiet", action="store_true", help="no progress")
    _cluster_argument(prof)
    prof.add_argument("--json", action="store_true", help="print summary.json")
    prof.set_defaults(run=_profile)

    comp = commands.add_parser(
        "compare",
        help="side-by-side report of several profiles or stores",
        description="Similarity heatmaps in one grid, dynamics curves overlaid on normalised depth, "
        "and a table of headline numbers, as DIR/compare.html and DIR/compare.json.",
    )
    comp.add_argument("paths", nargs="+", help="profile folders (dynamo profile --out) or trajectory stores")
    comp.add_argument("--out", required=True)
    comp.add_argument("--labels", type=comma_list, help="comma-separated model labels")
    comp.add_argument("--quiet", action="store_true")
    comp.add_argument("--json", action="store_true")
    comp.set_defaults(run=_compare)

    phases = commands.add_parser(
        "phases",
        help="layer similarity of a store and its phases of depth",
        description="Layer x layer dissimilarity of a trajectory store (default: the paper's mean "
        "1 - cos over [cls, patch mean]), partitioned into phases by the paper's recursive max-cut "
        "or an exact contiguous DP, with scores and bootstrap boundary stability.",
    )
    phases.add_argument("store")
    setting = phases.add_mutually_exclusive_group()
    setting.add_argument("--k", type=int, help="number of phases")
    setting.add_argument("--eps", type=float, default=0.1, help="the paper's fraction f (0.2/0.1/0.09 -> 2/3/4 phases on DINOv2-B; default 0.1)")
    phases.add_argument("--method", choices=["maxcut", "contiguous"], default="maxcut")
    phases.add_argument("--measure", choices=["cosine", "angular", "mse", "cka"], default="cosine")
    phases.add_argument("--tokens", default="cls+patch_mean", help="token groups joined by +: cls, patch_mean, register_mean, patch, register, all")
    phases.add_argument("--layers", type=int_list, help="comma-separated layers (default: block outputs 1..L, as the paper)")
    phases.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples of the images for boundary stability (0: none)")
    phases.add_argument("--seed", type=int, default=0)
    phases.add_argument("--figure", help="write the heatmap with phase boundaries to this PNG")
    phases.add_argument("--out", help="write the result (matrix, phases, stability) to this .zarr")
    phases.add_argument("--quiet", action="store_true", help="no progress bar")
    _cluster_argument(phases)
    phases.add_argument("--json", action="store_true", help="print a JSON summary")
    phases.set_defaults(run=_phases)

    fit = commands.add_parser(
        "fit",
        help="fit a Raptor surrogate (k recurrent blocks) to a trajectory store",
        description="Fit k shared blocks, applied recurrently with a depth signal, to reproduce the "
        "L blocks of the recorded ViT (the paper's two-stage recipe), and report R² per layer and "
        "the surrogate's accuracy with the teacher's head on held-out images. Weights and config go "
        "to --out; an interrupted fit resumes when the same command is run again.",
    )
    fit.add_argument("store")
    fit.add_argument("--k", type=int, help="number of blocks (default: the partition's length, else 2)")
    fit.add_argument("--partition", help="phases '1-7,8-12' or thresholds '7' (default: exact contiguous split into k phases)")
    fit.add_argument("--out", required=True, help="output folder (weights.safetensors, config.json, checkpoint/)")
    fit.add_argument("--steps", type=int, help="steps per stage-1 block (default 200)")
    fit.add_argument("--stage2-steps", type=int, help="stage-2 steps (default: --steps)")
    fit.add_argument("--batch-size", type=int, help="default 16")
    fit.add_argument("--lr", type=float, help="peak AdamW learning rate (default 2e-3)")
    fit.add_argument("--mlp", choices=["swiglu", "gelu"], help="block MLP (default swiglu, as the paper)")
    fit.add_argument("--baselines", type=int, default=0, metavar="N",
                     help="also fit the uniform partition, N random contiguous partitions and k=1, with the same recipe")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--device", default="cpu")
    fit.add_argument("--quiet", action="store_true", help="no progress bars")
    fit.add_argument("--json", action="store_true", help="print a JSON summary")
    fit.set_defaults(run=_fit)
    return parser


def _record(args) -> dict:
    images = args.images or zoo.default_images()
    device = args.device
    if device == "cuda" and args.shard == "auto" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
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
        device=device,
        autocast=args.autocast,
        summaries_only=args.summaries_only,
        writers=args.writers,
        shard=args.shard,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    summary = describe(args.out)
    summary["seconds"] = round(time.perf_counter() - started, 2)
    summary["text"] += f"\nrecorded in {summary['seconds']} s"
    return summary


def _consolidate(args) -> dict:
    summary = describe(args.store)
    if not summary["complete"]:  # a complete, undamaged store needs no lock (and may be read-only)
        with writer_lock(args.store):
            consolidate(args.store)
        summary = describe(args.store)
    return summary


def _info(args) -> dict:
    return describe(args.store)


def _train_zoo(args) -> dict:
    summary = zoo_train.run_from_args(args)
    summary.setdefault("text", json.dumps(summary, indent=2, default=str))
    return summary


def _analyze(args) -> dict:
    return analyzing.run_from_args(args)


def _profile(args) -> dict:
    options = dict(
        phase_method=args.method, eps=args.eps, k=args.k, n_bootstrap=args.bootstrap, only=args.only,
        fit_raptor=args.fit_raptor, raptor_steps=args.raptor_steps, device=args.device, seed=args.seed,
        progress=not args.quiet, command=" ".join(sys.argv),
    )
    if is_trajectory_store(args.model):
        return profile_store(args.model, args.out, **options)
    return profile(
        args.model, args.out, images=args.images, checkpoint=args.checkpoint, pretrained=not args.no_pretrained,
        limit=args.limit, batch_size=args.batch_size, dtype=args.dtype, overwrite=args.overwrite, **options,
    )


def _compare(args) -> dict:
    return compare(args.paths, args.out, labels=args.labels, progress=not args.quiet)


def _phases(args) -> dict:
    summary = phase_stage(
        open_trajectories(args.store), method=args.method, eps=args.eps, k=args.k, measure=args.measure,
        tokens=args.tokens, layers=args.layers, n_bootstrap=args.bootstrap, seed=args.seed, out=args.out,
        figure=args.figure, progress=not args.quiet,
    )
    return {"store": str(args.store), **summary}


def _fit(args) -> dict:
    params = {name: getattr(args, name) for name in ("steps", "stage2_steps", "batch_size", "lr", "mlp")}
    return fit(args.store, args.out, k=args.k, partition=args.partition, baselines=args.baselines, seed=args.seed,
               device=args.device, progress=not args.quiet, **params)


def _cluster_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cluster", metavar="ADDRESS",
        help="run the store-only analyses on a dask.distributed cluster: a scheduler address "
        "(tcp://host:port; every worker must read the store at the same path) or local:N for N "
        "local worker processes. Live-model analyses (perturbation, jacobian, swap, Raptor) "
        "and recording stay in this process",
    )


if __name__ == "__main__":
    sys.exit(main())
