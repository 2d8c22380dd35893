"""Record every token's trajectory through every block of a ViT into a trajectory store.

Batches are loaded one ahead on a thread and written on ``writers`` others, so host memory holds at most
``writers + 1`` batches.
"""

from __future__ import annotations

import contextlib
import errno
import platform
import sys
import threading
import warnings
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import dask.array as da
import numpy as np
import timm
import timm.data
import torch
import xarray as xr

from dynamo import store as stores
from dynamo.capture import AUTOCAST_DTYPES, Capture, CapturedBatch, CaptureError
from dynamo.images import ImageSet, image_set
from dynamo.models import LoadedModel, load_model, rebuild_attrs
from dynamo.progress import progress_bar
from dynamo.serialize import jsonable
from dynamo.shards import Shard, check_no_shard_running, consolidate, parse_shard, shard_lock

DTYPES = {"float32": np.float32, "float16": np.float16}
COMPRESSION = {"zstd": {"name": "zstd", "configuration": {"level": 1}}, "none": None}
STORE_LOCK_WAIT_S = 600  # the store lock is held briefly, while a shard sets up or completes the store


class RecordingError(RuntimeError):
    """Recording stopped; every block written before the error is kept."""


def record(
    model: str | LoadedModel,
    images,
    out: str | Path,
    *,
    checkpoint: str | Path | None = None,
    pretrained: bool = True,
    img_size: int | tuple[int, int] | None = None,
    preprocess: dict | str | None = None,
    timm_options: dict | None = None,
    batch_size: int = 32,
    dtype: str = "float32",
    layers: Sequence[int] | None = None,
    patch_tokens: int | None = None,
    summaries_only: bool = False,
    seed: int = 0,
    compression: str = "none",
    limit: int | None = None,
    device: str = "cpu",
    autocast: str | None = None,
    writers: int = 2,
    shard: Shard | str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> xr.Dataset:
    """Record trajectories of ``images`` through ``model`` into the zarr store ``out``; return the store, opened lazily.

    Running it again on an interrupted store finishes it, identically to an uninterrupted run; on a finished store
    it does nothing. Raises `StoreMismatchError` (``out`` recorded with other settings), `StoreBusyError` (another
    process writes ``out`` or the same shard) and `RecordingError` (a write failed; what was written is kept).

    Parameters
    ----------
    model : str or LoadedModel
        timm or zoo name, or a loaded model; ``checkpoint``, ``pretrained``, ``img_size``, ``preprocess`` and
        ``timm_options`` are as in `dynamo.load_model` for a name.
    images : folder, list of paths, uint8 array, float tensor, or ImageSet
        See `dynamo.images.image_set`.
    batch_size : int
        Images per forward pass and the store's chunk length along ``image`` (a resumed run uses the store's own).
    dtype : {"float32", "float16"}
        Storage type of ``hidden``; reduced views and logits are always float32.
    layers, patch_tokens : optional
        Layers to keep (0 = input to block 1), and how many patch tokens to keep (drawn with ``seed``); default all.
    summaries_only : bool
        Store only the reduced views and logits, not ``hidden``.
    seed : int
        Seed of the patch-token draw and of random initialisation for a name built without trained weights.
    autocast : {"bfloat16", "float16"}, optional
        Run the forward under ``torch.autocast`` with this dtype; part of the store's identity.
    shard : Shard or "I/N" or "auto", optional
        Record only shard I of N (`dynamo.shards`); the last shard to finish marks the store complete.
    overwrite : bool
        Replace an existing store recorded with other settings instead of refusing.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if compression not in COMPRESSION:
        raise ValueError(f"compression must be one of {sorted(COMPRESSION)}, got {compression!r}")
    if autocast is not None and autocast not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast must be one of {sorted(AUTOCAST_DTYPES)} or None, got {autocast!r}")
    if writers < 1:
        raise ValueError(f"--writers must be at least 1, got {writers}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    shard = shard if isinstance(shard, Shard) else parse_shard(shard)
    if isinstance(model, LoadedModel) and (img_size is not None or preprocess is not None or timm_options):
        raise ValueError("img_size and preprocess apply to a model given by name; pass them to dynamo.load_model")
    loaded = model if isinstance(model, LoadedModel) else load_model(
        model, checkpoint, pretrained, img_size=img_size, preprocess=preprocess, seed=seed, **(timm_options or {})
    )
    images = images if isinstance(images, ImageSet) else image_set(images)
    if limit is not None:
        images = images.head(limit)
    plan = _plan(loaded, images, dtype, layers, patch_tokens, seed, summaries_only, autocast)
    out = stores.writable_path(out)
    if _already_recorded(out, plan, overwrite):  # nothing to write: works on a read-only filesystem too
        try:
            check_no_shard_running(out, advice="before reading the store")
        except OSError:  # the lock files cannot be probed: a read-only filesystem, where nobody writes
            pass
        return stores.open_trajectories(out)
    with contextlib.ExitStack() as writing:
        with stores.writer_lock(out, wait=STORE_LOCK_WAIT_S):
            if out.exists() and overwrite:
                try:
                    stores.check_identity(stores.open_group(out), plan["identity"], out)
                except stores.StoreMismatchError:
                    check_no_shard_running(out)  # a running writer holds its shard lock: never delete under it
                    stores.remove_store(out)
            if not out.exists():
                template, encoding = _template(loaded, images, plan, batch_size, compression)
                try:
                    stores.create_store(out, template, encoding)
                except OSError as error:
                    raise RecordingError(
                        f"could not create the store at {out}: {error}. Nothing was recorded; fix the "
                        "cause and run the same command again."
                    ) from error
            group = stores.open_group(out, mode="r+")
            stores.check_identity(group, plan["identity"], out)
            for _, _, start, stop in stores.missing_chunks(out, group):  # damaged blocks: record them again
                group["status"][start:stop] = stores.PENDING
                group.attrs["complete"] = False
            writing.enter_context(shard_lock(out, shard))
            group.attrs["shards"] = shard.count
        _record_pending(loaded, images, group, plan, shard, device, autocast, writers, progress, out)
    with stores.writer_lock(out, wait=STORE_LOCK_WAIT_S):
        summary = consolidate(out, require_complete=shard.count == 1)
    with warnings.catch_warnings():
        if not summary["complete"]:  # siblings still running: expected, not worth a warning
            warnings.filterwarnings("ignore", message="store .* is incomplete", category=UserWarning)
        return stores.open_trajectories(out)


def _already_recorded(out: Path, plan: dict, overwrite: bool) -> bool:
    """Whether ``out`` is a complete, undamaged store of exactly this recording (no lock needed to read it)."""
    if not out.exists():
        return False
    group = stores.open_group(out)
    if not group.attrs.get("complete") or stores.missing_chunks(out, group):
        return False
    try:
        stores.check_identity(group, plan["identity"], out)
    except stores.StoreMismatchError:
        if overwrite:
            return False
        raise
    return True


def _plan(loaded: LoadedModel, images: ImageSet, dtype, layers, patch_tokens, seed, summaries_only, autocast) -> dict:
    """Decide which layers and tokens are kept, and what identifies this recording."""
    layout = loaded.layout
    n_layers = loaded.num_blocks + 1
    layers = list(range(n_layers)) if layers is None else sorted({int(layer) for layer in layers})
    if not layers or layers[0] < 0 or layers[-1] >= n_layers:
        raise ValueError(f"layers must lie in 0..{n_layers - 1} for this {loaded.num_blocks}-block model")
    tokens = np.arange(layout.num_tokens)
    if patch_tokens is not None:
        if not 0 < patch_tokens <= layout.num_patches:
            raise ValueError(f"patch_tokens must be in 1..{layout.num_patches}, got {patch_tokens}")
        chosen = np.random.default_rng(seed).choice(layout.num_patches, patch_tokens, replace=False)
        tokens = np.concatenate([tokens[: layout.num_prefix], layout.num_prefix + np.sort(chosen)])
    image_digest = images.digest()
    size = tuple(loaded.data_config["input_size"][1:])
    native_size = tuple(timm.data.resolve_data_config({}, model=loaded.module)["input_size"][1:])
    identity = {
        "model": loaded.source,
        "checkpoint": loaded.checkpoint,
        "weights_sha256": loaded.weights_sha256,
        "preprocessing": jsonable(loaded.data_config),
        "images_sha256": image_digest,
        "n_images": len(images),
        # the input size where it is not the model's default: stores at the default resume as before
        **({"image_size": list(size)} if size != native_size else {}),
        **({"timm_options": jsonable(loaded.timm_options)} if loaded.timm_options else {}),
        "dtype": dtype,
        "layers": layers,
        "tokens": tokens.tolist(),
        # only when set, so that stores recorded before these options existed still resume
        **({"summaries_only": True} if summaries_only else {}),
        **({"autocast": autocast} if autocast else {}),
    }
    return {
        "layers": layers, "tokens": tokens, "dtype": dtype, "seed": seed, "identity": identity,
        "summaries_only": summaries_only, "autocast": autocast,
    }


def _template(loaded: LoadedModel, images: ImageSet, plan: dict, batch_size: int, compression: str):
    """The lazy dataset and zarr encoding a new store is created from."""
    layout, module = loaded.layout, loaded.module
    n = len(images)
    tokens, layers = plan["tokens"], plan["layers"]
    width = int(module.embed_dim)
    batch = min(batch_size, n)
    kinds = layout.token_kind()
    rows, cols = layout.patch_rows_cols()

    def lazy(shape, dtype, chunks):
        return da.full(shape, np.nan if np.dtype(dtype).kind == "f" else 0, dtype=dtype, chunks=chunks)

    variables = {"status": (("image",), lazy((n,), np.int8, (batch,)))}
    if not plan["summaries_only"]:
        variables["hidden"] = (
            ("image", "layer", "token", "feature"),
            lazy((n, len(layers), len(tokens), width), plan["dtype"], (batch, 1, len(tokens), width)),
        )
    summary_present = {"cls": layout.has_cls, "patch_mean": True, "register_mean": layout.num_registers > 0}
    for name, present in summary_present.items():
        if present:
            variables[name] = (
                ("image", "layer", "feature"),
                lazy((n, len(layers), width), np.float32, (batch, len(layers), width)),
            )
    num_classes = int(getattr(module, "num_classes", 0) or 0)
    if num_classes:
        variables["logits"] = (("image", "class"), lazy((n, num_classes), np.float32, (batch, num_classes)))
    label_names = images.label_names or []
    coords = {
        "image": np.arange(n),
        "image_id": ("image", np.array(images.ids, dtype=object)),
        "label": ("image", images.labels),
        "label_name": (
            "image",
            np.array([label_names[i] if 0 <= i < len(label_names) else "" for i in images.labels], dtype=object),
        ),
        "layer": np.array(layers),
        "token": tokens,
        "token_kind": ("token", np.array(kinds[tokens], dtype=object)),
        "patch_row": ("token", rows[tokens]),
        "patch_col": ("token", cols[tokens]),
    }
    attrs = {
        "format": stores.FORMAT,
        **jsonable(rebuild_attrs(loaded)),
        "architecture": type(module).__name__,
        "global_pool": module.global_pool if isinstance(getattr(module, "global_pool", None), str) else None,
        "num_blocks": loaded.num_blocks,
        "embed_dim": width,
        "patch_size": list(module.patch_embed.patch_size),
        **layout.to_attrs(),
        "preprocessing": jsonable(loaded.data_config),
        "dtype": plan["dtype"],
        "summaries_only": plan["summaries_only"],
        "autocast": plan["autocast"] or "none",
        "seed": plan["seed"],
        "images_source": images.source,
        "label_names": label_names,
        "versions": _versions(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "identity": plan["identity"],
        "complete": False,
        "unreadable_images": [],
    }
    dataset = xr.Dataset(variables, coords=coords, attrs=attrs)
    encoding = {name: {"chunks": dataset[name].data.chunksize} for name in dataset.data_vars}
    if "hidden" in encoding:
        encoding["hidden"]["compressors"] = COMPRESSION[compression]
    return dataset, encoding


def _record_pending(loaded, images, group, plan, shard, device, autocast, writers, progress, out) -> None:
    """Record every block of ``shard`` whose images are still pending."""
    batch = group["status"].chunks[0]
    status = group["status"][:]
    n_blocks = -(-len(images) // batch)
    owned = [(b * batch, min((b + 1) * batch, len(images))) for b in shard.blocks(n_blocks)]
    blocks = [(start, stop) for start, stop in owned if (status[start:stop] == stores.PENDING).any()]
    device = torch.device(device)
    loaded.module.to(device)
    transform = timm.data.create_transform(**loaded.data_config)
    pin = device.type == "cuda"

    def load(block):
        pixels, readable = images.load_batch(range(*block), transform)
        return (pixels.pin_memory() if pin else pixels), readable

    owned_images = sum(stop - start for start, stop in owned)
    bar = progress_bar(
        total=owned_images,
        initial=owned_images - sum(stop - start for start, stop in blocks),
        unit="img",
        desc=f"record {loaded.source}" + (f" shard {shard}" if shard.count > 1 else ""),
        enabled=progress,
    )
    capture = Capture(
        loaded, plan["layers"], plan["tokens"], plan["dtype"], device,
        keep_hidden=not plan["summaries_only"], autocast=autocast, slots=writers + 1,
    )
    failed = threading.Event()
    in_flight: deque = deque()
    try:
        # leaving this block waits for the writes in flight, so the count below is final
        with capture, ThreadPoolExecutor(1) as loader, ThreadPoolExecutor(writers) as writer:
            next_batch = loader.submit(load, blocks[0]) if blocks else None
            for i, (start, stop) in enumerate(blocks):
                pixels, readable = next_batch.result()
                if i + 1 < len(blocks):
                    next_batch = loader.submit(load, blocks[i + 1])
                while in_flight and (len(in_flight) > writers or in_flight[0].done()):
                    in_flight.popleft().result()  # raises a write's error here, in the caller
                try:
                    captured = capture.run(pixels.to(device, non_blocking=True), readable)
                except CaptureError as error:
                    raise RecordingError(str(error)) from error
                in_flight.append(writer.submit(_write_block, group, start, stop, captured, failed, plan))
                bar.update(stop - start)
            for write in in_flight:
                write.result()
    except OSError as error:
        done = int((group["status"][:] != stores.PENDING).sum())
        reason = "the disk is full" if error.errno == errno.ENOSPC else f"a write failed ({error})"
        raise RecordingError(
            f"recording into {out} stopped: {reason}. The {done} images already recorded are "
            "kept; free space (or fix the cause) and run the same command again to resume."
        ) from error
    finally:
        bar.close()


def _write_block(group, start: int, stop: int, captured: CapturedBatch, failed: threading.Event, plan: dict) -> None:
    """Check one block's states are finite and fit the storage dtype, write them, then mark its images recorded.

    After one write has failed (``failed`` is set) blocks not yet started are skipped.
    """
    if failed.is_set():
        return
    arrays = captured.arrays()
    try:
        captured.check_finite(plan["layers"], np.float32 if plan["summaries_only"] else DTYPES[plan["dtype"]])
    except CaptureError as error:
        failed.set()
        raise RecordingError(str(error)) from None
    try:
        for slot, values in enumerate(arrays["hidden"]):
            group["hidden"][start:stop, slot] = values
        for name, values in arrays.items():
            if name not in ("hidden", "status"):
                group[name][start:stop] = values
        group["status"][start:stop] = arrays["status"]
    except OSError:
        failed.set()
        raise


def _versions() -> dict:
    packages = {"dynamo": "dynamo-vit", "torch": "torch", "timm": "timm", "zarr": "zarr", "xarray": "xarray", "numpy": "numpy"}
    versions = {"python": platform.python_version()}
    for key, dist in packages.items():
        try:
            versions[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[key] = "unknown"
    return versions
