"""Update-rank collapse (Raptor paper, section 5 (iii) and its appendix D).

For each block and token kind, the update matrix U stacks the updates of every token of that
kind in every image, one row each, and is centred over its rows:

- ``raw``: U = X_{ℓ+1} − X_ℓ;
- ``sphere``: U = x̂_{ℓ+1} − x̂_ℓ (updates of the directions; the paper's "angular" updates).

With σ² the eigenvalues of the centred scatter UᵀU (the squared singular values of U):

- stable rank ‖U‖_F² / ‖U‖₂² = Σσ² / max σ² (the paper: about 6 in late layers of DINOv2-B);
- effective rank exp(H(p)), p = σ² / Σσ² (entropy rank, Roy & Vetterli 2007);
- participation ratio (Σσ²)² / Σσ⁴;
- the number of directions holding ``variance`` (default 90%) of Σσ².

The scatter is accumulated a chunk at a time (per-image Gram matrices UᵢᵀUᵢ, row sums and row
counts), so memory does not depend on the number of images. Error bars come from a Poisson
bootstrap over images (each image gets weight ~ Poisson(1) in each replicate; Oza & Russell
2001, Chamandy et al. 2012), which can be streamed, unlike resampling with replacement. Memory
is that of the accumulators (the running total and one chunk's), twice
8·F²·(replicates + 1)·(token kinds)·(spaces) bytes per block: about 40 MB for F = 64 and 100
replicates, 5.7 GB for F = 768 (use fewer replicates there). On a dask.distributed client
(`analyses.streaming.fold_image_blocks`) the chunks are tasks on the workers and the total is
summed there; only the spectra come back.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import xarray as xr
from threadpoolctl import threadpool_limits

from analyses.streaming import fold_image_blocks, provenance, rounded, unit
from dynamo.layout import token_groups

DESCRIPTION = (
    "Rank of each block's updates per token kind (stable and effective rank, participation "
    "ratio, directions for a variance share), raw and on the unit sphere, with bootstrap intervals."
)
SPACES = ("raw", "sphere")
MEASURES = ("stable_rank", "effective_rank", "participation_ratio", "n_directions")


def spectrum_measures(eigenvalues: np.ndarray, variance: float = 0.9) -> dict[str, np.ndarray]:
    """Rank measures of scatter spectra.

    Parameters
    ----------
    eigenvalues : numpy.ndarray
        (..., n) eigenvalues σ² of a scatter matrix (any order; tiny negatives from rounding
        are treated as 0).
    variance : float
        Fraction of the total for ``n_directions``.

    Returns
    -------
    dict of numpy.ndarray
        ``stable_rank``, ``effective_rank``, ``participation_ratio``, ``n_directions``, each
        of shape (...); NaN where the spectrum is all zero.
    """
    values = np.sort(np.clip(eigenvalues, 0.0, None), axis=-1)[..., ::-1]
    total = values.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = values / total[..., None]
        entropy = -np.sum(np.where(share > 0, share * np.log(np.where(share > 0, share, 1.0)), 0.0), axis=-1)
        measures = {
            "stable_rank": total / values[..., 0],
            "effective_rank": np.exp(entropy),
            "participation_ratio": total**2 / np.sum(values**2, axis=-1),
            "n_directions": np.where(
                total > 0, np.sum(np.cumsum(share, axis=-1) < variance - 1e-12, axis=-1) + 1.0, np.nan
            ),
        }
    return measures


def compute(
    ds: xr.Dataset,
    *,
    spaces: tuple[str, ...] = SPACES,
    n_bootstrap: int = 100,
    variance: float = 0.9,
    seed: int = 0,
    progress: bool = True,
) -> xr.Dataset:
    """Rank measures of the per-block updates, per token kind, with bootstrap error bars.

    Reads ``hidden`` one chunk (a block of images, one layer) at a time; every layer is read
    twice (as the start and as the end of a step).

    Parameters
    ----------
    ds : xarray.Dataset
        A trajectory dataset (`dynamo.open_trajectories`).
    spaces : tuple of {"raw", "sphere"}
        Updates of the states, and/or of their directions.
    n_bootstrap : int
        Poisson-bootstrap replicates over images (0: none).
    variance : float
        Variance fraction for ``n_directions``.
    seed : int
        Seed of the bootstrap weights.
    progress : bool
        Show a progress bar.

    Returns
    -------
    xarray.Dataset
        ``rank`` (measure, token_kind, space, block): the estimates on all images;
        ``rank_bootstrap`` (replicate, measure, token_kind, space, block) when ``n_bootstrap >
        0``; ``spectrum`` (token_kind, space, block, component): σ², largest first; ``rows``
        (token_kind, block): rows of U. ``block`` b is the step from layer ``from_layer`` to b.
    """
    unknown = set(spaces) - set(SPACES)
    if unknown or not spaces:
        raise ValueError(f"spaces must be a subset of {SPACES}, got {spaces!r}")
    if n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be >= 0, got {n_bootstrap}")
    layers = ds["layer"].values
    if len(layers) < 2:
        raise ValueError("update rank needs at least two recorded layers; record without --layers")
    groups = token_groups(ds["token_kind"])
    n_features = ds.sizes["feature"]
    # each image's position travels with its block, which keys its bootstrap weights
    positioned = ds.assign_coords(position=("image", np.arange(ds.sizes["image"])))
    shape = (len(groups), len(spaces), len(layers) - 1)
    measures = {name: np.zeros((n_bootstrap + 1,) + shape) for name in MEASURES}
    spectrum = np.zeros(shape + (n_features,))
    rows = np.zeros((len(groups), len(layers) - 1), dtype=np.int64)
    for step in range(len(layers) - 1):
        settings = dict(step=step, groups=groups, spaces=spaces, n_bootstrap=n_bootstrap, seed=seed)
        folded = fold_image_blocks(
            partial(_block_scatter, **settings), positioned, finish=partial(_spectra, variance=variance),
            description=f"rank: block {layers[step + 1]}", progress=progress,
        )
        for name in MEASURES:
            measures[name][..., step] = folded[name]
        spectrum[..., step, :] = folded["spectrum"]
        rows[:, step] = folded["rows"]

    stacked = np.stack([measures[name] for name in MEASURES], axis=1)  # (replicate, measure, token_kind, space, block)
    dims = ("measure", "token_kind", "space", "block")
    variables = {
        "rank": (dims, stacked[0], {"long_name": "rank measures of the centred update matrix, all images"}),
        "spectrum": (("token_kind", "space", "block", "component"), spectrum,
                     {"long_name": "eigenvalues σ² of the centred update scatter, largest first"}),
        "rows": (("token_kind", "block"), rows, {"long_name": "rows (tokens x images) of the update matrix"}),
    }
    if n_bootstrap:
        variables["rank_bootstrap"] = (("replicate",) + dims, stacked[1:],
                                       {"long_name": "Poisson-bootstrap replicates over images"})
    return xr.Dataset(
        variables,
        coords={
            "measure": list(MEASURES),
            "token_kind": list(groups),
            "space": list(spaces),
            "block": layers[1:],
            "from_layer": ("block", layers[:-1]),
            "component": np.arange(1, n_features + 1),
        },
        attrs={
            **provenance(ds),
            "analysis_detail": "rank of per-block updates, stacked over tokens and images, centred",
            "variance": variance,
            "n_bootstrap": n_bootstrap,
            "bootstrap": "Poisson(1) weights per image, shared by every block",
            "seed": seed,
        },
    )


update_rank = compute


def _block_scatter(block: xr.Dataset, step: int, groups, spaces, n_bootstrap: int, seed: int) -> dict:
    """One block's weighted update scatter, row sums and row counts for one step.

    Returns ``scatter`` (token_kind, space, replicate, feature, feature), ``sums`` (token_kind,
    space, replicate, feature) and ``counts`` (token_kind, space, replicate), replicate 0 unweighted.
    """
    hidden = block["hidden"]
    start = np.asarray(hidden.isel(layer=step).values, dtype=np.float64)
    end = np.asarray(hidden.isel(layer=step + 1).values, dtype=np.float64)
    weight = _weights(seed, int(block["position"][0]), block.sizes["image"], n_bootstrap)  # (replicate, image)
    n_replicates, n_features = n_bootstrap + 1, block.sizes["feature"]
    scatter = np.zeros((len(groups), len(spaces), n_replicates, n_features, n_features))
    sums = np.zeros((len(groups), len(spaces), n_replicates, n_features))
    counts = np.zeros((len(groups), len(spaces), n_replicates))
    for k, positions in enumerate(groups.values()):
        for s, space in enumerate(spaces):
            if space == "raw":
                update = end[:, positions] - start[:, positions]
            else:
                update = unit(end[:, positions]) - unit(start[:, positions])
            gram = (update.transpose(0, 2, 1) @ update).reshape(len(update), -1)
            scatter[k, s] = (weight @ gram).reshape(n_replicates, n_features, n_features)
            sums[k, s] = weight @ update.sum(axis=1)
            counts[k, s] = weight.sum(axis=1) * len(positions)
    return {"scatter": scatter, "sums": sums, "counts": counts}


def _spectra(folded: dict, variance: float) -> dict:
    """Rank measures (replicate, token_kind, space) and the spectrum (token_kind, space, component) of a step's folded scatter."""
    scatter, sums, counts = folded["scatter"], folded["sums"], folded["counts"]
    centred = scatter - np.einsum("ksbf,ksbg->ksbfg", sums, sums) / np.maximum(counts, 1)[..., None, None]
    with threadpool_limits(limits=1, user_api="blas"):  # a batch of small matrices: threads only contend
        eigenvalues = np.linalg.eigvalsh(centred)[..., ::-1]  # (token_kind, space, replicate, component)
    return {
        **{name: np.moveaxis(value, -1, 0) for name, value in spectrum_measures(eigenvalues, variance).items()},
        "spectrum": np.clip(eigenvalues[:, :, 0], 0.0, None),
        "rows": counts[:, 0, 0],
    }


def _weights(seed: int, first: int, n: int, n_bootstrap: int) -> np.ndarray:
    """(replicate, image) weights of a block of ``n`` images from position ``first``: row 0 all ones, then Poisson(1) draws.

    Drawn from a generator keyed by the seed and the block's first image, so an image keeps
    its weights in every block step and the result does not depend on the reading order.
    """
    draws = np.random.default_rng([seed, first]).poisson(1.0, size=(n_bootstrap, n))
    return np.concatenate([np.ones((1, n)), draws], axis=0)


def intervals(result: xr.Dataset, level: float = 0.95) -> xr.DataArray:
    """Percentile bootstrap interval of ``rank``: (bound, measure, token_kind, space, block), bound = low/high."""
    if "rank_bootstrap" not in result:
        raise ValueError("the result has no bootstrap replicates; run update_rank with n_bootstrap > 0")
    tail = (1 - level) / 2
    bounds = result["rank_bootstrap"].quantile([tail, 1 - tail], dim="replicate", skipna=True)
    return bounds.rename(quantile="bound").assign_coords(bound=["low", "high"])


def summarize(result: xr.Dataset) -> dict:
    """Stable rank per block for each kind and space (with 95% interval bounds), and the other measures for patches."""
    numbers = {}
    rank = result["rank"].astype(float)
    bounds = intervals(result) if "rank_bootstrap" in result else None
    for space in result["space"].values:
        for kind in result["token_kind"].values:
            key, where = f"stable_rank_{space}_{kind}", dict(measure="stable_rank", token_kind=kind, space=space)
            numbers[key] = rounded(rank.sel(where).values)
            if bounds is not None:
                for bound in ("low", "high"):
                    numbers[f"{key}_ci95_{bound}"] = rounded(bounds.sel(where).sel(bound=bound).values)
    kind = "patch" if "patch" in result["token_kind"].values else str(result["token_kind"].values[-1])
    space = "sphere" if "sphere" in result["space"].values else str(result["space"].values[0])
    for name in ("effective_rank", "participation_ratio", "n_directions"):
        numbers[f"{name}_{space}_{kind}"] = rounded(rank.sel(measure=name, token_kind=kind, space=space).values)
    return numbers
