"""Partitions of depth into phases: one type, parsed, validated and read in one place.

In results a partition travels as a ``phase`` coordinate over ``layer`` (or ``block``), -1 for a layer in no phase.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Sequence

import numpy as np
import xarray as xr

PHASE_DIMS = ("layer", "block")  # the depth dims a `phase` coordinate may run over
NO_PHASE = -1


class Partition(list):
    """Phases of 1-based block indices, validated (non-empty, disjoint), sorted by first block; a plain nested `list`.

    Raises ValueError if there is no phase, a phase is empty, or two phases share a block.
    """

    def __init__(self, phases: Iterable[Iterable[int]]):
        phases = [sorted(int(block) for block in phase) for phase in phases]
        if not phases or any(not phase for phase in phases):
            raise ValueError(f"a partition is a non-empty list of non-empty phases, got {phases!r}")
        blocks = [block for phase in phases for block in phase]
        if len(set(blocks)) != len(blocks):
            raise ValueError(f"phases overlap in {phases!r}")
        super().__init__(sorted(phases, key=lambda phase: phase[0]))

    @classmethod
    def parse(cls, value, num_blocks: int, contiguous: bool = True) -> Partition:
        """A partition of blocks 1..L (``num_blocks``) from any of the forms users write.

        ``value``: ``"1-7,8-12"`` or ``[[1, ..., 7], [8, ..., 12]]`` (phases), or the k - 1 router thresholds ``"7"`` /
        ``[7]``. Raises ValueError if the phases are not contiguous runs (with ``contiguous``, as every surrogate but
        Raptor and the CLI need), or do not hold every block 1..L exactly once.
        """
        if isinstance(value, str):
            value = _read_text(value)
        value = list(value)
        if all(isinstance(v, (int, np.integer)) for v in value):  # thresholds; [] is one phase
            return cls.from_thresholds(value, num_blocks)
        phases = [[int(block) for block in phase] for phase in value]
        blocks = [block for phase in phases for block in phase]
        if (blocks if contiguous else sorted(blocks)) != list(range(1, num_blocks + 1)) or not all(phases):
            raise ValueError(
                f"partition {phases} must split blocks 1..{num_blocks} into non-empty contiguous phases in order, e.g. "
                "'1-7,8-12'" if contiguous else f"partition {phases} must hold every block 1..{num_blocks} once"
            )
        return cls(phases)

    @classmethod
    def from_thresholds(cls, thresholds: Sequence[int], num_blocks: int) -> Partition:
        """Contiguous phases ending at each threshold, the last at L: ``[7, 10], 12`` → ``[[1..7], [8..10], [11, 12]]``."""
        bounds = [0, *[int(t) for t in thresholds], num_blocks]
        if any(b <= a for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"thresholds {list(thresholds)} must increase strictly within 1..{num_blocks - 1}")
        return cls(range(a + 1, b + 1) for a, b in zip(bounds, bounds[1:]))

    @classmethod
    def uniform(cls, num_blocks: int, k: int) -> Partition:
        """Blocks 1..L cut into k contiguous phases of (nearly) equal length, longer ones first."""
        _check_k(num_blocks, k)
        return cls(np.array_split(np.arange(1, num_blocks + 1), k))

    @classmethod
    def every_contiguous(cls, num_blocks: int, k: int) -> list[Partition]:
        """Every partition of blocks 1..L into k contiguous phases, C(L - 1, k - 1) of them, in order of their cut points."""
        _check_k(num_blocks, k)
        return [cls.from_thresholds(cuts, num_blocks) for cuts in itertools.combinations(range(1, num_blocks), k - 1)]

    @classmethod
    def random_contiguous(cls, num_blocks: int, k: int, seed: int) -> Partition:
        """Blocks 1..L cut into k contiguous phases at k - 1 cut points drawn uniformly without replacement."""
        return cls(np.split(np.arange(1, num_blocks + 1), _random_cuts(np.random.default_rng(seed), num_blocks, k)))

    @classmethod
    def random_shuffled(cls, num_blocks: int, k: int, seed: int) -> Partition:
        """Blocks 1..L in a random order cut into k phases (sizes drawn as `random_contiguous`'s): the paper's "random shuffled"."""
        rng = np.random.default_rng(seed)
        cuts = _random_cuts(rng, num_blocks, k)
        return cls(np.split(rng.permutation(np.arange(1, num_blocks + 1)), cuts))

    @property
    def blocks(self) -> np.ndarray:
        """Every block of the partition in depth order, (n,)."""
        return np.array(sorted(block for phase in self for block in phase))

    def phase_of(self, layers) -> np.ndarray:
        """Phase index (0..k-1) of each layer, -1 for layers in no phase; same shape as ``layers``."""
        lookup = {block: index for index, phase in enumerate(self) for block in phase}
        layers = np.asarray(layers)
        return np.array([lookup.get(int(layer), NO_PHASE) for layer in layers.ravel()], dtype=int).reshape(layers.shape)

    @property
    def boundaries(self) -> list[int]:
        """Blocks after which a new phase begins, in depth order (every change of phase counts)."""
        blocks = self.blocks
        labels = self.phase_of(blocks)
        return [int(block) for block, change in zip(blocks[:-1], labels[1:] != labels[:-1]) if change]

    @property
    def is_contiguous(self) -> bool:
        """Whether every phase is a run of consecutive blocks in depth order."""
        return len(self.boundaries) == len(self) - 1 and all(np.all(np.diff(phase) == 1) for phase in self)

    @property
    def thresholds(self) -> list[int]:
        """Raptor router thresholds (length k - 1, contiguous phases only): block t goes to phase i if t ≤ thresholds[i], else the last."""
        if not self.is_contiguous:
            raise ValueError(
                f"partition {list(self)} is not contiguous in depth; Raptor thresholds need contiguous "
                "phases (use method='contiguous')"
            )
        return [phase[-1] for phase in self[:-1]]

    def __str__(self) -> str:
        """``[1-3][4-6,9][7-8]``: each phase as runs of blocks."""
        return "".join(_span(phase) for phase in self)


def assign_phases(result: xr.Dataset, partition: Partition | None) -> xr.Dataset:
    """``result`` with a ``phase`` coordinate over its depth dim (``layer``, else ``block``); -1 outside the partition."""
    dim = next((dim for dim in PHASE_DIMS if dim in result.dims), None)
    if partition is None or dim is None:
        return result
    return result.assign_coords(phase=(dim, Partition(partition).phase_of(result[dim].values)))


def from_result(result: xr.Dataset | xr.DataArray) -> Partition | None:
    """The partition carried by a result's ``phase`` coordinate (see `assign_phases`), or None."""
    if "phase" not in result.coords:
        return None
    phase = result["phase"]
    (dim,) = phase.dims
    depth, labels = np.asarray(result[dim].values), np.asarray(phase.values).astype(int)
    phases = [depth[labels == index].tolist() for index in np.unique(labels[labels != NO_PHASE])]
    return Partition(phases) if phases else None


def boundaries_of(result: xr.Dataset | xr.DataArray) -> list[int]:
    """Blocks after which a new phase begins, read from a result (empty when it carries none)."""
    partition = from_result(result)
    return [] if partition is None else partition.boundaries


def _read_text(text: str) -> list:
    parts = [part.strip() for part in text.split(",") if part.strip()]
    try:
        if any("-" in part for part in parts):
            spans = [re.fullmatch(r"(\d+)(?:-(\d+))?", part).groups() for part in parts]
            backwards = [part for part, (a, b) in zip(parts, spans) if b is not None and int(b) < int(a)]
            if backwards:
                raise _Backwards(backwards)
            return [list(range(int(a), int(b or a) + 1)) for a, b in spans]
        return [int(part) for part in parts]
    except _Backwards as error:
        raise ValueError(f"cannot read partition {text!r}: the phase {error.args[0][0]} runs backwards; write each phase "
                         "as first-last with first <= last, e.g. '1-6,7-12'") from None
    except (AttributeError, ValueError):
        raise ValueError(f"cannot read partition {text!r}: write phases like '1-7,8-12' or thresholds like '7'") from None


class _Backwards(Exception):
    """Phases a-b of a partition's text with b < a."""


def _check_k(num_blocks: int, k: int) -> None:
    if not 1 <= k <= num_blocks:
        raise ValueError(f"k={k} phases must be between 1 and the number of blocks, {num_blocks}")


def _span(phase: Sequence[int]) -> str:
    """[1, 2, 3, 5] -> '[1-3,5]'."""
    runs: list[list[int]] = []
    for block in phase:
        if runs and block == runs[-1][1] + 1:
            runs[-1][1] = block
        else:
            runs.append([block, block])
    return "[" + ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs) + "]"


def _random_cuts(rng: np.random.Generator, num_blocks: int, k: int) -> np.ndarray:
    """k - 1 sorted cut points drawn uniformly without replacement from 1..L - 1 (k checked)."""
    _check_k(num_blocks, k)
    return np.sort(rng.choice(np.arange(1, num_blocks), size=k - 1, replace=False))


def resolve_partition(partition, k: int | None, num_layers: int) -> Partition:
    """A fitter's partition: ``partition`` parsed, or k uniform phases (2 without k); k must match a given partition."""
    if partition is None:
        return Partition.uniform(num_layers, 2 if k is None else k)
    partition = Partition.parse(partition, num_layers, contiguous=False)
    if k is not None and k != len(partition):
        raise ValueError(f"k={k} but the partition {partition} has {len(partition)} phases; give one or the other")
    return partition
