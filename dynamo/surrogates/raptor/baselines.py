"""The paper's partition test: Raptor's recipe refitted on uniform, random contiguous and shuffled partitions, and k = 1."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import xarray as xr

from dynamo.models import LoadedModel
from dynamo.partition import Partition, from_result
from dynamo.surrogates.raptor.fit import RaptorFitter

__all__ = ["candidate_partitions", "partition_baselines"]

PARTITION_PARAMS = ("k", "partition", "progress", "checkpoint_dir")  # what a baseline may change


def partition_baselines(
    ds: xr.Dataset | str | Path,
    fitted: RaptorFitter,
    random_seeds: int = 3,
    shuffled_seeds: int = 0,
    teacher: LoadedModel | None = None,
    reuse: Sequence[RaptorFitter] = (),
) -> xr.Dataset:
    """Refit ``fitted``'s recipe on baseline partitions and report them beside it.

    Parameters
    ----------
    ds : xarray.Dataset, str or Path
        The trajectory dataset ``fitted`` was fitted on, or its store's path.
    fitted : RaptorFitter
        A fitted surrogate (its parameters are reused; only the partition changes).
    random_seeds : int
        Number of random contiguous partitions (`Partition.random_contiguous`, seeds 0..n-1).
    shuffled_seeds : int
        Number of random shuffled partitions (`Partition.random_shuffled`, seeds 0..n-1): phases of
        blocks drawn at random, not contiguous in depth.
    teacher : LoadedModel, optional
        As in `RaptorFitter.fit`.
    reuse : sequence of RaptorFitter
        Surrogates already fitted on this dataset with the same recipe (e.g. the k = 1 fit); a
        baseline whose partition one of them (or ``fitted``) has is not fitted again.

    Returns
    -------
    xarray.Dataset
        Over ``fit`` ("fitted", "uniform", "random 0", ..., "k=1") and ``layer``: ``r2`` (fit, layer),
        ``r2_final``, ``accuracy_ratio``, ``agreement`` (fit), and each fit's partition as the
        ``phase`` coordinate (fit, layer); on the held-out images. A baseline whose partition is
        already fitted repeats its row (the recipe is deterministic given the seed).
    """
    num_layers, k = fitted.model_.num_layers, len(fitted.partition_)
    candidates = candidate_partitions(num_layers, k, random_seeds, shuffled_seeds)
    if k > 1:
        candidates["k=1"] = Partition.uniform(num_layers, 1)
    recipe = _recipe(fitted)
    if any(_recipe(other) != recipe for other in reuse):
        raise ValueError("a surrogate passed in reuse was fitted with another recipe; fit it with the same parameters")
    known = {str(f.partition_): f.evaluate(ds, probe=False) for f in (*reuse, fitted)}
    reports = {"fitted": known[str(fitted.partition_)]}
    for name, partition in candidates.items():
        if str(partition) not in known:
            baseline = RaptorFitter(**recipe, partition=partition, progress=fitted.progress).fit(ds, teacher=teacher)
            known[str(partition)] = baseline.evaluate(ds, probe=False)
        reports[name] = known[str(partition)]
    names = list(reports)
    layers = reports["fitted"]["layer"].values
    return xr.Dataset(
        {
            "r2": (("fit", "layer"), np.stack([reports[n]["r2"].sel(token_kind="all").values for n in names])),
            "r2_final": (("fit",), np.array([reports[n].attrs["r2_final"] for n in names])),
            "accuracy_ratio": (("fit",), np.array([reports[n].attrs.get("accuracy_ratio", np.nan) for n in names])),
            "agreement": (("fit",), np.array([reports[n].attrs.get("agreement", np.nan) for n in names])),
        },
        coords={
            "fit": names,
            "layer": layers,
            "phase": (("fit", "layer"), np.stack([from_result(reports[n]).phase_of(layers) for n in names])),
        },
        attrs={"model": reports["fitted"].attrs["model"], "k": k, "r2_reference": "target",
               "description": "Raptor with the same recipe on the fitted partition and on baselines"},
    )


def candidate_partitions(num_layers: int, k: int, random_seeds: int = 3, shuffled_seeds: int = 0) -> dict[str, Partition]:
    """`partition_baselines`' partitions with k phases by name: ``uniform``, ``random i`` (contiguous),
    ``shuffled i``; a caller that fits them itself (to save and reuse each) passes them back as ``reuse``."""
    candidates = {"uniform": Partition.uniform(num_layers, k)}
    candidates.update({f"random {seed}": Partition.random_contiguous(num_layers, k, seed) for seed in range(random_seeds)})
    candidates.update({f"shuffled {seed}": Partition.random_shuffled(num_layers, k, seed) for seed in range(shuffled_seeds)})
    return candidates


def _recipe(fitter: RaptorFitter) -> dict:
    """A fitter's parameters but those a baseline changes."""
    return {name: value for name, value in fitter.get_params().items() if name not in PARTITION_PARAMS}
