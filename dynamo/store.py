"""The trajectory store: a zarr group laid out as dynamo's trajectory dataset.

Layout (see ``design.md``, "The trajectory dataset"):

- ``hidden`` (image, layer, token, feature): the residual stream, chunked one batch of images
  by one layer, so that writes go a batch at a time and reads go a layer at a time;
- reduced views ``cls``, ``patch_mean``, ``register_mean`` (image, layer, feature), float32,
  computed from every token at full precision, before any token subsetting or float16 cast;
- ``logits`` (image, class) from the model's own head;
- ``status`` (image) int8: 0 pending, 1 recorded, 2 unreadable (skipped);
- coords ``image_id``, ``label``, ``label_name``; ``layer``; ``token`` (the position in the
  model's sequence), ``token_kind``, ``patch_row``, ``patch_col``.

A store is written in blocks of ``batch_size`` images aligned with its chunks; a block's
``status`` is set only after its data are written, so a store whose writer was killed holds
only whole, correct blocks, and resuming rewrites exactly the blocks that were not marked.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from pathlib import Path

import filelock
import numpy as np
import xarray as xr
import zarr

FORMAT = "dynamo-trajectories/1"
PENDING, RECORDED, UNREADABLE = 0, 1, 2
SUMMARY_VARIABLES = ("cls", "patch_mean", "register_mean")


class StoreError(RuntimeError):
    """A path is not a dynamo trajectory store, or is not usable as asked."""


class StoreMismatchError(StoreError):
    """An existing store was recorded with a different model, images or settings."""


class StoreBusyError(StoreError):
    """Another process is writing the store."""


def create_store(path: str | Path, template: xr.Dataset, encoding: dict) -> None:
    """Write a store's metadata and coordinates; data variables stay unwritten (fill value).

    The store is built beside ``path`` and renamed into place, so a store either exists whole
    or not at all. Call it holding `writer_lock` (which also guards the temporary path).

    Parameters
    ----------
    path : str or Path
        Where the zarr group goes; must not exist.
    template : xarray.Dataset
        Dask-backed dataset with every variable, coord and attr of the finished store.
    encoding : dict
        Per-variable zarr encoding (chunks, fill_value, compressors).
    """
    path = Path(path)
    building = path.with_name(f".{path.name}.creating")
    shutil.rmtree(building, ignore_errors=True)  # left by a creation that was killed
    template.to_zarr(building, mode="w-", compute=False, encoding=encoding, consolidated=False)
    building.rename(path)


def open_group(path: str | Path, mode: str = "r") -> zarr.Group:
    """Open a store's zarr group after checking it is a dynamo trajectory store."""
    path = Path(path)
    if not path.exists():
        raise StoreError(f"no trajectory store at {path}")
    try:
        group = zarr.open_group(str(path), mode=mode)
    except Exception as error:
        raise StoreError(f"{path} is not a zarr store: {error}") from error
    if group.attrs.get("format") != FORMAT:
        raise StoreError(
            f"{path} is a zarr store but not a dynamo trajectory store (attrs format="
            f"{group.attrs.get('format')!r}, expected {FORMAT!r}); record one with `dynamo record`"
        )
    return group


def is_trajectory_store(path: str | Path) -> bool:
    """Whether ``path`` holds a dynamo trajectory store (complete or not)."""
    try:
        open_group(path)
    except StoreError:
        return False
    return True


def check_identity(group: zarr.Group, identity: dict, path: str | Path) -> None:
    """Raise `StoreMismatchError` if the store was recorded with other settings.

    Parameters
    ----------
    identity : dict
        What a resumed recording must share with the store: model source and weights hash,
        preprocessing, image ids and labels, dtype, layers, tokens, batch size.
    """
    stored = group.attrs.get("identity", {})
    differing = sorted(key for key in identity.keys() | stored.keys() if stored.get(key) != identity.get(key))
    if differing:
        details = "; ".join(
            f"{key}: store has {_short(stored.get(key))}, this run has {_short(identity.get(key))}"
            for key in differing
        )
        raise StoreMismatchError(
            f"the store at {path} was recorded with different settings ({details}). It is left "
            "untouched: write to a new --out path, or pass --overwrite to replace it."
        )


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def remove_store(path: str | Path) -> None:
    """Delete a trajectory store (refuses anything that is not one)."""
    open_group(path)
    shutil.rmtree(path)


@contextlib.contextmanager
def writer_lock(path: str | Path, wait: float = 0):
    """Hold the store's lock for the duration of the block.

    The lock is an OS file lock on a hidden sibling file (``.NAME.lock`` beside the store, so
    the zarr hierarchy stays clean), released by the kernel if the writer dies: a killed run
    never leaves a stale lock behind. Recording holds it while it creates or checks the store
    and while it marks the store complete; each shard of a recording holds its own lock while
    it writes (`dynamo.shards.shard_lock`).

    Parameters
    ----------
    wait : float
        Seconds to wait for another holder to let go (0: refuse at once).

    Raises
    ------
    StoreBusyError
        If another process holds the lock (for longer than ``wait``).
    """
    path = Path(path)
    lock = filelock.FileLock(str(path.with_name(f".{path.name}.lock")), timeout=wait)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise StoreBusyError(
            f"another process is writing {path}; wait for it to finish (or stop it), then run "
            "the same command again to resume"
        ) from None
    try:
        yield
    finally:
        lock.release()


class StoreIncompleteError(StoreError):
    """Some images of a store are not recorded yet."""


def consolidate(path: str | Path, *, require_complete: bool = True) -> dict:
    """Check that every block of a store is written, and if so mark the store complete.

    A recording written by several shards is finished when the last block is: this is the
    check each shard runs when it is done (the last one to finish completes the store), and
    what ``dynamo record --consolidate`` runs to validate a store once all shards have stopped.
    Call it holding `writer_lock`.

    Every image must be recorded or unreadable (``status``), and every block with a recorded
    image must have all its chunks on disk (a block is marked only after its chunks are
    written, so a missing chunk means the store was damaged or copied in part).

    Parameters
    ----------
    require_complete : bool
        Raise if images are pending; otherwise return the counts.

    Returns
    -------
    dict
        ``complete``, ``recorded``, ``unreadable``, ``pending`` (image counts) and
        ``pending_blocks``: [first image, stop) of each block still to record.

    Raises
    ------
    StoreIncompleteError
        Images are pending and ``require_complete``; the message names the blocks and, for a
        sharded recording, the shards that own them.
    StoreError
        A recorded block's chunks are missing.
    """
    group = open_group(path, mode="r+")
    status = group["status"][:]
    batch = group["status"].chunks[0]
    starts = range(0, len(status), batch)
    pending_blocks = [(s, min(s + batch, len(status))) for s in starts if (status[s : s + batch] == PENDING).any()]
    summary = {
        "complete": not pending_blocks,
        "recorded": int((status == RECORDED).sum()),
        "unreadable": int((status == UNREADABLE).sum()),
        "pending": int((status == PENDING).sum()),
        "pending_blocks": pending_blocks,
    }
    if pending_blocks:
        if require_complete:
            raise StoreIncompleteError(_pending_message(path, group, pending_blocks, len(starts), batch))
        return summary
    written_blocks = sum((status[s : s + batch] == RECORDED).any() for s in starts)
    for name in ("hidden", *SUMMARY_VARIABLES, "logits"):
        if name in group:
            array = group[name]
            per_block = array.nchunks // len(starts)
            if array.nchunks_initialized < written_blocks * per_block:
                raise StoreError(
                    f"store {path}: `{name}` has {array.nchunks_initialized} chunks on disk but its "
                    f"{written_blocks} recorded blocks need {written_blocks * per_block}; the store was "
                    "damaged or copied in part. Record it again into a new --out path."
                )
    ids = group["image_id"][:]
    group.attrs.update(complete=True, unreadable_images=[str(ids[i]) for i in np.flatnonzero(status == UNREADABLE)])
    return summary


def _pending_message(path, group, pending_blocks, n_blocks: int, batch: int) -> str:
    from dynamo.shards import Shard  # shards builds on this module

    count = int(group.attrs.get("shards", 1))
    runs = []  # adjacent blocks merged into runs of images
    for start, stop in pending_blocks:
        if runs and runs[-1][1] == start:
            runs[-1][1] = stop
        else:
            runs.append([start, stop])
    images = ", ".join(f"{start}-{stop - 1}" for start, stop in runs[:8])
    more = f" and {len(runs) - 8} more runs of images" if len(runs) > 8 else ""
    message = f"store {path} is not complete: images {images}{more} are not recorded."
    if count > 1:
        owners = sorted({Shard(0, count).owner(start // batch, n_blocks) for start, _ in pending_blocks})
        message += f" They belong to shard(s) {', '.join(f'{i}/{count}' for i in owners)}: run those again."
    return message + " Running the same `dynamo record` command again resumes the recording."


def open_trajectories(path: str | Path, recorded_only: bool = True) -> xr.Dataset:
    """Open a trajectory store lazily (dask-backed) and validate it.

    Parameters
    ----------
    path : str or Path
        A store written by `dynamo.record`.
    recorded_only : bool
        Drop images that are not recorded (pending in an interrupted store, or unreadable).

    Returns
    -------
    xarray.Dataset
        The trajectory dataset: ``hidden`` (image, layer, token, feature) and friends; nothing
        is read into memory until used.

    Raises
    ------
    StoreError
        Not a dynamo store, or missing required variables.
    """
    open_group(path)
    # an absolute path, so that dask workers in other directories (or machines) read the same store
    dataset = xr.open_zarr(str(Path(path).resolve()), consolidated=False)
    required = {"status"} if dataset.attrs.get("summaries_only") else {"hidden", "status"}
    missing = required - set(dataset.data_vars)
    if missing:
        raise StoreError(f"store {path} lacks required variables {sorted(missing)}")
    if not recorded_only:
        return dataset
    status = dataset["status"].values
    if (status == PENDING).any():
        warnings.warn(
            f"store {path} is incomplete: {(status == PENDING).sum()} of {status.size} images "
            "are not recorded yet; run the same `dynamo record` command again to finish it",
            stacklevel=2,
        )
    return dataset.isel(image=np.flatnonzero(status == RECORDED))


def save_result(result: xr.Dataset, path: str | Path) -> Path:
    """Write an analysis result to zarr (replacing ``path``), readable with ``xr.open_zarr(path)``.

    Fixed-width string coordinates are stored as variable-length strings, which zarr v3 specifies
    (it has no specification for numpy's fixed-width unicode).
    """
    strings = {name: coord.astype(object) for name, coord in result.coords.items() if coord.dtype.kind == "U"}
    with warnings.catch_warnings():  # consolidated metadata is zarr-python's extension to v3: intended
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        result.assign_coords(strings).drop_encoding().to_zarr(path, mode="w")
    return Path(path)
