"""Layer × layer dissimilarity matrices of a trajectory store (0 on the diagonal, larger = less alike),
streamed a block of images at a time, so any of them can feed the phase partitions of `analyses.phases`."""

from __future__ import annotations

from functools import partial

import numpy as np
import xarray as xr
from scipy.linalg import blas

from dynamo.blocks import finite, fold_image_blocks, image_blocks
from dynamo.layout import REDUCED_VIEWS, default_tokens, token_groups

DESCRIPTION = "Layer × layer dissimilarity of the residual stream (cosine, angle, MSE or linear CKA), streamed over the store."
MEASURES = ("cosine", "angular", "mse", "cka")
PER_IMAGE_MEASURES = ("cosine", "angular", "mse")
PIECE_BYTES = 16 * 2**20  # float64 working set per step, on top of one chunk in its stored dtype
COSINE_EPS = 1e-8  # as torch.nn.functional.cosine_similarity in the paper's notebook

DESCRIPTIONS = {
    "cosine": "1 - cos(a_i, a_j)",
    "angular": "arccos(cos(a_i, a_j)) / pi",
    "mse": "mean over features of (a_i - a_j)^2",
    "cka": "1 - linear CKA(layer_i, layer_j)",
}


def layer_similarity(ds: xr.Dataset, measure: str = "cosine", tokens: str | None = None, layers=None, *,
                     per_image: bool = False, progress: bool = True) -> xr.DataArray:
    """Layer × layer dissimilarity of a trajectory dataset, read a chunk of images at a time.

    Parameters
    ----------
    ds : xarray.Dataset
        A trajectory dataset; may be larger than memory (on a dask.distributed client each chunk is a task).
    measure : {"cosine", "angular", "mse", "cka"}
        1 − cos (the paper's), arccos(cos) / π, mean over features of (a_i − a_j)², or 1 − linear CKA with
        the images (or image × token pairs) as samples, exact from streamed sums in feature space.
        Per-vector measures are averaged over a group's vectors, then groups, then images: with the default
        tokens, the paper's "mean over images of mean over [cls, patch-mean]". CKA is averaged over groups.
    tokens : str, optional
        Token groups joined by ``+``: reduced views (``cls``, ``patch_mean``, ``register_mean``: one vector
        per image), token kinds (``patch``, ``register``, ``dist``) or ``all``; default
        `dynamo.layout.default_tokens`.
    layers : sequence of int, optional
        Layer numbers to compare; default the block outputs 1..L, as the paper.
    per_image : bool
        One matrix per image, (image, layer_i, layer_j), whose mean is the default result (not for CKA).

    Returns
    -------
    xarray.DataArray
        ``{measure}_dissimilarity``, (layer_i, layer_j) or (image, layer_i, layer_j), float64; attrs
        ``measure``, ``tokens``, ``orientation="dissimilarity"``, ``description``, ``n_images``, ``model``.

    Raises
    ------
    ValueError
        Unknown measure or token group, layers not in the store, or ``per_image`` with CKA.
    """
    if measure not in MEASURES:
        raise ValueError(f"unknown measure {measure!r}; choose one of {', '.join(MEASURES)}")
    if per_image and measure not in PER_IMAGE_MEASURES:
        raise ValueError(f"per_image matrices exist only for {', '.join(PER_IMAGE_MEASURES)}: {measure} is not "
                         "a mean over images; bootstrap stability needs one of those measures")
    layers = _layer_numbers(ds, layers)
    tokens = default_tokens(ds, tokens)
    groups = _token_groups(ds, tokens, layers)
    n_images = ds.sizes["image"]
    if n_images == 0:
        raise ValueError("the dataset has no recorded images")
    source = "hidden" if any(group.name == "hidden" for group in groups) else groups[0].name
    blocks = image_blocks(ds, source)
    description = f"{measure} similarity"

    if measure == "cka":
        # a fixed shift (the first block's mean) keeps the streamed sums well conditioned
        means = fold_image_blocks(partial(_block_means, tokens=tokens, layers=layers), ds, blocks=blocks[:1], progress=False)
        shifts = [means[f"mean{g}"] for g in range(len(groups))]
        totals = fold_image_blocks(
            partial(_block_cross_products, tokens=tokens, layers=layers, shifts=shifts),
            ds, blocks=blocks, description=description, progress=progress,
        )
        values = 1.0 - np.mean(
            [_cka(totals[f"count{g}"], totals[f"sums{g}"], totals[f"products{g}"], len(layers)) for g in range(len(groups))],
            axis=0,
        )
    else:
        folded = fold_image_blocks(
            partial(_block_dissimilarity, measure=measure, tokens=tokens, layers=layers, per_image=per_image),
            ds, blocks=blocks, description=description, progress=progress,
        )
        values = np.concatenate(folded["matrices"]) if per_image else folded["sum"] / n_images

    dims = ("image", "layer_i", "layer_j") if per_image else ("layer_i", "layer_j")
    coords = {"layer_i": layers, "layer_j": layers, **({"image": ds["image"].values} if per_image else {})}
    diagonal = np.arange(len(layers))
    values[..., diagonal, diagonal] = 0.0  # exactly, not up to rounding
    description = f"{DESCRIPTIONS[measure]}, tokens {tokens}" + ("" if measure == "cka" else ", mean over vectors, groups and images")
    return xr.DataArray(values, dims=dims, coords=coords, name=f"{measure}_dissimilarity", attrs={
        "measure": measure, "tokens": tokens, "orientation": "dissimilarity", "description": description,
        "n_images": n_images, "model": ds.attrs.get("model", "unknown model"), "weights_sha256": ds.attrs.get("weights_sha256", ""),
    })


def _layer_numbers(ds: xr.Dataset, layers) -> np.ndarray:
    available = ds["layer"].values
    if layers is None:
        chosen = available[available > 0]
    else:
        chosen = np.unique(np.asarray(layers, dtype=int))  # depth order, each once
        missing = sorted(set(chosen.tolist()) - set(available.tolist()))
        if missing:
            raise ValueError(f"layers {missing} are not in the store (it has {available.tolist()})")
    if len(chosen) < 2:
        raise ValueError(f"need at least 2 layers to compare, got {chosen.tolist()}")
    return chosen


def _token_groups(ds: xr.Dataset, tokens: str, layers: np.ndarray) -> list[xr.DataArray]:
    """One lazy array (image, layer, sample, feature) per token group."""
    positions = token_groups(ds["token_kind"], pooled=True) if "token_kind" in ds.coords else {}
    groups = []
    for name in (part.strip() for part in tokens.split("+")):
        if name in REDUCED_VIEWS:
            if name not in ds:
                raise ValueError(f"token group {name!r}: this store has no {name} view (the model has no such "
                                 "token); try tokens='patch_mean'")
            group = ds[name].sel(layer=layers).expand_dims("sample", axis=2)
        elif name in positions:
            if "hidden" not in ds:
                raise ValueError(f"token group {name!r} needs the `hidden` variable, which is not in the dataset")
            group = ds["hidden"].sel(layer=layers).isel(token=positions[name]).rename(token="sample")
        else:
            choices = sorted({*REDUCED_VIEWS, *positions})
            raise ValueError(f"unknown token group {name!r} in tokens={tokens!r}; choose from {', '.join(choices)}")
        groups.append(group.transpose("image", "layer", "sample", "feature"))
    return groups


def _pieces(group: xr.DataArray):
    """Read a group of a block of images (stored dtype), yield it as float64 (image, layer, sample, feature)
    pieces of at most about ``PIECE_BYTES``."""
    block = np.asarray(group.values)
    step = max(1, PIECE_BYTES // max(1, block[0].size * 8)) if len(block) else 1
    for start in range(0, len(block), step):
        yield finite(block[start : start + step].astype(np.float64), group.isel(image=slice(start, start + step)))


def _block_dissimilarity(block: xr.Dataset, measure: str, tokens: str, layers, per_image: bool) -> dict:
    """One block's per-image matrices (image, layer_i, layer_j), as a list, or their sum."""
    per_group = [
        np.concatenate([_per_image_dissimilarity(piece, measure) for piece in _pieces(group)])
        for group in _token_groups(block, tokens, layers)
    ]
    matrices = np.mean(per_group, axis=0)  # (image, layer_i, layer_j)
    return {"matrices": [matrices]} if per_image else {"sum": matrices.sum(0)}


def _per_image_dissimilarity(vectors: np.ndarray, measure: str) -> np.ndarray:
    """(image, layer, sample, feature) -> (image, layer_i, layer_j), mean over samples."""
    gram = np.einsum("nlsf,nmsf->nslm", vectors, vectors)
    squared = np.einsum("nsll->nsl", gram)
    if measure == "mse":
        distance = squared[..., :, None] + squared[..., None, :] - 2 * gram
        return np.maximum(distance, 0.0).mean(1) / vectors.shape[-1]
    norms = np.sqrt(squared)
    cosine = np.clip(gram / np.maximum(norms[..., :, None] * norms[..., None, :], COSINE_EPS), -1.0, 1.0)
    if measure == "cosine":
        return (1.0 - cosine).mean(1)
    return (np.arccos(cosine) / np.pi).mean(1)


# Linear CKA between every pair of layers, in feature space, from streamed sums. For samples
# z = [x_1, ..., x_L] (the layers' features side by side) shifted by a fixed vector c (the first
# block's mean, for numerical stability; covariances do not change), the sums are n, s = Σ(z − c)
# and S = Σ(z − c)ᵀ(z − c). Then cov_ij = S_ij / n − m_i m_jᵀ with m = s / n, and
# CKA_ij = ‖cov_ij‖²_F / (‖cov_ii‖_F ‖cov_jj‖_F). S is filled by BLAS ``syrk`` (upper triangle
# only), so the (L·d)² float64 matrix is the only large allocation per block.


def _rows(vectors: np.ndarray) -> np.ndarray:
    """(image, layer, sample, feature) -> (image·sample, layer·feature) CKA samples."""
    n, n_layers, n_samples, n_features = vectors.shape
    return vectors.transpose(0, 2, 1, 3).reshape(n * n_samples, n_layers * n_features)


def _block_means(block: xr.Dataset, tokens: str, layers) -> dict:
    """Mean CKA sample of each token group over a block (the shift of the streamed sums)."""
    return {
        f"mean{g}": np.concatenate([_rows(piece) for piece in _pieces(group)]).mean(0)
        for g, group in enumerate(_token_groups(block, tokens, layers))
    }


def _block_cross_products(block: xr.Dataset, tokens: str, layers, shifts) -> dict:
    """One block's ``count<g>``, shifted ``sums<g>`` and shifted ``products<g>`` (upper triangle) per group g."""
    part = {}
    for g, group in enumerate(_token_groups(block, tokens, layers)):
        shift = shifts[g]
        count, sums = 0, np.zeros_like(shift)
        products = np.zeros((len(shift), len(shift)), order="F")
        for piece in _pieces(group):
            rows = np.asfortranarray(_rows(piece) - shift)
            count += rows.shape[0]
            sums += rows.sum(0)
            products = blas.dsyrk(1.0, rows, beta=1.0, c=products, trans=1, overwrite_c=1)
        part.update({f"count{g}": count, f"sums{g}": sums, f"products{g}": products})
    return part


def _cka(count: int, sums: np.ndarray, products: np.ndarray, n_layers: int) -> np.ndarray:
    """(layer_i, layer_j) linear CKA from the folded sums of one token group."""
    mean = sums / count
    width = products.shape[0] // n_layers
    spans = [slice(layer * width, (layer + 1) * width) for layer in range(n_layers)]
    hsic = np.zeros((n_layers, n_layers))
    for i, rows in enumerate(spans):
        for j in range(i, n_layers):
            block = products[rows, spans[j]]
            if i == j:  # only the upper triangle of S is filled
                block = np.triu(block) + np.triu(block, 1).T
            covariance = block / count - np.outer(mean[rows], mean[spans[j]])
            hsic[i, j] = hsic[j, i] = np.sum(covariance**2)
    scale = np.sqrt(np.diag(hsic))
    return hsic / np.maximum(np.outer(scale, scale), np.finfo(float).tiny)
