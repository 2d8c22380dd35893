"""Phases under several lenses (cosine, CKA, block-Jacobian matrices and the knees of the angular
change): each segmented into k phases, and how well the segmentations agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import numpy as np
import torch
import xarray as xr
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score

from analyses.jacobian import top_singular_triplets
from analyses.perturbation import last_layer, parameter_of, select_images, states_at
from analyses.phases import partition_matrix
from analyses.segmentation import as_matrix
from analyses.similarity import layer_similarity
from analyses.streaming import rounded
from dynamo.layout import default_tokens
from dynamo.partition import Partition, assign_phases, from_result
from dynamo.progress import progress_bar
from dynamo.stepping import propagator_for

__all__ = ["DESCRIPTION", "LENSES", "adjusted_rand", "agreement", "angular_change", "boundary_f1", "compute",
           "jacobian_similarity", "knee_partition", "partitions_of", "subspace_overlap", "summarize"]

DESCRIPTION = (
    "Phases under several lenses: the representational (cosine), CKA and block-Jacobian layer matrices "
    "and the knees of the per-layer angular change, each segmented, and how well the segmentations agree."
)
LENSES = ("cosine", "cka", "jacobian", "knee")
MATRIX_LENSES = ("cosine", "cka", "jacobian")
METHODS = ("maxcut", "contiguous")
SIDES = ("both", "right", "left")


def subspace_overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared cosine of the principal angles between the column spaces of (..., n, r) orthonormal
    ``a`` and ``b``, ‖AᵀB‖²_F / r: (...,) in [0, 1], r/n on average for random subspaces.
    """
    return (a.transpose(-1, -2) @ b).square().sum((-1, -2)) / a.shape[-1]


def jacobian_similarity(ds: xr.Dataset, model, rank: int = 4, layers: Sequence[int] | None = None,
                        images: int | Sequence[int] | None = 32, side: str = "both", oversample: int = 6, n_iter: int = 6,
                        batch_size: int = 8, seed: int = 0, progress: bool = True) -> xr.DataArray:
    """Layer × layer functional dissimilarity: how far apart the blocks' top singular subspaces lie.

    With V_l, U_l the top-``rank`` right and left singular subspaces of block l's Jacobian at the
    stored state (`analyses.jacobian.top_singular_triplets`, with ``oversample`` and ``n_iter``),
    S_ij is the mean over images of ½ (‖V_iᵀV_j‖²_F + ‖U_iᵀU_j‖²_F) / r (``side`` "right" or "left"
    keeps one term), and D = 1 − S; meaningless where the spectrum is flat at the r-th value.
    ``layers`` are the blocks 1..L to compare (default all); ``images`` as
    `analyses.perturbation.select_images`.

    Returns
    -------
    xarray.DataArray
        ``jacobian_dissimilarity`` (layer_i, layer_j), 0 on the diagonal; attrs as
        `analyses.similarity.layer_similarity`'s plus ``rank`` and ``side``.
    """
    if side not in SIDES:
        raise ValueError(f"unknown side {side!r}; choose one of {', '.join(SIDES)}")
    if "hidden" not in ds:
        raise ValueError(
            "the jacobian lens needs every token's states (`hidden`), which this store does not keep: "
            "record it without --summaries-only, or leave jacobian out of the lenses"
        )
    propagator = propagator_for(model, ds)
    ds = select_images(ds, images)
    L = last_layer(ds)
    blocks = list(range(1, L + 1)) if layers is None else sorted({int(layer) for layer in layers})
    if len(blocks) < 2 or blocks[0] < 1 or blocks[-1] > L:
        raise ValueError(f"the jacobian lens compares at least 2 blocks in 1..{L}, got {blocks}")
    if not 1 <= rank < ds.sizes["token"] * ds.sizes["feature"]:
        raise ValueError(f"rank must be at least 1 and below the state's size, got {rank}")
    like = parameter_of(propagator)
    generator = torch.Generator().manual_seed(seed)
    n = ds.sizes["image"]
    total = np.zeros((len(blocks), len(blocks)))
    batches = [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    with progress_bar(total=len(batches) * len(blocks), desc="jacobian subspaces", enabled=progress) as bar:
        for batch in batches:
            left, right = [], []
            for block in blocks:
                x = states_at(ds, block - 1, batch, like)
                u, _, v = top_singular_triplets(
                    partial(_block_output, propagator, block), x, k=rank, oversample=oversample, n_iter=n_iter,
                    generator=generator,
                )
                left.append(u)
                right.append(v)
                bar.update()
            sides = {"left": torch.stack(left, 1), "right": torch.stack(right, 1)}  # (B, layer, n, r)
            chosen = ["left", "right"] if side == "both" else [side]
            overlap = sum(subspace_overlap(sides[s][:, :, None], sides[s][:, None]) for s in chosen) / len(chosen)
            total += overlap.double().sum(0).cpu().numpy()
    values = np.clip(1.0 - total / n, 0.0, 1.0)
    values = (values + values.T) / 2
    np.fill_diagonal(values, 0.0)
    description = (f"1 - mean cos^2 of principal angles between top-{rank} {side} singular subspaces "
                   "of the block Jacobians, mean over images")
    attrs = {"measure": "jacobian", "tokens": "all", "orientation": "dissimilarity", "description": description, "n_images": n,
             "rank": rank, "side": side, "model": ds.attrs.get("model", "unknown model"),
             "weights_sha256": ds.attrs.get("weights_sha256", "")}
    return xr.DataArray(values, dims=("layer_i", "layer_j"), coords={"layer_i": blocks, "layer_j": blocks},
                        name="jacobian_dissimilarity", attrs=attrs)


def _block_output(propagator, block: int, x: torch.Tensor) -> torch.Tensor:
    return propagator.run(x, block - 1, block)[-1]


def angular_change(ds: xr.Dataset, tokens: str | None = None, layers=None, progress: bool = True) -> xr.DataArray:
    """How far the representation turns in each block: the angle between layers l − 1 and l, in units of π.

    The superdiagonal of `layer_similarity(..., measure="angular")`; ``layers`` are the l (default 1..L).
    """
    available = ds["layer"].values
    chosen = available[available > 0] if layers is None else np.unique(np.asarray(layers, dtype=int))
    unpaired = [int(layer) for layer in chosen if layer - 1 not in available]
    if unpaired:
        raise ValueError(
            f"the knee lens measures each block's turn, from layer l - 1 to l, but the store keeps layers "
            f"{available.tolist()} (recorded with --layers), so layers {[layer - 1 for layer in unpaired]} before "
            f"{unpaired} are missing: leave knee out of the lenses, or record every layer"
        )
    pairs = sorted({*chosen.tolist(), *(chosen - 1).tolist()})
    angles = layer_similarity(ds, "angular", tokens, pairs, progress=progress)
    values = [float(angles.sel(layer_i=layer - 1, layer_j=layer)) for layer in chosen]
    return xr.DataArray(values, dims="layer", coords={"layer": chosen}, name="angular_change",
                        attrs={"units": "pi", "tokens": tokens, "description": "angle between layers l - 1 and l, arccos(cos) / pi"})


def knee_partition(change, k: int) -> Partition:
    """Contiguous phases of near-constant angular speed: recursive knees of the cumulative angle.

    The cumulative angle and the layer axis are scaled to [0, 1]; the segment whose point lies
    farthest from its chord is split there, until k phases (Douglas–Peucker). Not ``kneed``: a speed
    that falls and later rises bends the path both ways.

    Parameters
    ----------
    change : xarray.DataArray (layer) or array-like, (n,)
        Non-negative change per layer (`angular_change`); plain arrays get labels 1..n.
    k : int
        Number of phases, 1..n.
    """
    values = np.asarray(change, dtype=float)
    labels = np.asarray(change["layer"].values) if isinstance(change, xr.DataArray) else np.arange(1, len(values) + 1)
    n = len(values)
    if values.ndim != 1 or not np.isfinite(values).all():
        raise ValueError("the change per layer must be a finite 1-D array")
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the number of layers ({n}), got {k}")
    path = np.concatenate([[0.0], np.cumsum(values)])
    x, y = np.arange(n + 1) / n, path / path[-1] if path[-1] > 0 else np.zeros(n + 1)
    cuts = [0, n]
    while len(cuts) - 1 < k:
        best_distance, best_point = -1.0, None
        for a, b in zip(cuts[:-1], cuts[1:]):
            if b - a < 2:
                continue
            inner = np.arange(a + 1, b)
            dx, dy = x[b] - x[a], y[b] - y[a]
            distance = np.abs(dx * (y[inner] - y[a]) - dy * (x[inner] - x[a])) / np.hypot(dx, dy)
            if distance.max() > best_distance:
                best_distance, best_point = float(distance.max()), int(inner[np.argmax(distance)])
        cuts = sorted([*cuts, best_point])
    return Partition(labels[a:b] for a, b in zip(cuts[:-1], cuts[1:]))


def boundary_f1(a, b, tolerance: int = 1) -> float:
    """F1 of two partitions' boundaries, matched one to one within ± ``tolerance`` layers.

    2m / (|A| + |B|) with m the largest one-to-one matching; two partitions without boundaries
    agree (1), one without against one with does not (0).
    """
    first, second = Partition(a).boundaries, Partition(b).boundaries
    if not first and not second:
        return 1.0
    if not first or not second:
        return 0.0
    close = np.abs(np.subtract.outer(first, second)) <= tolerance
    rows, cols = linear_sum_assignment(close, maximize=True)
    return 2.0 * float(close[rows, cols].sum()) / (len(first) + len(second))


def adjusted_rand(a, b) -> float:
    """Adjusted Rand index of two partitions of the same layers (scikit-learn's ``adjusted_rand_score``)."""
    a, b = Partition(a), Partition(b)
    layers = a.blocks
    if layers.tolist() != b.blocks.tolist():
        raise ValueError(f"the partitions cover different layers: {layers.tolist()} and {b.blocks.tolist()}")
    return float(adjusted_rand_score(a.phase_of(layers), b.phase_of(layers)))


def agreement(partitions: dict[str, Partition], tolerance: int = 1) -> xr.Dataset:
    """Pairwise `boundary_f1` and `adjusted_rand` of named partitions, as (segmentation, versus) variables."""
    names = list(partitions)
    f1 = [[boundary_f1(partitions[a], partitions[b], tolerance) for b in names] for a in names]
    ari = [[adjusted_rand(partitions[a], partitions[b]) for b in names] for a in names]
    dims = ("segmentation", "versus")
    return xr.Dataset(
        {
            "boundary_f1": (dims, np.array(f1), {"description": f"F1 of boundaries matched within +-{tolerance} layers"}),
            "adjusted_rand": (dims, np.array(ari), {"description": "adjusted Rand index of the phase labels"}),
        },
        coords={"segmentation": names, "versus": names},
        attrs={"tolerance": tolerance},
    )


def compute(ds: xr.Dataset, model=None, lenses: Sequence[str] = LENSES, k: int | None = None, eps: float = 0.1, *,
            tokens: str | None = None, layers=None, rank: int = 4, side: str = "both", images: int | Sequence[int] | None = 32,
            tolerance: int = 1, oversample: int = 6, n_iter: int = 6, batch_size: int = 8, seed: int = 0,
            progress: bool = True) -> xr.Dataset:
    """Every lens's view of depth, its segmentations into k phases, and their pairwise agreement.

    Parameters
    ----------
    ds : xarray.Dataset
        A trajectory store (``hidden`` for the jacobian lens; layer l − 1 of every layer l for knee).
    model : optional
        The recorded model, for the jacobian lens.
    lenses : sequence of {"cosine", "cka", "jacobian", "knee"}
        In order; the first matrix lens is the reference.
    k : int, optional
        Phases of every segmentation; default as many as the reference lens's max-cut finds with ``eps``.
    tokens, layers; rank, side, images, oversample, n_iter, batch_size, seed
        As `analyses.similarity.layer_similarity`; as `jacobian_similarity`.
    tolerance : int
        Layers by which two boundaries may differ and still match.

    Returns
    -------
    xarray.Dataset
        ``<lens>_dissimilarity`` per matrix lens, ``angular_change``, ``phase_of`` (segmentation,
        layer) with ``lens`` and ``method`` along ``segmentation``, the `agreement` variables, and
        the reference segmentation as the ``phase`` coordinate.
    """
    lenses = list(dict.fromkeys(lenses))
    unknown = sorted(set(lenses) - set(LENSES))
    if unknown or not lenses:
        raise ValueError(f"unknown lens {', '.join(unknown) or '(none given)'}; choose from {', '.join(LENSES)}")
    if "jacobian" in lenses and model is None:
        raise ValueError("the jacobian lens needs the live model the store was recorded with; pass model= (--model)")
    tokens = default_tokens(ds, tokens)
    matrices = {}
    for lens in lenses:
        if lens in ("cosine", "cka"):
            matrices[lens] = layer_similarity(ds, lens, tokens, layers, progress=progress)
        elif lens == "jacobian":
            matrices[lens] = jacobian_similarity(
                ds, model, rank, layers, images, side, oversample, n_iter, batch_size, seed, progress
            )
    change = angular_change(ds, tokens, layers, progress=progress) if "knee" in lenses else None
    if k is None:
        if not matrices:
            raise ValueError("the knee lens alone has no max-cut to choose k from; give k")
        k = len(partition_matrix(next(iter(matrices.values())), "maxcut", eps=eps))
    partitions, lens_of, method_of = {}, [], []
    for lens in lenses:
        if lens == "knee":
            partitions["knee"] = knee_partition(change, k)
            lens_of.append("knee")
            method_of.append("knee")
            continue
        for method in METHODS:
            partitions[f"{lens}/{method}"] = partition_matrix(matrices[lens], method, k=k)
            lens_of.append(lens)
            method_of.append(method)
    labels = [as_matrix(matrix)[1] for matrix in matrices.values()] + ([change["layer"].values] if change is not None else [])
    if any(label.tolist() != labels[0].tolist() for label in labels):
        raise ValueError(f"the lenses cover different layers: {[label.tolist() for label in labels]}")
    layer_axis = labels[0]
    result = xr.Dataset({f"{lens}_dissimilarity": matrix for lens, matrix in matrices.items()}, coords={"layer": layer_axis})
    if change is not None:
        result["angular_change"] = change
    result["phase_of"] = (("segmentation", "layer"), np.stack([partition.phase_of(layer_axis) for partition in partitions.values()]),
                          {"description": "phase index (0..k-1) of each layer in each segmentation"})
    result = result.assign_coords(segmentation=list(partitions), lens=("segmentation", lens_of), method=("segmentation", method_of))
    result = result.merge(agreement(partitions, tolerance))
    result = assign_phases(result, next(iter(partitions.values())))
    attrs = {"analysis": "lenses", "k": int(k), "eps": eps, "tolerance": tolerance, "tokens": tokens, "lenses": lenses,
             "n_images": int(ds.sizes["image"]), "model": ds.attrs.get("model", ""), "weights_sha256": ds.attrs.get("weights_sha256", "")}
    if "jacobian" in matrices:
        attrs.update(rank=rank, side=side, jacobian_images=int(matrices["jacobian"].attrs["n_images"]))
    return result.assign_attrs(attrs)


def partitions_of(result: xr.Dataset) -> dict[str, Partition]:
    """The segmentations a `lens_agreement` result carries, by name."""
    return {
        str(name): from_result(result.assign_coords(phase=("layer", labels)))
        for name, labels in zip(result["segmentation"].values, result["phase_of"].values)
    }


def summarize(result: xr.Dataset) -> dict:
    """Headline numbers of a lenses result: settings, the segmentations and their boundaries, the
    agreement matrices, and their means between lenses and between methods of one lens.
    """
    partitions = partitions_of(result)
    lens = result["lens"].values
    different = lens[:, None] != lens[None, :]
    same = (lens[:, None] == lens[None, :]) & ~np.eye(len(lens), dtype=bool)
    f1, ari = result["boundary_f1"].values, result["adjusted_rand"].values

    def mean(values, mask):
        return rounded(float(values[mask].mean())) if mask.any() else None

    attrs = result.attrs
    return {
        **{name: attrs.get(name) for name in ("model", "n_images", "k", "tolerance") if name in attrs},
        "lenses": list(attrs.get("lenses", [])),
        **{name: attrs[name] for name in ("jacobian_images", "rank") if name in attrs},
        "segmentations": list(partitions),
        "partitions": list(partitions.values()),
        "boundaries": [partition.boundaries for partition in partitions.values()],
        "boundary_f1": rounded(f1),
        "adjusted_rand": rounded(ari),
        "mean_f1_between_lenses": mean(f1, different),
        "mean_ari_between_lenses": mean(ari, different),
        "mean_f1_between_methods": mean(f1, same),
        "mean_ari_between_methods": mean(ari, same),
    }
