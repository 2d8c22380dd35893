"""Directional convergence and angular basins (Raptor paper, section 5 (i)), on the unit sphere with
depth as time: γ_ℓ = ⟨x̂_ℓ, x̂_L⟩ per token kind, class structure per layer, leave-one-out
nearest-centroid basin accuracy, and a 2-D projection of the cls trajectories.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import xarray as xr

from analyses.streaming import (
    Accumulator,
    Chunk,
    angle_deg,
    contiguous,
    cosines,
    image_coords,
    principal_directions,
    provenance,
    read_block,
    rounded,
    stream,
)
from dynamo.blocks import fold_image_blocks, unit
from dynamo.heads import LinearHead, store_accuracy, store_labels
from dynamo.layout import REDUCED_VIEWS, token_groups

DESCRIPTION = (
    "Directional convergence of each token kind to its final direction, and how early images "
    "fall into their class's angular basin (cls and patch-mean directions)."
)


def compute(ds: xr.Dataset, *, fit_layers: str = "all", n_components: int = 2, progress: bool = True,
            head: LinearHead | None = None) -> xr.Dataset:
    """Directional convergence per token kind, class structure per layer and cls paths in 2-D.

    Parameters
    ----------
    ds : xarray.Dataset
        A trajectory dataset.
    fit_layers : {"all", "final"}
        Unit cls vectors the projection is fitted on: every layer's, or the last layer's.
    n_components : int
        Dimensions of the projection.
    head : LinearHead, optional
        The head of the model's own accuracy (`dynamo.heads.store_accuracy`); default the stored ``logits``.

    Returns
    -------
    xarray.Dataset
        ``gamma`` (image, token_kind, layer). With labels, per ``view`` (cls, patch_mean) and layer:
        ``within_class_cosine``, ``between_class_cosine`` (mean over image pairs), their angles
        (degrees), ``final_centroid_accuracy``, ``layer_centroid_accuracy``. With a cls token:
        ``projection`` (image, layer, component) and ``explained_variance_ratio``. Attrs hold
        ``model_accuracy`` and its head, or ``accuracy_note``.
    """
    accumulator = Convergence(ds, fit_layers=fit_layers, n_components=n_components, progress=progress, head=head)
    return stream(ds, {"basins": accumulator}, description="basins", progress=progress)["basins"]


class Convergence(Accumulator):
    """`compute`'s accumulator for `analyses.streaming.stream`: γ from ``hidden``, and per-class sums of
    unit views and the cls scatter from the reduced views; ``finish`` reads the reduced views once
    more for the nearest-centroid credits and the projection.
    """

    reads_final = True

    def __init__(self, ds: xr.Dataset, *, fit_layers: str = "all", n_components: int = 2, progress: bool = True,
                 head: LinearHead | None = None):
        if fit_layers not in ("all", "final"):
            raise ValueError(f"fit_layers must be 'all' or 'final', got {fit_layers!r}")
        groups = token_groups(ds["token_kind"])
        self.groups = {kind: contiguous(positions) for kind, positions in groups.items()}
        labels = store_labels(ds)
        views = [v for v in REDUCED_VIEWS[:2] if v in ds.data_vars and (v != "cls" or "cls" in groups)]  # cls, patch_mean
        self.class_views = views if labels is not None else []
        self.classes = np.unique(labels) if labels is not None else None
        self.projection_fit = fit_layers
        self.fit_layers = fit_layers if "cls" in views else None  # None: no projection
        self.n_components, self.progress, self.head = n_components, progress, head

    def open_block(self, block: xr.Dataset, total: dict) -> dict:
        """The block's γ (filled by `update`), per-class sums of unit views and cls scatter."""
        part = {"gamma": [np.zeros((block.sizes["image"], len(self.groups), block.sizes["layer"]))]}
        if self.class_views:
            one_hot = np.eye(len(self.classes))[_class_index(block, self.classes)]
            for view in self.class_views:
                part[f"class_sums_{view}"] = np.einsum("ic,ilf->lcf", one_hot, unit(read_block(block, view)))
        if self.fit_layers:
            directions = unit(read_block(block, "cls"))
            rows = (directions if self.fit_layers == "all" else directions[:, -1:]).reshape(-1, directions.shape[-1])
            part.update(scatter=rows.T @ rows, direction_sum=rows.sum(axis=0), count=len(rows))
        return part

    def update(self, state: dict, chunk: Chunk, previous: Chunk | None, final: Chunk | None) -> None:
        cosine = cosines(chunk, final)
        for k, positions in enumerate(self.groups.values()):
            state["gamma"][0][:, k, chunk.index] = cosine[:, positions].mean(axis=1)

    def finish(self, total: dict, dataset: xr.Dataset) -> xr.Dataset:
        layers, labels, classes, class_views = dataset["layer"].values, store_labels(dataset), self.classes, self.class_views
        result = xr.Dataset(
            {
                "gamma": (("image", "token_kind", "layer"), np.concatenate(total["gamma"]).astype(np.float32),
                          {"long_name": "γ: cosine to own final direction", "units": "1",
                           "description": "mean over the kind's tokens of <x̂_l, x̂_L>, per image"})
            },
            coords={"image": dataset["image"].values, "token_kind": list(self.groups), "layer": layers,
                    **{name: ("image", values) for name, values in image_coords(dataset).items()}},
        )
        class_sums = {view: total[f"class_sums_{view}"] for view in class_views}
        projection = (principal_directions(total["scatter"], total["direction_sum"], total["count"], self.n_components)
                      if self.fit_layers else None)
        if class_views or projection is not None:
            second = fold_image_blocks(
                partial(_second_pass, class_sums=class_sums, classes=classes, projection=projection),
                dataset, description="basins: class structure", progress=self.progress,
            )
        if class_views:
            counts = np.bincount(np.searchsorted(classes, labels), minlength=len(classes)).astype(np.float64)
            result = result.merge(_class_structure(dataset, class_sums, counts, second))
        if projection is not None:
            result = result.merge(_projection_result(dataset, self.fit_layers, projection, second))
        result.attrs.update(store_accuracy(dataset, self.head, self.progress))
        result.attrs.update(
            **provenance(dataset),
            analysis_detail="directional convergence and angular basins on unit-normalised tokens",
            class_pairs="mean cosine over image pairs, exact from per-class sums of unit vectors",
            centroid_accuracy="nearest class centroid by cosine, leaving the image out of its own class centroid",
            projection_fit=self.projection_fit,
        )
        return result


def _second_pass(block, class_sums, classes, projection) -> dict:
    """One block's nearest-centroid credits per view and layer, and its cls projection."""
    part = {}
    if class_sums:
        own = _class_index(block, classes)
    for view, per_class in class_sums.items():
        directions = unit(read_block(block, view))
        final = directions[:, -1]
        n_layers = directions.shape[1]
        part[f"correct_final_{view}"] = np.array(
            [_nearest_centroid_credit(directions[:, layer], per_class[-1], final, own).sum() for layer in range(n_layers)]
        )
        part[f"correct_layer_{view}"] = np.array(
            [_nearest_centroid_credit(directions[:, layer], per_class[layer], directions[:, layer], own).sum()
             for layer in range(n_layers)]
        )
    if projection is not None:
        mean, components, _ = projection
        part["projection"] = [(unit(read_block(block, "cls")) - mean) @ components]
    return part


def _class_index(block, classes) -> np.ndarray:
    """Index into ``classes`` of each image's label in a block."""
    return np.searchsorted(classes, np.asarray(block["label"].values).astype(int))


def _class_structure(dataset, class_sums, counts, second) -> xr.Dataset:
    """Within/between-class mean cosines and leave-one-out centroid accuracy per view and layer."""
    views = list(class_sums)
    n_layers = dataset.sizes["layer"]
    within, between, final_accuracy, layer_accuracy = (np.zeros((len(views), n_layers)) for _ in range(4))
    n_images = counts.sum()
    for v, view in enumerate(views):
        per_class = class_sums[view]
        squared = np.einsum("lcf,lcf->lc", per_class, per_class)
        overall = per_class.sum(axis=1)
        within[v] = (squared - counts).sum(axis=1) / (counts * (counts - 1)).sum()
        between[v] = (np.einsum("lf,lf->l", overall, overall) - squared.sum(axis=1)) / (n_images**2 - (counts**2).sum())
        final_accuracy[v] = second[f"correct_final_{view}"] / n_images
        layer_accuracy[v] = second[f"correct_layer_{view}"] / n_images
    dims = ("view", "layer")
    return xr.Dataset(
        {
            "within_class_cosine": (dims, within, {"long_name": "mean cosine, same-class pairs"}),
            "between_class_cosine": (dims, between, {"long_name": "mean cosine, different-class pairs"}),
            "within_class_angle": (dims, angle_deg(within), {"units": "degree", "long_name": "arccos of mean same-class cosine"}),
            "between_class_angle": (dims, angle_deg(between), {"units": "degree", "long_name": "arccos of mean different-class cosine"}),
            "final_centroid_accuracy": (dims, final_accuracy, {"long_name": "nearest final-layer class centroid accuracy (leave-one-out)"}),
            "layer_centroid_accuracy": (dims, layer_accuracy, {"long_name": "nearest same-layer class centroid accuracy (leave-one-out)"}),
        },
        coords={"view": list(views), "layer": dataset["layer"].values},
    )


def _nearest_centroid_credit(directions, class_sums, own_vectors, own_class) -> np.ndarray:
    """Credit for assigning each image to the class centroid nearest by cosine, itself left out.

    An image tied between n centroids, its own among them, scores 1/n (ties broken at random in expectation).

    Parameters
    ----------
    directions : (image, feature) unit vectors to classify.
    class_sums : (class, feature) sums of unit vectors over each class's images.
    own_vectors : (image, feature) each image's own contribution to its class's sum.
    own_class : (image,) index of each image's class.
    """
    rows = np.arange(len(directions))
    dots = directions @ class_sums.T
    norms = np.broadcast_to(np.linalg.norm(class_sums, axis=1), dots.shape).copy()
    own_sum = class_sums[own_class]
    dots[rows, own_class] -= np.einsum("if,if->i", directions, own_vectors)
    left_out = (np.einsum("if,if->i", own_sum, own_sum) - 2 * np.einsum("if,if->i", own_sum, own_vectors)
                + np.einsum("if,if->i", own_vectors, own_vectors))
    norms[rows, own_class] = np.sqrt(np.maximum(left_out, 0.0))
    scores = np.divide(dots, norms, out=np.full_like(dots, -np.inf), where=norms > 1e-12)
    nearest = scores >= scores.max(axis=1, keepdims=True) - 1e-9
    return nearest[rows, own_class] / nearest.sum(axis=1)


def _projection_result(dataset, fit_layers, projection, second) -> xr.Dataset:
    """Principal-component coordinates of every image's unit cls trajectory."""
    _, components, explained = projection
    n_components = components.shape[1]
    return xr.Dataset(
        {
            "projection": (("image", "layer", "component"), np.concatenate(second["projection"]).astype(np.float32),
                           {"long_name": "unit cls direction on principal components", "fit_layers": fit_layers}),
            "explained_variance_ratio": (("component",), explained, {"long_name": "variance fraction of the fitted unit cls vectors"}),
        },
        coords={"component": np.arange(1, n_components + 1), "layer": dataset["layer"].values},
    )


def half_rise_layer(curve: np.ndarray, layers: np.ndarray) -> float | None:
    """Layer (linearly interpolated) where a curve rising to 1 first covers half its rise from its first
    value; None if it never gets there.
    """
    level = (curve[0] + 1.0) / 2
    above = np.flatnonzero(curve >= level)
    if not len(above):
        return None
    i = above[0]
    if i == 0:
        return float(layers[0])
    fraction = (level - curve[i - 1]) / (curve[i] - curve[i - 1])
    return float(layers[i - 1] + fraction * (layers[i] - layers[i - 1]))


def summarize(result: xr.Dataset) -> dict:
    """Headline numbers: per token kind γ per layer, its half-rise layer and steepest block; basin accuracy per layer."""
    layers = result["layer"].values
    gamma = result["gamma"].mean("image").astype(float)
    numbers = {}
    for kind in result["token_kind"].values:
        curve = gamma.sel(token_kind=kind).values
        numbers.update({
            f"gamma_mean_{kind}": rounded(curve),
            f"gamma_half_rise_layer_{kind}": rounded(half_rise_layer(curve, layers)),
            f"gamma_steepest_block_{kind}": int(layers[1:][np.diff(curve).argmax()]),
        })
    if "final_centroid_accuracy" in result:
        view = str(result["view"].values[0])
        numbers["basin_view"] = view
        for name, key in (("final_centroid_accuracy", "basin_accuracy"), ("layer_centroid_accuracy", "layer_centroid_accuracy"),
                          ("within_class_angle", "within_class_angle_deg"), ("between_class_angle", "between_class_angle_deg")):
            numbers[key] = rounded(result[name].sel(view=view).values.astype(float))
    for name in ("model_accuracy", "accuracy_head", "accuracy_note"):
        if name in result.attrs:
            numbers[name] = rounded(result.attrs[name])
    return numbers
