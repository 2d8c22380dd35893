"""Splitting one recording across processes: which blocks a shard owns, and its lock.

A store is written in blocks of ``batch_size`` images (its chunks along ``image``). Shard ``I``
of ``N`` owns a contiguous run of those blocks, so N processes — on one machine or on many that
share the store's filesystem — fill disjoint chunks of one store concurrently and never write
the same file. Any launcher works: a shell loop, a SLURM array, torchrun, a dask cluster.

Each shard holds its own lock (``.NAME.locks/shard-I-of-N.lock`` beside the store) while it
writes, so running the same shard twice is refused, and resuming a shard is running its command
again. Shards of different layouts (say 0/2 and 1/4) would overlap, so a run refuses to start
while a shard of another layout holds its lock; once they are done, any layout (or a single
process) may finish what is left.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import filelock

from dynamo.store import StoreBusyError

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

    ``auto`` reads SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT (an sbatch array starting at 0),
    RANK/WORLD_SIZE (torchrun) or SLURM_PROCID/SLURM_NTASKS (srun), the first pair present.

    Raises
    ------
    ValueError
        Malformed text, an index out of range, or ``auto`` with no launcher variables.
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
    """Hold ``shard``'s lock on ``store``; call it holding the store's `writer_lock`.

    Raises
    ------
    StoreBusyError
        The same shard is running elsewhere, or a shard of another layout is.
    """
    folder = lock_folder(store)
    folder.mkdir(parents=True, exist_ok=True)
    own = folder / f"shard-{shard.index}-of-{shard.count}.lock"
    for other in sorted(folder.glob("shard-*-of-*.lock")):
        if other.name.endswith(f"-of-{shard.count}.lock"):
            continue
        probe = filelock.FileLock(str(other), timeout=0)
        try:
            probe.acquire()
        except filelock.Timeout:
            raise StoreBusyError(
                f"shard {_name(other)} is writing {store}; shards of one store must share one layout "
                f"while they run: use --shard I/{_name(other).split('/')[1]}, or wait for it to finish"
            ) from None
        probe.release()
        other.unlink(missing_ok=True)
    lock = filelock.FileLock(str(own), timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        what = "another process" if shard.count == 1 else f"shard {shard} is already running and"
        raise StoreBusyError(
            f"{what} is writing {store}; wait for it to finish (or stop it), then run the same "
            "command again to resume"
        ) from None
    try:
        yield
    finally:
        lock.release()


def _name(lock_file: Path) -> str:
    index, count = re.fullmatch(r"shard-(\d+)-of-(\d+)\.lock", lock_file.name).groups()
    return f"{index}/{count}"
