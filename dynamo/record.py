"""Record every token's trajectory through every block of a ViT into a trajectory store.

Forward hooks on ``model.blocks`` capture layer 0 (the input to the first block: patch +
position embedding + prefix tokens, after any pre-norm) and the output of each block, copying
each straight into a per-batch host buffer. The model's own forward runs unchanged, so its
logits are stored as well. Batches are loaded one ahead on a thread and written on another,
with at most two batches in flight, so memory does not grow with the number of images.
"""

from __future__ import annotations

import errno
import hashlib
import json
import platform
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import dask.array as da
import numpy as np
import timm
import timm.data
import torch
import xarray as xr
from tqdm.auto import tqdm

from dynamo import store as stores
from dynamo.images import ImageSet, image_set
from dynamo.models import LoadedModel, load_model

DTYPES = {"float32": np.float32, "float16": np.float16}
COMPRESSION = {"zstd": {"name": "zstd", "configuration": {"level": 1}}, "none": None}


class RecordingError(RuntimeError):
    """Recording stopped; every block written before the error is kept."""


def record(
    model: str | LoadedModel,
    images,
    out: str | Path,
    *,
    checkpoint: str | Path | None = None,
    pretrained: bool = True,
    batch_size: int = 32,
    dtype: str = "float32",
    layers: Sequence[int] | None = None,
    patch_tokens: int | None = None,
    seed: int = 0,
    compression: str = "none",
    limit: int | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
) -> xr.Dataset:
    """Record trajectories of ``images`` through ``model`` into the zarr store ``out``.

    Running the same call again on an interrupted store finishes it, with a result identical
    to an uninterrupted run; running it on a finished store does nothing.

    Parameters
    ----------
    model : str or LoadedModel
        timm or zoo name (see `dynamo.load_model`), or an already loaded model.
    images : folder, list of paths, uint8 array, float tensor, or ImageSet
        See `dynamo.images.image_set`.
    out : str or Path
        Store path (a directory, conventionally ``*.zarr``).
    checkpoint, pretrained
        As in `dynamo.load_model`, when ``model`` is a name.
    batch_size : int
        Images per forward pass, and the store's chunk length along ``image``. A resumed run
        uses the store's own batch size, so that blocks line up with what was written.
    dtype : {"float32", "float16"}
        Storage type of ``hidden``. Reduced views and logits are always float32.
    layers : sequence of int, optional
        Layers to keep (0 = input to block 1, l = output of block l); all ``L + 1`` by default.
    patch_tokens : int, optional
        Keep only this many patch tokens in ``hidden``, drawn without replacement with ``seed``
        (prefix tokens are always kept); all by default.
    seed : int
        Seed of the patch-token draw; recorded in the store.
    compression : {"none", "zstd"}
        Chunk compression of ``hidden``. Activations compress poorly (about 1.1x), so none is
        the default: it keeps recording at forward speed.
    limit : int, optional
        Record only the first ``limit`` images.
    device : str
        Torch device to run the model on.
    overwrite : bool
        Replace an existing store recorded with other settings instead of refusing.
    progress : bool
        Show a progress bar.

    Returns
    -------
    xarray.Dataset
        The store, opened lazily (see `dynamo.open_trajectories`).

    Raises
    ------
    StoreMismatchError
        ``out`` holds a store recorded with another model, images or settings.
    StoreBusyError
        Another process is writing ``out``.
    RecordingError
        The disk filled up or a write failed; what was written is kept for resuming.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if compression not in COMPRESSION:
        raise ValueError(f"compression must be one of {sorted(COMPRESSION)}, got {compression!r}")
    loaded = model if isinstance(model, LoadedModel) else load_model(model, checkpoint, pretrained)
    images = images if isinstance(images, ImageSet) else image_set(images)
    if limit is not None:
        images = images.head(limit)
    plan = _plan(loaded, images, dtype, layers, patch_tokens, seed)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with stores.writer_lock(out):
        if out.exists() and overwrite:
            try:
                stores.check_identity(stores.open_group(out), plan["identity"], out)
            except stores.StoreMismatchError:
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
        _record_pending(loaded, images, group, plan, device, progress, out)
    return stores.open_trajectories(out)


def _plan(loaded: LoadedModel, images: ImageSet, dtype, layers, patch_tokens, seed) -> dict:
    """Decide which layers and tokens are kept, and what identifies this recording."""
    layout = loaded.layout
    n_layers = loaded.num_blocks + 1
    layers = list(range(n_layers)) if layers is None else sorted({int(l) for l in layers})
    if not layers or layers[0] < 0 or layers[-1] >= n_layers:
        raise ValueError(f"layers must lie in 0..{n_layers - 1} for this {loaded.num_blocks}-block model")
    tokens = np.arange(layout.num_tokens)
    if patch_tokens is not None:
        if not 0 < patch_tokens <= layout.num_patches:
            raise ValueError(f"patch_tokens must be in 1..{layout.num_patches}, got {patch_tokens}")
        chosen = np.random.default_rng(seed).choice(layout.num_patches, patch_tokens, replace=False)
        tokens = np.concatenate([tokens[: layout.num_prefix], layout.num_prefix + np.sort(chosen)])
    image_digest = hashlib.sha256(
        json.dumps([images.ids, images.labels.tolist(), images.label_names]).encode()
    ).hexdigest()
    identity = {
        "model": loaded.source,
        "checkpoint": loaded.checkpoint,
        "weights_sha256": loaded.weights_sha256,
        "preprocessing": _jsonable(loaded.data_config),
        "images_sha256": image_digest,
        "n_images": len(images),
        "dtype": dtype,
        "layers": layers,
        "tokens": tokens.tolist(),
    }
    return {"layers": layers, "tokens": tokens, "dtype": dtype, "seed": seed, "identity": identity}


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

    variables = {
        "hidden": (
            ("image", "layer", "token", "feature"),
            lazy((n, len(layers), len(tokens), width), plan["dtype"], (batch, 1, len(tokens), width)),
        ),
        "status": (("image",), lazy((n,), np.int8, (batch,))),
    }
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
            np.array([label_names[l] if 0 <= l < len(label_names) else "" for l in images.labels], dtype=object),
        ),
        "layer": np.array(layers),
        "token": tokens,
        "token_kind": ("token", np.array(kinds[tokens], dtype=object)),
        "patch_row": ("token", rows[tokens]),
        "patch_col": ("token", cols[tokens]),
    }
    attrs = {
        "format": stores.FORMAT,
        "model": loaded.source,
        "checkpoint": loaded.checkpoint,
        "pretrained": loaded.pretrained,
        "weights_sha256": loaded.weights_sha256,
        "architecture": type(module).__name__,
        "num_blocks": loaded.num_blocks,
        "embed_dim": width,
        "image_size": list(loaded.data_config["input_size"][1:]),
        "patch_size": list(module.patch_embed.patch_size),
        **layout.to_attrs(),
        "preprocessing": _jsonable(loaded.data_config),
        "dtype": plan["dtype"],
        "seed": plan["seed"],
        "images_source": images.source,
        "label_names": label_names,
        "versions": _versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "identity": plan["identity"],
        "complete": False,
        "unreadable_images": [],
    }
    dataset = xr.Dataset(variables, coords=coords, attrs=attrs)
    encoding = {name: {"chunks": dataset[name].data.chunksize} for name in dataset.data_vars}
    encoding["hidden"]["compressors"] = COMPRESSION[compression]
    return dataset, encoding


def _record_pending(loaded, images, group, plan, device, progress, out) -> None:
    """Record every block of images whose status is still pending, then finalize attrs."""
    batch = group["status"].chunks[0]
    status = group["status"][:]
    blocks = [
        (start, min(start + batch, len(images)))
        for start in range(0, len(images), batch)
        if (status[start : start + batch] == stores.PENDING).any()
    ]
    module = loaded.module.to(device)
    transform = timm.data.create_transform(**loaded.data_config)
    bar = tqdm(
        total=len(images),
        initial=int((status != stores.PENDING).sum()),
        unit="img",
        desc=f"record {loaded.source}",
        disable=not progress,
    )
    capture = _Capture(loaded, plan)
    failed = threading.Event()
    pending_writes: list[Future] = []
    with capture, ThreadPoolExecutor(1) as loader, ThreadPoolExecutor(1) as writer:
        next_batch = loader.submit(images.load_batch, range(*blocks[0]), transform) if blocks else None
        for i, (start, stop) in enumerate(blocks):
            pixels, readable = next_batch.result()
            if i + 1 < len(blocks):
                next_batch = loader.submit(images.load_batch, range(*blocks[i + 1]), transform)
            arrays = capture.run(pixels.to(device), readable)
            pending_writes.append(writer.submit(_write_block, group, start, stop, arrays, out, failed))
            while len(pending_writes) > 1 or (pending_writes and pending_writes[0].done()):
                pending_writes.pop(0).result()
            bar.update(stop - start)
        for write in pending_writes:
            write.result()
    bar.close()
    status = group["status"][:]
    if not (status == stores.PENDING).any():
        group.attrs.update(
            complete=True,
            unreadable_images=[images.ids[i] for i in np.flatnonzero(status == stores.UNREADABLE)],
        )


def _write_block(group, start: int, stop: int, arrays: dict, out, failed: threading.Event) -> None:
    """Write one block's arrays, then mark its images recorded (so a kill never half-marks).

    After one write has failed (``failed`` is set) later blocks are not attempted.
    """
    if failed.is_set():
        return
    try:
        for slot, values in enumerate(arrays["hidden"]):
            group["hidden"][start:stop, slot] = values
        for name, values in arrays.items():
            if name not in ("hidden", "status"):
                group[name][start:stop] = values
        group["status"][start:stop] = arrays["status"]
    except OSError as error:
        failed.set()
        done = int((group["status"][:] != stores.PENDING).sum())
        reason = "the disk is full" if error.errno == errno.ENOSPC else f"a write failed ({error})"
        raise RecordingError(
            f"recording into {out} stopped: {reason}. The {done} images already recorded are "
            "kept; free space (or fix the cause) and run the same command again to resume."
        ) from error


class _Capture:
    """Forward hooks that copy layer 0 and every block output into a per-batch host buffer."""

    def __init__(self, loaded: LoadedModel, plan: dict):
        self.module = loaded.module
        self.layout = loaded.layout
        self.slot = {layer: i for i, layer in enumerate(plan["layers"])}
        self.tokens = torch.as_tensor(plan["tokens"])
        self.all_tokens = len(plan["tokens"]) == loaded.layout.num_tokens
        self.dtype = getattr(torch, plan["dtype"])
        self.has_logits = bool(getattr(loaded.module, "num_classes", 0))
        self.handles = []
        self.calls = 0

    def __enter__(self):
        """Hook the blocks; layer numbers follow the order of block calls in one forward pass.

        Counting calls (rather than fixing a layer per module) keeps a model whose ``blocks``
        holds one module several times (weights tied across depth) correct: its one hook fires
        once per application, at successive layers.
        """
        blocks = self.module.blocks
        self.handles.append(
            blocks[0].register_forward_pre_hook(
                lambda _, args, kwargs: self._store(0, args[0] if args else next(iter(kwargs.values())))
                if self.calls == 0 else None,
                with_kwargs=True,
            )
        )
        for block in {id(block): block for block in blocks}.values():
            self.handles.append(block.register_forward_hook(self._block_output))
        return self

    def _block_output(self, _, __, output) -> None:
        self.calls += 1
        self._store(self.calls, output[0] if isinstance(output, tuple) else output)

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def run(self, pixels: torch.Tensor, readable: np.ndarray) -> dict:
        """Run the model on one batch and return the block's arrays for the store.

        Block outputs are kept by reference, not copied: each is one contiguous
        (B, T, D) array, exactly one ``hidden`` chunk. (timm blocks return new tensors, as
        ``x = x + f(x)``; the forward_intermediates tests hold the recorder to that.)

        Returns
        -------
        dict
            ``hidden``: list over kept layers of (B, tokens, D) arrays; summaries
            (B, layers, D); ``logits`` (B, C); ``status`` (B,). Rows of unreadable images
            are NaN.
        """
        b, d = pixels.shape[0], self.module.embed_dim
        self.hidden = [None] * len(self.slot)
        self.summaries = {
            name: torch.empty(b, len(self.slot), d)
            for name, present in (
                ("cls", self.layout.has_cls),
                ("patch_mean", True),
                ("register_mean", self.layout.num_registers > 0),
            )
            if present
        }
        self.calls = 0
        with torch.inference_mode():
            logits = self.module(pixels)
        if self.calls != len(self.module.blocks):
            raise RecordingError(
                f"{type(self.module).__name__} called its blocks {self.calls} times in one forward pass, "
                f"not {len(self.module.blocks)}; dynamo records models that apply each block once, in order"
            )
        arrays = {k: v.numpy() for k, v in self.summaries.items()}
        if self.has_logits:
            arrays["logits"] = logits.float().cpu().numpy()
        hidden = [state.numpy() for state in self.hidden]
        for values in [*hidden, *arrays.values()]:
            values[~readable] = np.nan
        arrays["hidden"] = hidden
        arrays["status"] = np.where(readable, stores.RECORDED, stores.UNREADABLE).astype(np.int8)
        return arrays

    def _store(self, layer: int, state: torch.Tensor) -> None:
        if layer not in self.slot:
            return
        layout, slot = self.layout, self.slot[layer]
        if "cls" in self.summaries:
            self.summaries["cls"][:, slot].copy_(state[:, 0])
        self.summaries["patch_mean"][:, slot].copy_(state[:, layout.num_prefix :].mean(1))
        if "register_mean" in self.summaries:
            first = layout.num_prefix - layout.num_registers
            self.summaries["register_mean"][:, slot].copy_(state[:, first : layout.num_prefix].mean(1))
        kept = state if self.all_tokens else state[:, self.tokens.to(state.device)]
        self.hidden[slot] = kept.to(device="cpu", dtype=self.dtype).contiguous()


def _jsonable(value):
    """Tuples → lists and numpy scalars → Python, so a value round-trips through JSON attrs."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


def _versions() -> dict:
    packages = {"dynamo": "dynamo-vit", "torch": "torch", "timm": "timm", "zarr": "zarr", "xarray": "xarray", "numpy": "numpy"}
    versions = {"python": platform.python_version()}
    for key, dist in packages.items():
        try:
            versions[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[key] = "unknown"
    return versions
