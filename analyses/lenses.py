"""Phases under several lenses: do the partitions of depth agree when depth is looked at differently?

Four lenses on the same store, each a view of which layers belong together:

- ``cosine``: the paper's representational matrix, 1 − cos over [cls, patch mean]
  (`analyses.similarity.layer_similarity`);
- ``cka``: 1 − linear CKA between the layers' representations (the same function, ``measure="cka"``);
- ``jacobian``: a *functional* matrix from the block Jacobians (`jacobian_similarity`): how much
  block j's most sensitive directions coincide with block i's, at the real states;
- ``knee``: no matrix; the per-layer angular change of the representation, segmented where its
  cumulative path bends (`angular_change`, `knee_partition`).

Each matrix lens is segmented twice, by the paper's recursive max-cut and by the exact
contiguous split (`analyses.phases.partition_matrix`), every segmentation into the same number
of phases k, and every pair of segmentations is compared by `boundary_f1` (boundaries matched
one to one within ±``tolerance`` layers) and the adjusted Rand index of the layers' phase labels
(scikit-learn's ``adjusted_rand_score``).

Example::

    ds = dynamo.open_trajectories("reg4.zarr")
    model = dynamo.load_recorded_model(ds.attrs)
    result = compute(ds, model, k=3)              # matrices, segmentations, agreement
    summarize(result)["adjusted_rand"]            # (segmentation x segmentation), nested lists
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

__all__ = [
    "DESCRIPTION",
    "LENSES",
    "adjusted_rand",
    "agreement",
    "angular_change",
    "boundary_f1",
    "compute",
    "jacobian_similarity",
    "knee_partition",
    "partitions_of",
    "subspace_overlap",
    "summarize",
]

DESCRIPTION = (
    "Phases under several lenses: the representational (cosine), CKA and block-Jacobian layer matrices "
    "and the knees of the per-layer angular change, each segmented, and how well the segmentations agree."
)
LENSES = ("cosine", "cka", "jacobian", "knee")
MATRIX_LENSES = ("cosine", "cka", "jacobian")
METHODS = ("maxcut", "contiguous")
SIDES = ("both", "right", "left")


# ---- the functional lens: block Jacobians ---------------------------------------------------------


def subspace_overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared cosine of the principal angles between column spaces, batched.

    For orthonormal bases A, B of two r-dimensional subspaces, the cosines of their principal
    angles are the singular values of AᵀB, so Σ cos²θ = ‖AᵀB‖²_F and the mean is ‖AᵀB‖²_F / r:
    1 for the same subspace, 0 for orthogonal ones, r/n on average for random ones in R^n.

    Parameters
    ----------
    a, b : torch.Tensor
        (..., n, r) orthonormal columns.

    Returns
    -------
    torch.Tensor
        (...,) in [0, 1].
    """
    return (a.transpose(-1, -2) @ b).square().sum((-1, -2)) / a.shape[-1]


def jacobian_similarity(
    ds: xr.Dataset,
    model,
    rank: int = 4,
    layers: Sequence[int] | None = None,
    images: int | Sequence[int] | None = 32,
    side: str = "both",
    oversample: int = 6,
    n_iter: int = 6,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> xr.DataArray:
    """Layer × layer functional dissimilarity: how far apart the blocks' top singular subspaces lie.

    For image x and block l (mapping the whole residual stream X_{l−1} ∈ R^{T×D} to X_l), let
    J_l(x) be its Jacobian at the stored state, and V_l, U_l (n × r, n = T·D) orthonormal bases
    of its top-r right (input: what the block is most sensitive to) and left (output: where it
    writes most) singular subspaces, from `analyses.jacobian.top_singular_triplets` (randomized
    block Krylov on JVPs/VJPs; no Jacobian is formed). The similarity of layers i and j is

        S_ij = mean over images of ½ (‖V_iᵀV_j‖²_F + ‖U_iᵀU_j‖²_F) / r

    (``side="both"``; ``"right"`` or ``"left"`` keep one term), the mean squared cosine of the
    principal angles between the subspaces (`subspace_overlap`): 1 when two blocks stretch the
    same directions, about r/n for unrelated ones. The dissimilarity returned is D = 1 − S.

    The subspace is well defined only when σ_r > σ_{r+1}: where the spectrum is flat at the
    r-th value (J = I, a block that does nothing, has every subspace as its top one) the basis
    returned is one arbitrary choice among many and S is meaningless there.

    Parameters
    ----------
    ds : xarray.Dataset
        Trajectory store with every token (``hidden``) at layer l − 1 of every chosen block l.
    model : LoadedModel, timm ViT, BlockStepper or surrogate
        What produced the store (`dynamo.stepping.propagator_for`); block l is ``run(x, l − 1, l)``.
    rank : int
        r, the singular directions per block.
    layers : sequence of int, optional
        The blocks to compare, 1..L (block l produces layer l); default all.
    images : int, sequence of int, or None
        `analyses.perturbation.select_images`: by default 32 images evenly spaced over the store.
    side : {"both", "right", "left"}
    oversample, n_iter : int
        Krylov settings (`analyses.jacobian.top_singular_values`); each image and block costs
        about 2 (n_iter + 1) passes of (rank + oversample) probes through the block.
    batch_size : int
        Images per pass.
    seed : int
        Seed of the random Krylov starts.
    progress : bool
        Show a progress bar.

    Returns
    -------
    xarray.DataArray
        ``jacobian_dissimilarity`` (layer_i, layer_j), float64, 0 on the diagonal; attrs as
        `analyses.similarity.layer_similarity`'s (``measure="jacobian"``, ``orientation``,
        ``description``, ``n_images``, ``model``, ``weights_sha256``) plus ``rank`` and ``side``.
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
    return xr.DataArray(
        values,
        dims=("layer_i", "layer_j"),
        coords={"layer_i": blocks, "layer_j": blocks},
        name="jacobian_dissimilarity",
        attrs={
            "measure": "jacobian",
            "tokens": "all",
            "orientation": "dissimilarity",
            "description": f"1 - mean cos^2 of principal angles between top-{rank} {side} singular subspaces "
            "of the block Jacobians, mean over images",
            "n_images": n,
            "rank": rank,
            "side": side,
            "model": ds.attrs.get("model", "unknown model"),
            "weights_sha256": ds.attrs.get("weights_sha256", ""),
        },
    )


def _block_output(propagator, block: int, x: torch.Tensor) -> torch.Tensor:
    return propagator.run(x, block - 1, block)[-1]


# ---- the knee lens ------------------------------------------------------------------------------


def angular_change(ds: xr.Dataset, tokens: str | None = None, layers=None, progress: bool = True) -> xr.DataArray:
    """How far the representation turns in each block: the angle between layers l − 1 and l.

    The superdiagonal of `layer_similarity(..., measure="angular")` (arccos(cos) / π, mean over
    the token groups and images), so in units of π.

    Parameters
    ----------
    tokens : str
        As `analyses.similarity.layer_similarity`.
    layers : sequence of int, optional
        Layers l whose change from l − 1 is wanted (each l − 1 must be in the store); default
        the block outputs 1..L.

    Returns
    -------
    xarray.DataArray
        ``angular_change`` (layer).
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
    return xr.DataArray(
        values,
        dims="layer",
        coords={"layer": chosen},
        name="angular_change",
        attrs={"units": "pi", "tokens": tokens, "description": "angle between layers l - 1 and l, arccos(cos) / pi"},
    )


def knee_partition(change, k: int) -> Partition:
    """Contiguous phases of near-constant angular speed: recursive knees of the cumulative angle.

    The cumulative angle P(l) = Σ_{m ≤ l} change(m) (P = 0 before the first layer) is a path
    whose slope is the per-layer turning speed; a phase boundary is where the speed changes,
    a knee of P. With P and the layer axis scaled to [0, 1] (as Kneedle does), the first knee
    is the point of P farthest from the chord between its end points; the segment is split
    there, and the segment whose farthest point lies farthest is split next, until k phases
    (top-down piecewise-linear fitting, Douglas–Peucker). A path of k straight pieces is
    split exactly at its corners.

    This closed form, not the ``kneed`` package: Kneedle finds knees of one declared kind
    (concave or convex), while a speed that falls and later rises bends the path both ways.

    Parameters
    ----------
    change : xarray.DataArray (layer) or array-like, (n,)
        Non-negative change per layer (`angular_change`); plain arrays get labels 1..n.
    k : int
        Number of phases, 1..n.

    Returns
    -------
    Partition
        Contiguous phases of the layer labels.
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


# ---- agreement ------------------------------------------------------------------------------------


def boundary_f1(a, b, tolerance: int = 1) -> float:
    """F1 of two partitions' boundaries, matched one to one within ± ``tolerance`` layers.

    With m the largest number of pairs (one boundary of ``a``, one of ``b``, |difference| ≤
    tolerance) in a one-to-one matching (scipy's ``linear_sum_assignment``), precision m/|A|
    and recall m/|B| give F1 = 2m / (|A| + |B|). Boundaries are `Partition.boundaries`: every
    change of phase along depth. Two partitions without boundaries agree (1); one without
    against one with does not (0).
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
    """Pairwise `boundary_f1` and `adjusted_rand` of named partitions.

    Returns
    -------
    xarray.Dataset
        ``boundary_f1`` and ``adjusted_rand`` (segmentation, versus), symmetric, 1 on the diagonal.
    """
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


# ---- everything in one result ---------------------------------------------------------------------


def compute(
    ds: xr.Dataset,
    model=None,
    lenses: Sequence[str] = LENSES,
    k: int | None = None,
    eps: float = 0.1,
    *,
    tokens: str | None = None,
    layers=None,
    rank: int = 4,
    side: str = "both",
    images: int | Sequence[int] | None = 32,
    tolerance: int = 1,
    oversample: int = 6,
    n_iter: int = 6,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> xr.Dataset:
    """Every lens's view of depth, its segmentations into k phases, and their pairwise agreement.

    Parameters
    ----------
    ds : xarray.Dataset
        A trajectory store (every token for the jacobian lens; layer l − 1 of every layer l for
        the knee lens).
    model : optional
        The model the store was recorded with, for the jacobian lens (`jacobian_similarity`).
    lenses : sequence of {"cosine", "cka", "jacobian", "knee"}
        In the order given; the first matrix lens is the reference.
    k : int, optional
        Phases of every segmentation. Default: as many as the reference lens's max-cut finds
        with the fraction ``eps`` (with cosine first, the partition `dynamo phases` prints).
    eps : float
        The paper's fraction f, used only to choose k.
    tokens, layers
        As `analyses.similarity.layer_similarity` (the jacobian lens uses the whole stream of
        the same layers).
    rank, side, images, oversample, n_iter, batch_size, seed
        As `jacobian_similarity`.
    tolerance : int
        Layers by which two boundaries may differ and still match (`boundary_f1`).
    progress : bool

    Returns
    -------
    xarray.Dataset
        - ``<lens>_dissimilarity`` (layer_i, layer_j) per matrix lens, with its own attrs;
        - ``angular_change`` (layer) with the knee lens;
        - ``phase_of`` (segmentation, layer): each segmentation's phase labels; coords
          ``segmentation`` (``"<lens>/<method>"``, ``"knee"``), ``lens`` and ``method`` along it;
        - ``boundary_f1`` and ``adjusted_rand`` (segmentation, versus), `agreement`;
        - coordinate ``phase`` (layer): the reference segmentation (the first one);
        - attrs ``analysis="lenses"``, ``k``, ``eps``, ``tolerance``, ``tokens``, ``lenses``,
          ``n_images``, ``model``, ``weights_sha256``, and with the jacobian lens ``rank``,
          ``side``, ``jacobian_images``.
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
    result = xr.Dataset(
        {f"{lens}_dissimilarity": matrix for lens, matrix in matrices.items()},
        coords={"layer": layer_axis},
    )
    if change is not None:
        result["angular_change"] = change
    result["phase_of"] = (
        ("segmentation", "layer"),
        np.stack([partition.phase_of(layer_axis) for partition in partitions.values()]),
        {"description": "phase index (0..k-1) of each layer in each segmentation"},
    )
    result = result.assign_coords(segmentation=list(partitions), lens=("segmentation", lens_of), method=("segmentation", method_of))
    result = result.merge(agreement(partitions, tolerance))
    result = assign_phases(result, next(iter(partitions.values())))
    attrs = {
        "analysis": "lenses",
        "k": int(k),
        "eps": eps,
        "tolerance": tolerance,
        "tokens": tokens,
        "lenses": lenses,
        "n_images": int(ds.sizes["image"]),
        "model": ds.attrs.get("model", ""),
        "weights_sha256": ds.attrs.get("weights_sha256", ""),
    }
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
    """Headline numbers of a `lens_agreement` result, a JSON-able dict.

    Returns
    -------
    dict
        The settings (``model``, ``n_images``, ``k``, ``lenses``, ``tolerance``, and
        ``jacobian_images``, ``rank`` with the jacobian lens); ``segmentations`` (names),
        ``partitions`` and ``boundaries`` (in their order); ``boundary_f1`` and
        ``adjusted_rand`` (nested lists, segmentation × segmentation); the means over pairs of
        segmentations from different lenses (``mean_f1_between_lenses``,
        ``mean_ari_between_lenses``) and, for each matrix lens, max-cut against contiguous
        (``mean_f1_between_methods``, ``mean_ari_between_methods``; None without such pairs).
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
