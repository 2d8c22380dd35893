"""The trajectory store: a zarr group laid out as dynamo's trajectory dataset (design.md), with its checks and locks.

Blocks of ``batch_size`` images are written aligned with the chunks and ``status`` is set only after a block's
data, so a killed writer leaves only whole blocks and resuming rewrites exactly the unmarked ones.
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

from dynamo.layout import REDUCED_VIEWS, TOKEN_KINDS

FORMAT = "dynamo-trajectories/1"
PENDING, RECORDED, UNREADABLE = 0, 1, 2


class StoreError(RuntimeError):
    """A path is not a dynamo trajectory store, or is not usable as asked."""


class StoreMismatchError(StoreError):
    """An existing store was recorded with a different model, images or settings."""


class StoreDamagedError(StoreError):
    """Recorded data are missing from disk, or do not have the shape and dtype the store declares."""


class StoreBusyError(StoreError):
    """Another process is writing the store."""


def require_contents(ds: xr.Dataset, needs: str, *, every_layer: bool = True, every_token: bool = True) -> None:
    """Raise a one-line `StoreError` naming what a store lacks that ``needs`` (a command, or its rungs) reads.

    ``every_layer`` / ``every_token`` also require layers 0..L (no ``--layers``) and every token (no ``--patch-tokens``).
    """
    where = ds.encoding.get("source", "the store")
    if "hidden" not in ds.data_vars:
        views = ", ".join(name for name in REDUCED_VIEWS if name in ds.data_vars)
        raise StoreError(f"{needs} need every token at every layer (`hidden`), but {where} holds only the reduced views "
                         f"({views}; recorded with --summaries-only): record it again without --summaries-only "
                         "(`dynamo phases` works on this store)")
    if ds.sizes["image"] == 0:
        raise StoreError(f"{where} has no recorded images; record some with `dynamo record`")
    num_blocks = int(ds.attrs.get("num_blocks", ds["layer"].values.max()))
    layers = [int(layer) for layer in ds["layer"].values]
    if every_layer and layers != list(range(num_blocks + 1)):
        raise StoreError(f"{needs} need every layer 0..{num_blocks}, but {where} keeps layers {layers} (recorded with "
                         "--layers): record it again without --layers")
    num_tokens = int(ds.attrs.get("num_prefix_tokens", 0)) + int(np.prod(ds.attrs.get("patch_grid", [0])))
    if every_token and num_tokens and ds.sizes["token"] != num_tokens:
        raise StoreError(f"{needs} need every token of the model ({num_tokens}), but {where} keeps {ds.sizes['token']} "
                         "(recorded with --patch-tokens): record it again without --patch-tokens")


def create_store(path: str | Path, template: xr.Dataset, encoding: dict) -> None:
    """Write a store's metadata and coordinates beside ``path`` and rename it into place; data stay unwritten.

    Call it holding `writer_lock`. ``template`` is a dask-backed dataset of the finished store; ``encoding``
    the per-variable zarr encoding.
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
    """Raise `StoreMismatchError` if the store was recorded with other settings than ``identity``."""
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
    """Hold the store's OS file lock (``.NAME.lock`` beside it; the kernel frees it if the writer dies), waiting ``wait`` s."""
    path = Path(path)
    with acquire_lock(path.with_name(f".{path.name}.lock"), wait, "another process", path):
        yield


def acquire_lock(lock_file: str | Path, wait: float, holder: str, store: str | Path):
    """The OS file lock ``lock_file``, held until the ``with`` block it opens ends; `StoreBusyError` naming ``holder`` if busy."""
    try:
        return filelock.FileLock(str(lock_file), timeout=wait).acquire()
    except filelock.Timeout:
        raise StoreBusyError(f"{holder} is writing {store}; wait for it to finish (or stop it), then run the same command "
                             "again to resume") from None


def missing_chunks(path: str | Path, group: zarr.Group) -> list[tuple[str, int, int, int]]:
    """Chunks of recorded images that are not on disk: ``(variable, layer index, first image, stop)``.

    A missing chunk of a recorded block means the store was damaged or copied in part (zarr would read its fill value).
    """
    status = group["status"][:]
    missing = []
    for name in ("hidden", *REDUCED_VIEWS, "logits"):
        if name not in group:
            continue
        array = group[name]
        batch = array.chunks[0]
        for coords in array._iter_chunk_coords():
            start = coords[0] * batch
            if (status[start:start + batch] == RECORDED).any():
                if not (Path(path) / name / array.metadata.encode_chunk_key(coords)).exists():
                    layer = coords[1] * array.chunks[1] if array.ndim > 2 else -1
                    missing.append((name, layer, start, min(start + batch, len(status))))
    return missing


def check_store(path: str | Path, group: zarr.Group) -> None:
    """Raise `StoreDamagedError` naming the first damage: ``hidden``'s dtype or shape, or a recorded block's missing chunks."""
    if "hidden" in group:
        hidden, attrs = group["hidden"], group.attrs
        expected = (group["status"].shape[0], len(attrs["identity"]["layers"]), len(attrs["identity"]["tokens"]),
                    int(attrs["embed_dim"]))
        if hidden.shape != expected or str(hidden.dtype) != attrs["dtype"]:
            raise StoreDamagedError(
                f"store {path} is damaged: `hidden` is {hidden.dtype} {hidden.shape}, its attrs declare "
                f"{attrs['dtype']} {expected}; record it again into a new --out path"
            )
    missing = missing_chunks(path, group)
    if missing:
        name, layer, start, stop = missing[0]
        where = f"layer {int(group['layer'][layer])}, " if layer >= 0 else ""
        raise StoreDamagedError(
            f"store {path} is damaged: `{name}` {where}images {start}-{stop - 1} are recorded but their data are "
            f"not on disk ({len(missing)} chunk(s) in all); run the same `dynamo record` command again to "
            "re-record exactly those images"
        )


def open_trajectories(path: str | Path, recorded_only: bool = True, validate: bool = True) -> xr.Dataset:
    """Open a trajectory store lazily (dask-backed) and validate it (`check_store`; ``validate=False`` only to describe a damaged store).

    ``recorded_only`` drops images not recorded (pending or unreadable). Raises `StoreError` (not a dynamo store,
    or required variables missing) or `StoreDamagedError` (recorded data missing or misshapen).
    """
    group = open_group(path)
    try:
        if validate:
            check_store(path, group)
        # an absolute path, so that dask workers in other directories (or machines) read the same store
        dataset = xr.open_zarr(str(Path(path).resolve()), consolidated=False)
    except StoreError:
        raise
    except Exception as error:  # zarr or xarray could not read the metadata, whatever the form
        raise StoreDamagedError(
            f"store {path} is damaged: {_unreadable_metadata(path) or f'its metadata cannot be read ({error})'}; "
            "record it again into a new --out path"
        ) from None
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


def writable_path(path: str | Path) -> Path:
    """``path`` with its parent folders created; a one-line `StoreError` if an ancestor is a file."""
    path = Path(path)
    for folder in reversed(path.parents):
        if folder.exists() and not folder.is_dir():
            raise StoreError(f"--out {path}: {folder} is a file, not a folder; choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


RESULT_KIND = "dynamo_result"  # attrs key that marks an analysis result and names its kind


def check_output(path: str | Path, inputs=()) -> Path:
    """Raise `StoreError` if ``path`` is a trajectory store, lies inside one, or is one of the ``inputs``."""
    path = Path(path)
    resolved = path.resolve()
    if any(resolved == Path(source).resolve() for source in inputs):
        raise StoreError(f"--out {path} is this command's own input; write the result to another path")
    for folder in (resolved, *resolved.parents):
        if (folder / "zarr.json").exists() and is_trajectory_store(folder):
            where = "is" if folder == resolved else f"lies inside {folder}, which is"
            raise StoreError(f"--out {path} {where} a trajectory store, which a result never replaces; "
                             "write the result to another path")
    return path


def _unreadable_metadata(path: str | Path) -> str | None:
    """The first metadata file of a zarr store that is not valid JSON, as a phrase, or None."""
    for metadata in sorted(Path(path).rglob("zarr.json")):
        try:
            json.loads(metadata.read_text())
        except (OSError, ValueError):
            return f"{metadata} is not valid JSON (truncated?)"
    return None


def save_result(result: xr.Dataset, path: str | Path, inputs=()) -> Path:
    """Write an analysis result to zarr, readable with ``xr.open_zarr(path)``.

    It is marked with its kind (attrs ``dynamo_result``) and replaces only a result of the same kind (`check_output`).
    Fixed-width string coordinates are stored as variable-length strings, which zarr v3 specifies.
    """
    path = check_output(path, inputs)
    kind = str(result.attrs.get("analysis", "result"))
    if path.exists():
        try:
            existing = zarr.open_group(str(path), mode="r").attrs.get(RESULT_KIND)
        except Exception:  # not zarr at all
            existing = None
        if existing != kind:
            found = f"a {existing!r} result" if existing else "not a dynamo result"
            raise StoreError(f"--out {path} exists and is {found}; a {kind!r} result replaces only its own kind: "
                             "choose another path or delete it")
    strings = {name: coord.astype(object) for name, coord in result.coords.items() if coord.dtype.kind == "U"}
    with warnings.catch_warnings():  # consolidated metadata is zarr-python's extension to v3: intended
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        result.assign_coords(strings).assign_attrs({RESULT_KIND: kind}).drop_encoding().to_zarr(path, mode="w")
    return path


def describe(path: str | Path) -> dict:
    """Headline facts of a store: model, sizes, completeness, and where it is."""
    dataset = open_trajectories(path, recorded_only=False, validate=False)
    try:
        check_store(path, open_group(path))
        damage = None
    except StoreDamagedError as error:
        damage = str(error)
    status = dataset["status"].values
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
        "layers": int(dataset.sizes["layer"]),
        "tokens": int(dataset.sizes["token"]),
        "features": int(dataset.sizes["feature"]),
        "image_size": attrs.get("image_size"),
        "token_kinds": {k: int((dataset["token_kind"] == k).sum()) for k in TOKEN_KINDS},
        "dtype": str(dataset["hidden"].dtype) if "hidden" in dataset else "summaries only",
        "shards": int(attrs.get("shards", 1)),
        "bytes": size_bytes,
        "complete": bool(attrs.get("complete")) and damage is None,
        "damage": damage,
    }
    kinds = ", ".join(f"{n} {k}" for k, n in summary["token_kinds"].items() if n)
    summary["text"] = (
        f"{summary['store']}: {summary['model']} (weights sha256 {summary['weights_sha256'][:12]})\n"
        f"{summary['n_recorded']}/{summary['n_images']} images recorded"
        f"{', ' + str(len(summary['unreadable_images'])) + ' unreadable (skipped)' if summary['unreadable_images'] else ''}"
        f"{', INCOMPLETE: ' + _resume_hint(summary['shards']) if summary['n_pending'] else ''}\n"
        + (
            f"hidden: {summary['layers']} layers x {summary['tokens']} tokens ({kinds}) x "
            f"{summary['features']} features, {summary['dtype']}; images {summary['image_size']} px"
            if "hidden" in dataset
            else f"reduced views only ({', '.join(v for v in REDUCED_VIEWS if v in dataset)}): "
            f"{summary['layers']} layers x {summary['features']} features"
        )
        + f", {size_bytes / 1e6:.1f} MB on disk"
        + (f"\nDAMAGED: {damage}" if damage else "")
    )
    return summary


def _resume_hint(shards: int) -> str:
    if shards > 1:
        return f"recorded by {shards} shards; `dynamo consolidate STORE` names the ones to run again"
    return "run the same record command to resume"


def positions_of(dataset: xr.Dataset, values) -> np.ndarray:
    """Sorted positions along ``image`` of the images whose ``image`` coordinate is among ``values``."""
    return np.flatnonzero(np.isin(dataset["image"].values, values))


def image_positions(dataset: xr.Dataset, images) -> np.ndarray:
    """Positions along ``image`` that an ``images=`` argument names: the one meaning of ``images`` in dynamo.

    ``images``: None for every image; an int n for n images evenly spaced along ``image`` (class-folder stores
    are ordered by class); a sequence for those positions. Returns int64 positions, in the order given.
    """
    n = dataset.sizes["image"]
    if images is None:
        return np.arange(n)
    if isinstance(images, (int, np.integer)):
        if images < 1:
            raise ValueError(f"images must be at least 1, got {images}")
        return np.unique(np.linspace(0, n - 1, min(int(images), n)).round().astype(np.int64))
    positions = np.asarray(list(images), dtype=np.int64).reshape(-1)
    if positions.size and (positions.min() < -n or positions.max() >= n):
        raise ValueError(f"image positions must lie in 0..{n - 1}, got {positions.min()}..{positions.max()}")
    return positions
