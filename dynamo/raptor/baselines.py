"""Baselines for a Raptor fit: the same recipe on uniform and random contiguous partitions, and k = 1.

The paper's partition test (spec section 3) compares Raptor fitted on max-cut phases with Raptor
on random contiguous partitions over 10 seeds; the question is whether the phases found in the
similarity structure are better places to share blocks than arbitrary ones with the same k.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import xarray as xr

from dynamo.models import LoadedModel
from dynamo.raptor.fit import RaptorFitter

__all__ = ["partition_baselines", "random_contiguous_partition", "uniform_partition"]


def uniform_partition(num_layers: int, k: int) -> list[list[int]]:
    """Blocks 1..L cut into k contiguous phases of (nearly) equal length, longer ones first."""
    return [phase.tolist() for phase in np.array_split(np.arange(1, num_layers + 1), k)]


def random_contiguous_partition(num_layers: int, k: int, seed: int) -> list[list[int]]:
    """Blocks 1..L cut into k contiguous phases at k - 1 cut points drawn uniformly without replacement."""
    cuts = np.sort(np.random.default_rng(seed).choice(np.arange(1, num_layers), size=k - 1, replace=False))
    return [phase.tolist() for phase in np.split(np.arange(1, num_layers + 1), cuts)]


def partition_baselines(
    store,
    fitted: RaptorFitter,
    random_seeds: int = 3,
    teacher: LoadedModel | None = None,
    reuse: Sequence[RaptorFitter] = (),
) -> xr.Dataset:
    """Refit ``fitted``'s recipe on baseline partitions and report them beside it.

    Parameters
    ----------
    store : str or Path
        The store ``fitted`` was fitted on.
    fitted : RaptorFitter
        A fitted surrogate (its parameters are reused; only the partition changes).
    random_seeds : int
        Number of random contiguous partitions (seeds 0..n-1).
    teacher : LoadedModel, optional
        As in `RaptorFitter.fit`.
    reuse : sequence of RaptorFitter
        Surrogates already fitted on this store with the same recipe (e.g. the k = 1 fit); a
        baseline whose partition one of them (or ``fitted``) has is not fitted again.

    Returns
    -------
    xarray.Dataset
        Dims ``fit`` ("fitted", "uniform", "random 0", ..., "k=1") and ``layer``: ``r2`` (fit,
        layer) on all tokens; ``r2_final``, ``accuracy_ratio``, ``agreement`` (fit); coord
        ``partition`` (fit) as JSON text. Evaluated on the held-out images, as `RaptorFitter.evaluate`.
        A baseline whose partition equals the fitted one (or a reused one) repeats its row: the
        recipe is deterministic given the seed, so refitting would give the same surrogate.
    """
    num_layers = fitted.model_.num_layers
    k = len(fitted.partition_)
    params = {**fitted.get_params(), "checkpoint_dir": None}
    candidates = {"uniform": uniform_partition(num_layers, k)}
    candidates.update({f"random {seed}": random_contiguous_partition(num_layers, k, seed) for seed in range(random_seeds)})
    if k > 1:
        candidates["k=1"] = [list(range(1, num_layers + 1))]
    recipe = {key: value for key, value in params.items() if key not in ("k", "partition", "progress")}
    for other in reuse:
        other_recipe = {key: value for key, value in other.get_params().items() if key not in ("k", "partition", "progress", "checkpoint_dir")}
        if other_recipe != {key: value for key, value in recipe.items() if key != "checkpoint_dir"}:
            raise ValueError("a surrogate passed in reuse was fitted with another recipe; fit it with the same parameters")
    known = {json.dumps(f.partition_): f.evaluate(store, probe=False) for f in (*reuse, fitted)}
    reports = {"fitted": known[json.dumps(fitted.partition_)]}
    for name, partition in candidates.items():
        key = json.dumps(partition)
        if key not in known:
            baseline = RaptorFitter(**{**params, "k": None, "partition": partition}).fit(store, teacher=teacher)
            known[key] = baseline.evaluate(store, probe=False)
        reports[name] = known[key]
    names = list(reports)
    return xr.Dataset(
        {
            "r2": (("fit", "layer"), np.stack([reports[n]["r2"].sel(group="all").values for n in names])),
            "r2_final": (("fit",), np.array([reports[n].attrs["r2_final"] for n in names])),
            "accuracy_ratio": (("fit",), np.array([reports[n].attrs.get("accuracy_ratio", np.nan) for n in names])),
            "agreement": (("fit",), np.array([reports[n].attrs.get("agreement", np.nan) for n in names])),
        },
        coords={
            "fit": names,
            "layer": reports["fitted"]["layer"].values,
            "partition": ("fit", [reports[n].attrs["partition"] for n in names]),
        },
        attrs={"k": k, "description": "Raptor with the same recipe on the fitted partition and on baselines", "r2_reference": "target"},
    )
