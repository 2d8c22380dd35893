"""The ``dynamo`` command: one subcommand per step of the data flow.

Each prints a human summary, or one JSON object with ``--json``; errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
import warnings

from dynamo.pipeline.arguments import (
    ANALYSIS_OPTIONS,
    add_arguments,
    boundary_list,
    comma_list,
    int_list,
    nonnegative_float,
    nonnegative_int,
    positive_float_list,
    positive_int,
    positive_int_list,
    timm_options,
    torch_device,
)
from dynamo.zoo import DEFAULT_MODEL, list_models
from dynamo.zoo.config import configure_parser as configure_zoo_parser

# Choices and defaults the parser shows, as literals so that --help imports nothing heavy; tests hold
# them equal to their sources (SURROGATES, RECIPES, the ladder's rungs, AUTOCAST_DTYPES, PRESETS).
ANALYSIS_NAMES = tuple(ANALYSIS_OPTIONS)
SURROGATES = ("identity", "linear", "dmd", "teacher-block", "raptor")
RECIPES = ("paper",)
LADDER_SURROGATES = ("identity", "linear", "dmd", "teacher-block", "raptor", "linear-per-layer")
LOOP_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
RAPTOR_INITS = ("random", "teacher-block")
AUTOCAST_DTYPES = ("bfloat16", "float16")
PRESETS = ("paper",)
# `dynamo fit` flags of Raptor's training, with their defaults when not given
RAPTOR_ONLY = {name: None for name in ("recipe", "steps", "stage2_steps", "step_budget", "patience", "tol", "validate_every", "batch_size",
                                       "lr", "weight_decay", "warmup", "min_lr", "tf_anneal", "tf_floor", "noise",
                                       "stage1_loss", "stage2_loss", "grad_clip", "mlp")} | {"baselines": 0, "shuffled": 0, "seeds": 1}


def _user_errors() -> tuple[type[BaseException], ...]:
    """The errors printed as one line (exit status 2) rather than a traceback."""
    from safetensors import SafetensorError

    from dynamo.layout import NotAViTError
    from dynamo.models import ModelLoadError
    from dynamo.record import RecordingError
    from dynamo.store import StoreError

    return (ModelLoadError, NotAViTError, StoreError, RecordingError, FileNotFoundError, ValueError, OSError,
            SafetensorError)


HEAD_HELP = ("linear head on [cls ‖ patch mean] for the accuracies (a DINOv2 *_linear_head.pth); default the model's own, "
             "or a probe fitted on the labels of a headless model")
COMPUTE_COMMANDS = ("record", "analyze", "profile", "phases", "fit", "ladder", "concepts")  # take --threads


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from dynamo.pipeline.cluster import connect
    from dynamo.serialize import jsonable

    if args.command in COMPUTE_COMMANDS:
        from dynamo.threads import set_threads

        set_threads(args.threads)
    try:
        with connect(getattr(args, "cluster", None)), warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            summary = args.run(args)
    except _user_errors() as error:
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
    from safetensors import SafetensorError

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
    _source_arguments(rec, f"timm model name or zoo name (default: {DEFAULT_MODEL}); zoo: {', '.join(list_models())}")
    rec.add_argument("--out", required=True, help="store path, e.g. trajectories.zarr")
    rec.add_argument("--layers", type=int_list, help="comma-separated layers to keep (0 = embedding), default all")
    rec.add_argument("--patch-tokens", type=positive_int, help="keep only N patch tokens, drawn with --seed")
    rec.add_argument("--seed", type=int, default=0, help="seed of the patch-token draw and of random weights (default 0)")
    rec.add_argument("--compression", choices=["none", "zstd"], default="none")
    rec.add_argument("--device", type=torch_device, default="cpu", help="torch device; with --shard auto under torchrun, 'cuda' means cuda:$LOCAL_RANK")
    rec.add_argument("--autocast", choices=AUTOCAST_DTYPES, help="run the forward under torch.autocast with this dtype (GPU speed)")
    rec.add_argument("--summaries-only", action="store_true", help="store cls / patch-mean / register-mean views and logits, not every token")
    rec.add_argument("--writers", type=positive_int, default=2, help="threads writing batches to the store (default 2)")
    rec.add_argument(
        "--shard",
        help="record only shard I/N of the store's blocks (0-based; run all N, in parallel, anywhere that sees --out); "
        "'auto' reads SLURM_ARRAY_TASK_ID/COUNT, RANK/WORLD_SIZE (torchrun) or SLURM_PROCID/NTASKS",
    )
    rec.add_argument("--overwrite", action="store_true", help="replace a store recorded with other settings")
    _common_arguments(rec, _record, quiet="no progress bar")

    cons = commands.add_parser(
        "consolidate",
        help="check that every shard of a recording finished, and mark the store complete",
        description="Validate a store written by `dynamo record --shard I/N` processes: every image recorded "
        "(or unreadable) and every recorded block's chunks on disk. Names the shards to run again otherwise.",
    )
    cons.add_argument("store")
    _common_arguments(cons, _consolidate, quiet=None)

    info = commands.add_parser("info", help="describe a trajectory store")
    info.add_argument("store")
    _common_arguments(info, _info, quiet=None)

    train = commands.add_parser("train-zoo", help="train a zoo ViT on the bundled digits or on Fashion-MNIST (--dataset fashion)")
    configure_zoo_parser(train)
    _common_arguments(train, _train_zoo, quiet=None)

    analyze = commands.add_parser(
        "analyze",
        help="dynamics analyses of a store: basins, token motion, update rank (+ live-model ones)",
        description="Run the dynamics analyses over a trajectory store; write <name>.zarr results, "
        "PNG figures with phase boundaries marked, and summary.json to --out.",
    )
    _analyze_arguments(analyze)
    _cluster_argument(analyze)
    _common_arguments(analyze, _analyze, quiet=None)
    prof = commands.add_parser(
        "profile",
        help="record, phases, dynamics (and Raptor) of a ViT, as a report",
        description="One command from a model and images to DIR/report.html and DIR/summary.json. "
        "A re-run resumes: the recording and every finished stage are reused.",
    )
    _source_arguments(prof, f"timm or zoo name, or an existing trajectory store (default: {DEFAULT_MODEL})")
    prof.add_argument("--out", required=True, help="output folder")
    prof.add_argument("--method", choices=["maxcut", "contiguous"], default="maxcut", help="phase partition method")
    prof.add_argument("--eps", type=nonnegative_float, default=0.1, help="the paper's max-cut fraction f (default 0.1)")
    prof.add_argument("--k", type=positive_int, help="number of phases (overrides --eps)")
    prof.add_argument("--bootstrap", type=nonnegative_int, default=100, help="bootstrap replicates for boundary stability")
    _tokens_argument(prof)
    prof.add_argument("--only", type=comma_list, help="comma-separated dynamics analyses (default all)")
    prof.add_argument("--fit-raptor", type=positive_int, metavar="K", help="also fit a K-block Raptor surrogate")
    prof.add_argument("--raptor-steps", type=positive_int, help="Raptor training steps per stage")
    prof.add_argument("--concepts", action="store_true",
                      help="also learn one concept dictionary across depth and analyse it on the phases "
                      "(about a minute on the default store; see dynamo concepts)")
    prof.add_argument("--head", metavar="FILE", help=HEAD_HELP)
    prof.add_argument("--overwrite", action="store_true", help="replace a store in --out recorded with other settings")
    _cluster_argument(prof)
    _common_arguments(prof, _profile, seed=True, device=True, quiet="no progress")

    comp = commands.add_parser(
        "compare",
        help="side-by-side report of several profiles or stores",
        description="Similarity heatmaps in one grid, dynamics curves overlaid on normalised depth, "
        "and a table of headline numbers, as DIR/compare.html and DIR/compare.json.",
    )
    comp.add_argument("paths", nargs="+", help="profile folders (dynamo profile --out) or trajectory stores")
    comp.add_argument("--out", required=True)
    comp.add_argument("--labels", type=comma_list, help="comma-separated model labels")
    _common_arguments(comp, _compare)

    phases = commands.add_parser(
        "phases",
        help="layer similarity of a store and its phases of depth",
        description="Layer x layer dissimilarity of a trajectory store (default: the paper's mean "
        "1 - cos over [cls, patch mean]), partitioned into phases by the paper's recursive max-cut "
        "or an exact contiguous DP, with scores and bootstrap boundary stability.",
    )
    phases.add_argument("store")
    setting = phases.add_mutually_exclusive_group()
    setting.add_argument("--k", type=positive_int, help="number of phases")
    setting.add_argument("--eps", type=nonnegative_float, default=0.1, help="the paper's fraction f (0.2/0.1/0.09 -> 2/3/4 phases on DINOv2-B; default 0.1)")
    phases.add_argument("--method", choices=["maxcut", "contiguous"], default="maxcut")
    phases.add_argument("--measure", choices=["cosine", "angular", "mse", "cka"], default="cosine")
    _tokens_argument(phases)
    phases.add_argument("--layers", type=int_list, help="comma-separated layers (default: block outputs 1..L, as the paper)")
    phases.add_argument("--bootstrap", type=nonnegative_int, default=200, help="bootstrap resamples of the images for boundary stability (0: none)")
    phases.add_argument("--figure", help="write the heatmap with phase boundaries to this PNG")
    phases.add_argument("--out", help="write the result (matrix, phases, stability) to this .zarr")
    _cluster_argument(phases)
    _common_arguments(phases, _phases, seed=True, quiet="no progress bar")
    lens = phases.add_argument_group(
        "lenses", "phases under several lenses: every lens segmented into the same k phases (default: as many as "
        "the first lens's max-cut finds at --eps), by max-cut and contiguous DP, and the agreement of each pair",
    )
    lens.add_argument("--lens", type=comma_list, metavar="LENS,...",
                      help="compare lenses instead of one matrix: cosine, cka, jacobian (block-Jacobian singular "
                      "subspaces; needs the live model), knee (knees of the per-layer angular change)")
    lens.add_argument("--model", help="jacobian lens: the live model (default the one the store was recorded with)")
    lens.add_argument("--checkpoint", help="jacobian lens: local weights for --model")
    lens.add_argument("--device", type=torch_device, default="cpu", help="jacobian lens: torch device")
    lens.add_argument("--jacobian-images", type=positive_int, default=32, help="jacobian lens: images, evenly spaced (default 32)")
    lens.add_argument("--rank", type=positive_int, default=4, help="jacobian lens: singular directions per block (default 4)")
    lens.add_argument("--tolerance", type=nonnegative_int, default=1, help="layers by which matching boundaries may differ (default 1)")

    fit = commands.add_parser(
        "fit",
        help="fit a Raptor surrogate (k recurrent blocks) to a trajectory store",
        description="Fit k shared blocks, applied recurrently with a depth signal, to reproduce the "
        "L blocks of the recorded ViT (the paper's two-stage recipe), and report R² per layer and "
        "the surrogate's accuracy with the teacher's head on held-out images. Weights and config go "
        "to --out; an interrupted fit resumes when the same command is run again.",
    )
    fit.add_argument("store")
    fit.add_argument("--surrogate", choices=SURROGATES, default="raptor",
                     help="raptor (default: trained shared blocks), or a rung of the ladder: identity, linear (a "
                     "ridge map per phase), dmd (exact DMD per phase), teacher-block (the teacher's best own block "
                     "per phase); the training flags (--recipe, --steps, --lr, --baselines, --seeds, ...) apply to raptor only")
    fit.add_argument("--k", type=positive_int_list, help="number of blocks, or several (2,3,4: stage-1 blocks of shared "
                     "segments are trained once); default: the partition's length, else 2")
    fit.add_argument("--partition", help="phases '1-7,8-12' or thresholds '7' (default: the max-cut phases when they "
                     "are k contiguous ones, else the exact contiguous split into k phases)")
    fit.add_argument("--out", required=True, help="output folder (weights.safetensors, config.json, checkpoint/, stage1/)")
    fit.add_argument("--recipe", choices=RECIPES, help="start from the paper's recipe (AdamW lr 3e-4, wd 1e-4, "
                     "batch 64, 10k warmup, cosine to 1e-6, anneal 25%%, paper losses, clip 1.0, fixed steps); flags override it")
    _raptor_arguments(fit)
    fit.add_argument("--step-budget", choices=["segment", "layer"], help="--steps per stage-1 segment, or per block of its "
                     "phase: every partition with the same k then gets the same stage-1 budget (default segment)")
    fit.add_argument("--tol", type=float, help="held-out R² gain that counts as an improvement (default 1e-4)")
    fit.add_argument("--validate-every", type=positive_int, help="steps between validations (default 50)")
    fit.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 1e-4)")
    fit.add_argument("--warmup", type=float, help="linear warmup: a fraction of each segment's steps if below 1, "
                     "else a number of steps (default 0.05)")
    fit.add_argument("--min-lr", type=float, help="end of the cosine decay (default 1e-6)")
    fit.add_argument("--tf-anneal", type=float, help="fraction of stage-1 steps over which teacher forcing anneals "
                     "into rollout (default 0.25)")
    fit.add_argument("--tf-floor", type=float, help="teacher-forcing weight the anneal ends at (default 0)")
    fit.add_argument("--noise", type=float, help="sigma of Gaussian noise on block inputs in rollouts (default 0)")
    fit.add_argument("--stage1-loss", nargs="+", metavar="LOSS", help="paper (MSE, last segment 0.34/0.33/0.33), mse, "
                     "cls/register/patch weights such as 0.34/0.33/0.33, or one per segment: mse mse 0.34/0.33/0.33 "
                     "(weights used as given; default paper)")
    fit.add_argument("--stage2-loss", metavar="LOSS", help="paper (0.45/0.10/0.45), mse or weights (default paper)")
    fit.add_argument("--grad-clip", type=float, help="gradient-norm clipping (default 1.0)")
    fit.add_argument("--baselines", type=nonnegative_int, default=0, metavar="N",
                     help="also fit the uniform partition, N random contiguous partitions and k=1, with the same recipe")
    fit.add_argument("--shuffled", type=nonnegative_int, default=0, metavar="N",
                     help="also fit N random shuffled partitions (phases of random blocks, not contiguous; the paper's Fig. 3)")
    fit.add_argument("--head", metavar="FILE", help=HEAD_HELP)
    fit.add_argument("--seeds", type=positive_int, default=1, metavar="N", help="fit each k with seeds S..S+N-1 (same held-out "
                     "images) and report mean ± std per layer")
    _common_arguments(fit, _fit, seed=True, device=True)

    lad = commands.add_parser(
        "ladder",
        help="fit a ladder of surrogates (identity, linear, dmd, teacher-block, raptor) for several k and compare them",
        description="For each k, fit every rung on the same partition and training images and score it on the same "
        "held-out images: R² per layer and token kind, accuracy through the teacher's head, ε (the ε-BRH's max over "
        "layers of the mean relative Frobenius error, the stricter mean of each image's max, per token kind, with "
        "the skill over the identity x_l = x_0 and bootstrap intervals) and the loop count under each depth signal. Writes ladder.csv/.json, "
        "ladder.png, ladder_layers.png, loop_count.png, ladder.zarr and ladder.html to --out.",
    )
    lad.add_argument("store")
    lad.add_argument("--k", type=positive_int_list, default=[1, 2, 3, 4], help="numbers of phases (default 1,2,3,4)")
    lad.add_argument("--out", required=True, help="output folder")
    lad.add_argument("--surrogates", type=comma_list, default=list(LADDER_SURROGATES),
                     help=f"rungs to fit (default all: {','.join(LADDER_SURROGATES)})")
    lad.add_argument("--loop-scales", type=positive_float_list, default=list(LOOP_SCALES),
                     help="loop counts, as multiples of each phase's length (default 0.5,0.75,1,1.25,1.5,2)")
    lad.add_argument("--bootstrap", type=nonnegative_int, default=1000, help="bootstrap resamples of the held-out images for ε (default 1000)")
    lad.add_argument("--head", metavar="FILE", help=HEAD_HELP)
    _raptor_arguments(lad, prefix="Raptor: ")
    lad.add_argument("--raptor-init", choices=RAPTOR_INITS, default="random",
                     help="Raptor's blocks start at random (default, the paper's) or as the teacher-block rung's choice (then "
                     "with the teacher's MLP kind unless --mlp is given)")
    _tokens_argument(lad)
    _common_arguments(lad, _ladder, seed=True, device=True)

    con = commands.add_parser(
        "concepts",
        help="one sparse dictionary across depth: which concepts are born, peak and die in which phase",
        description="Fit one TopK or RA-SAE dictionary on the tokens of every layer (each layer scaled to a common norm, "
        "streamed in shuffled layer-balanced chunks), then profile every concept per layer and token kind, test whether "
        "births and deaths fall at the phase boundaries, and draw the figures. Writes concepts.zarr, dictionary/, PNG "
        "figures and summary.json to --out; an interrupted fit resumes when the same command is run again.",
    )
    con.add_argument("store")
    con.add_argument("--out", required=True, help="output folder")
    con.add_argument("--kind", choices=["topk", "rasae"], default="topk", help="TopK SAE or Relaxed Archetypal SAE (default topk)")
    con.add_argument("--concepts", type=positive_int, help="number of concepts (default 8 x the width)")
    con.add_argument("--k", type=positive_int, help="active concepts per token (default 8)")
    con.add_argument("--steps", type=positive_int, help="training steps (default 1500, batches of 1024 tokens)")
    con.add_argument("--per-phase", action="store_true", help="also fit one dictionary per phase, for comparison")
    con.add_argument("--stability", action="store_true",
                     help="also fit a second seed of TopK and of RA-SAE and match their atoms (4 fits in all)")
    con.add_argument("--boundaries", type=int_list, help="phase boundaries, e.g. 4,8 (default: the store's max-cut phases)")
    _common_arguments(con, _concepts, seed=True, device=True)
    for name in COMPUTE_COMMANDS:
        commands.choices[name].add_argument("--threads", type=positive_int, help="compute threads (torch, BLAS); default "
                                            "OMP_NUM_THREADS, else half the cores, the rest reading the store")
    return parser


def _record(args) -> dict:
    from dynamo import zoo
    from dynamo.images import image_set
    from dynamo.record import record
    from dynamo.store import describe

    images = args.images or zoo.default_images(args.model)
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
        **_image_options(args),
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
    from dynamo.shards import consolidate
    from dynamo.store import describe, writer_lock

    summary = describe(args.store)
    if not summary["complete"]:  # a complete, undamaged store needs no lock (and may be read-only)
        with writer_lock(args.store):
            consolidate(args.store)
        summary = describe(args.store)
    return summary


def _info(args) -> dict:
    from dynamo.store import describe

    return describe(args.store)


def _train_zoo(args) -> dict:
    from dynamo.zoo import train as zoo_train

    summary = zoo_train.run_from_args(args)
    summary.setdefault("text", json.dumps(summary, indent=2, default=str))
    return summary


def _analyze(args) -> dict:
    from dynamo.models import parse_img_size
    from dynamo.pipeline.analyze import analyze

    options = {option.name: getattr(args, option.name) for entry in ANALYSIS_OPTIONS.values() for option in entry}
    return analyze(
        args.store, args.out, only=args.only, model=args.model, checkpoint=args.checkpoint,
        img_size=parse_img_size(args.img_size), head=args.head, boundaries=args.boundaries,
        phase_method=args.phase_method, export=args.export, export_components=args.export_components,
        export_sphere=args.export_sphere, seed=args.seed, device=args.device, progress=not args.quiet, **options,
    )


def _analyze_arguments(parser: argparse.ArgumentParser) -> None:
    """``dynamo analyze``'s arguments, including every analysis' own options."""
    parser.add_argument("store", help="trajectory store written by `dynamo record`")
    parser.add_argument("--out", required=True, help="output folder for results, figures and summary.json")
    parser.add_argument("--only", type=comma_list, help=f"comma-separated analyses to run (default all: {', '.join(ANALYSIS_NAMES)})")
    parser.add_argument("--model", help="live model for analyses that need one (default: the store's own model)")
    parser.add_argument("--checkpoint", help="local weights for --model")
    parser.add_argument("--img-size", metavar="N|H,W", help="input size to build --model for (default: the store's image size)")
    parser.add_argument("--head", metavar="FILE", help=HEAD_HELP)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--boundaries", type=boundary_list,
                        help="comma-separated layers after which a new phase begins (default: found by max-cut; 'none' for none)")
    parser.add_argument("--phase-method", choices=["maxcut", "contiguous"], default="maxcut")
    parser.add_argument("--export", type=comma_list, default=[],
                        help="views to export as trials x time x features .npy arrays for other dynamics tools "
                        "(cls, patch_mean, register_mean, patch, register, ...)")
    parser.add_argument("--export-components", type=int, help="project exported features on N principal directions")
    parser.add_argument("--export-sphere", action="store_true", help="export unit-normalised states")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_arguments(parser)


def _profile(args) -> dict:
    from dynamo.pipeline.profile import profile, profile_store
    from dynamo.store import is_trajectory_store

    options = dict(
        phase_method=args.method, eps=args.eps, k=args.k, tokens=args.tokens, n_bootstrap=args.bootstrap, only=args.only,
        fit_raptor=args.fit_raptor, raptor_steps=args.raptor_steps, concepts=args.concepts, head=args.head,
        device=args.device, seed=args.seed, progress=not args.quiet, command=" ".join(sys.argv),
    )
    if is_trajectory_store(args.model):
        if args.img_size or args.preprocess or args.preset or args.timm:
            raise ValueError(f"--img-size, --preprocess, --preset and --timm apply when recording a model; {args.model} is "
                             "a recorded store (its image size and preprocessing are fixed): drop them")
        return profile_store(args.model, args.out, **options)
    _check_model_name(args.model)
    return profile(
        args.model, args.out, images=args.images, checkpoint=args.checkpoint, pretrained=not args.no_pretrained,
        **_image_options(args), limit=args.limit, batch_size=args.batch_size, dtype=args.dtype, overwrite=args.overwrite, **options,
    )


def _check_model_name(model: str) -> None:
    """A model argument by what it is: a zoo name, a timm name (or ``hf-hub:``), else a path that must exist."""
    import timm

    from dynamo.store import StoreError

    if model in list_models() or model.startswith(("hf-hub:", "hf_hub:")) or timm.is_model(model):
        return
    if os.path.isfile(model):
        raise ValueError(f"{model} is a file, not a model name or a trajectory store: pass weights with --checkpoint "
                         "and the timm architecture as the model")
    if os.path.exists(model) or model.endswith(".zarr") or os.sep in model:
        raise StoreError(f"no trajectory store at {model}; check the path (or pass a timm or zoo model name)")


def _compare(args) -> dict:
    from dynamo.pipeline.study import compare

    return compare(args.paths, args.out, labels=args.labels, progress=not args.quiet)


def _phases(args) -> dict:
    from dynamo.pipeline.phases import lenses as lens_stage
    from dynamo.pipeline.phases import phases as phase_stage
    from dynamo.store import open_trajectories

    if args.lens:
        summary = lens_stage(
            open_trajectories(args.store), args.lens, model=args.model, checkpoint=args.checkpoint, device=args.device,
            k=args.k, eps=args.eps, tokens=args.tokens, layers=args.layers, rank=args.rank, images=args.jacobian_images,
            tolerance=args.tolerance, seed=args.seed, out=args.out, figure=args.figure, progress=not args.quiet,
        )
        return {"store": str(args.store), **summary}
    summary = phase_stage(
        open_trajectories(args.store), method=args.method, eps=args.eps, k=args.k, measure=args.measure,
        tokens=args.tokens, layers=args.layers, n_bootstrap=args.bootstrap, seed=args.seed, out=args.out,
        figure=args.figure, progress=not args.quiet,
    )
    return {"store": str(args.store), **summary}


def _fit(args) -> dict:
    from dynamo.pipeline.fit import fit, parse_loss

    if args.surrogate != "raptor":
        return _fit_rung(args)
    params = {name: getattr(args, name) for name in (
        "steps", "stage2_steps", "step_budget", "patience", "tol", "validate_every", "batch_size", "lr", "weight_decay",
        "warmup", "min_lr", "tf_anneal", "tf_floor", "noise", "grad_clip", "mlp")}
    if args.stage1_loss:
        losses = [parse_loss(text) for text in args.stage1_loss]
        params["stage1_loss"] = losses[0] if len(losses) == 1 else losses
    if args.stage2_loss:
        params["stage2_loss"] = parse_loss(args.stage2_loss)
    return fit(args.store, args.out, k=args.k, partition=args.partition, baselines=args.baselines, shuffled=args.shuffled, seed=args.seed,
               seeds=args.seeds, recipe=args.recipe, head=args.head, device=args.device, progress=not args.quiet,
               **params)


def _fit_rung(args) -> dict:
    """``dynamo fit --surrogate`` for a rung other than Raptor: one k, no training flags."""
    from dynamo.pipeline.ladder import fit_surrogate

    given = [name for name in RAPTOR_ONLY if getattr(args, name, None) not in (None, RAPTOR_ONLY[name])]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise ValueError(f"{flags} apply to --surrogate raptor only; {args.surrogate} has nothing to train: drop them")
    if args.k is not None and len(args.k) > 1:
        raise ValueError(f"--surrogate {args.surrogate} fits one k at a time; for several, use dynamo ladder")
    return fit_surrogate(args.store, args.out, args.surrogate, k=args.k[0] if args.k else None, partition=args.partition,
                         head=args.head, seed=args.seed, device=args.device, progress=not args.quiet)


def _concepts(args) -> dict:
    from dynamo.pipeline.concepts import concepts as concept_stage

    return concept_stage(args.store, args.out, kind=args.kind, n_concepts=args.concepts, k=args.k, steps=args.steps,
                         per_phase=args.per_phase, stability=args.stability, boundaries=args.boundaries, seed=args.seed,
                         device=args.device, progress=not args.quiet)


def _ladder(args) -> dict:
    from dynamo.pipeline.ladder import ladder

    return ladder(args.store, args.out, ks=args.k, surrogates=args.surrogates, loop_scales=args.loop_scales,
                  n_bootstrap=args.bootstrap, head=args.head, raptor_init=args.raptor_init, tokens=args.tokens, seed=args.seed, device=args.device,
                  progress=not args.quiet, command=" ".join(sys.argv), steps=args.steps,
                  stage2_steps=args.stage2_steps, patience=args.patience, batch_size=args.batch_size, lr=args.lr,
                  mlp=args.mlp)


def _source_arguments(parser: argparse.ArgumentParser, model_help: str) -> None:
    """What a command that records takes: the model, its weights, the images, and how they are read and stored."""
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=model_help)
    parser.add_argument("--images", help="image folder (class sub-folders give labels); default: the model's bundled held-out "
                        "images (Fashion-MNIST for the zoo's fashion models, else the digits)")
    parser.add_argument("--checkpoint", help="local weights for a timm name: .safetensors or a torch file of tensors, in "
                        "timm's names or a transformers ViT/DINOv2 model's, or its ONNX export (docs/checkpoints.md)")
    parser.add_argument("--no-pretrained", action="store_true", help="random weights, seeded with --seed (tests of mechanics only)")
    parser.add_argument("--timm", type=timm_options, default={}, metavar="KEY=VALUE,...",
                        help="extra timm.create_model options, e.g. global_pool=map or depth=2,embed_dim=64; kept with "
                        "the store, so every later command rebuilds the same model")
    _image_arguments(parser)
    parser.add_argument("--limit", type=positive_int, help="use only N images (drawn evenly across classes)")
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32")


def _raptor_arguments(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """Raptor's training flags that `fit` and `ladder` share (``prefix`` starts each help); defaults are `RaptorFitter`'s."""
    parser.add_argument("--steps", type=positive_int, help=f"{prefix}most steps per stage-1 block (default 2000)")
    parser.add_argument("--stage2-steps", type=nonnegative_int, help=f"{prefix}most stage-2 steps (default: --steps)")
    parser.add_argument("--patience", type=nonnegative_int, help=f"{prefix}stop a segment after N validations without a "
                        "held-out R² gain above --tol (default 5; 0: always train --steps)")
    parser.add_argument("--batch-size", type=positive_int, help=f"{prefix}batch size (default 16)")
    parser.add_argument("--lr", type=float, help=f"{prefix}peak AdamW learning rate (default 2e-3)")
    parser.add_argument("--mlp", choices=["swiglu", "gelu"], help=f"{prefix}block MLP (default swiglu, as the paper)")


def _image_arguments(parser: argparse.ArgumentParser) -> None:
    """The input size and preprocessing of a command that builds a model (parsed by `_image_options`)."""
    parser.add_argument(
        "--img-size", metavar="N|H,W",
        help="input size to build a timm model for (default the model's own); position embeddings of trained "
        "weights are resampled to it as timm does (e.g. DINOv2, trained at 518, studied at 224)",
    )
    parser.add_argument(
        "--preprocess", metavar="KEY=VALUE,...",
        help="overrides of the model's timm preprocessing: resize=N (shorter side, before the centre crop), "
        "crop=N|H,W (the input size), interpolation=bicubic|bilinear|..., mean=R,G,B|imagenet|inception|clip, std=...",
    )
    parser.add_argument("--preset", metavar="|".join(PRESETS),
                        help="preprocessing preset; paper: Resize 256 bicubic, CenterCrop 224, ImageNet mean/std "
                        "(--preprocess overrides it)")


def _image_options(args) -> dict:
    """``img_size``, ``preprocess`` and ``timm_options`` for `dynamo.load_model` from the source flags."""
    from dynamo.models import parse_img_size, preprocess_overrides

    preprocess = preprocess_overrides(args.preset, args.preprocess) if (args.preset or args.preprocess) else None
    return {"img_size": parse_img_size(args.img_size), "preprocess": preprocess, "timm_options": args.timm}


def _common_arguments(parser: argparse.ArgumentParser, run, *, seed: bool = False, device: bool = False,
                      quiet: str | None = "no progress bars") -> None:
    """The flags commands share (``--seed``, ``--device``, ``--quiet`` where asked, ``--json``) and the function run."""
    if seed:
        parser.add_argument("--seed", type=int, default=0)
    if device:
        parser.add_argument("--device", type=torch_device, default="cpu")
    if quiet:
        parser.add_argument("--quiet", action="store_true", help=quiet)
    parser.add_argument("--json", action="store_true", help="print a JSON summary")
    parser.set_defaults(run=run)


def _tokens_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", help="token view of the layer dissimilarity, groups joined by +: cls, patch_mean, "
                        "register_mean, patch, register, all (default cls+patch_mean, the paper's; patch_mean for a "
                        "model without a cls token)")


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
