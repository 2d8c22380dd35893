"""Splitting one recording across processes: shard ``I`` of ``N`` owns a contiguous run of the store's blocks, and its lock.

Shards of different layouts would overlap, so a run refuses to start while a shard of another layout holds
its lock; `consolidate` checks every shard's blocks are on disk and marks the store complete.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import filelock
import numpy as np

from dynamo.store import PENDING, RECORDED, UNREADABLE, StoreBusyError, StoreError, acquire_lock, check_store, open_group

# (index, count) variables set by common launchers, checked in this order
LAUNCHER_VARIABLES = (
    ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"),  # sbatch --array
    ("RANK", "WORLD_SIZE"),  # torchrun, torch.distributed
    ("SLURM_PROCID", "SLURM_NTASKS"),  # srun
)


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (0-based) of ``count``."""

    index: int = 0
    count: int = 1

    def __post_init__(self):
        if self.count < 1:
            raise ValueError(f"--shard I/N needs at least one shard (N >= 1), got {self.index}/{self.count}")
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard index must be in 0..{self.count - 1} for {self.count} shards, got {self.index}")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def blocks(self, n_blocks: int) -> range:
        """The block numbers this shard owns: a contiguous run, sizes differing by at most one."""
        return range(self.index * n_blocks // self.count, (self.index + 1) * n_blocks // self.count)

    def owner(self, block: int, n_blocks: int) -> int:
        """Index of the shard (of this shard's layout) that owns ``block``."""
        return next(i for i in range(self.count) if block in Shard(i, self.count).blocks(n_blocks))


def parse_shard(text: str | None, environ=os.environ) -> Shard:
    """A `Shard` from ``"I/N"``, from ``"auto"`` (the launcher's environment), or None (one shard).

    ``auto`` reads SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT, RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS, the
    first pair present. Raises ValueError for malformed text, an index out of range, or no launcher variables.
    """
    if text is None:
        return Shard()
    if text == "auto":
        for index, count in LAUNCHER_VARIABLES:
            if index in environ and count in environ:
                return Shard(int(environ[index]), int(environ[count]))
        names = ", ".join(f"{i}/{c}" for i, c in LAUNCHER_VARIABLES)
        raise ValueError(f"--shard auto found none of the launcher variables ({names}); pass --shard I/N")
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise ValueError(f"--shard takes I/N (0-based index I of N shards, e.g. 0/4) or 'auto', got {text!r}")
    return Shard(int(match[1]), int(match[2]))


def lock_folder(store: str | Path) -> Path:
    store = Path(store)
    return store.with_name(f".{store.name}.locks")


@contextlib.contextmanager
def shard_lock(store: str | Path, shard: Shard):
    """Hold ``shard``'s lock on ``store`` (holding `writer_lock`); `StoreBusyError` if it or another layout runs."""
    folder = lock_folder(store)
    folder.mkdir(parents=True, exist_ok=True)
    own = folder / f"shard-{shard.index}-of-{shard.count}.lock"
    check_no_shard_running(store, except_count=shard.count)
    what = "another process" if shard.count == 1 else f"shard {shard} is already running and"
    with acquire_lock(own, 0, what, store):
        yield


def check_no_shard_running(
    store: str | Path, except_count: int | None = None, advice: str = "before replacing the store"
) -> None:
    """Raise `StoreBusyError` if a shard (of a layout other than ``except_count`` shards) writes ``store``.

    Lock files of stopped shards are removed. Call it holding `writer_lock`; ``advice`` ends the message.
    """
    for other in sorted(lock_folder(store).glob("shard-*-of-*.lock")):
        if except_count is not None and other.name.endswith(f"-of-{except_count}.lock"):
            continue
        probe = filelock.FileLock(str(other), timeout=0)
        try:
            probe.acquire()
        except filelock.Timeout:
            count = _name(other).split("/")[1]
            advice = ("shards of one store must share one layout while they run: use "
                      f"--shard I/{count}, or wait for it to finish") if except_count else \
                f"wait for it to finish (or stop it) {advice}"
            raise StoreBusyError(f"shard {_name(other)} is writing {store}; {advice}") from None
        probe.release()
        other.unlink(missing_ok=True)


def _name(lock_file: Path) -> str:
    index, count = re.fullmatch(r"shard-(\d+)-of-(\d+)\.lock", lock_file.name).groups()
    return f"{index}/{count}"


class StoreIncompleteError(StoreError):
    """Some images of a store are not recorded yet."""


def consolidate(path: str | Path, *, require_complete: bool = True) -> dict:
    """Check that every block of a store is written (holding `writer_lock`), and if so mark the store complete.

    Returns ``complete``, ``recorded``, ``unreadable``, ``pending`` (image counts) and ``pending_blocks``. Raises
    `StoreIncompleteError` when images are pending and ``require_complete`` (naming the blocks and their shards),
    and `StoreDamagedError` when a recorded block's chunks are missing.
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
    check_store(path, group)
    ids = group["image_id"][:]
    group.attrs.update(complete=True, unreadable_images=[str(ids[i]) for i in np.flatnonzero(status == UNREADABLE)])
    return summary


def _pending_message(path, group, pending_blocks, n_blocks: int, batch: int) -> str:
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
