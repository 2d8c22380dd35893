"""The causal layer-swap test: run a block in another block's place and see what breaks.

The paper's causal test of its phases (methods spec section 3, camera-ready Fig. 15): replace
one, two or three layers of the ViT by another layer; replacement within a phase keeps
accuracy, replacement across phases collapses it. Here layer i (the output of block i) is
produced by block j instead, for every pair (i, j), or a run of ``width`` consecutive layers
i..i+width-1 is produced by block j, each run continuing through the model's own remaining
blocks. Each swap is scored by top-1 accuracy (where the store has labels), agreement with the
clean run's top-1 class, and R² of the last layer against the clean run's last layer, per
token kind (R² as `dynamo.metrics.r2_score`: one global mean, the clean run's variance in the
denominator by default).

The clean run is the live model's own, from the same stored states, so R² = 1 and agreement =
1 on the diagonal (j = i). A swap enters at the store's layer i - 1, which no swap changes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import xarray as xr

from analyses.perturbation import last_layer, parameter_of, select_images, states_at
from analyses.phases import find_phases
from analyses.streaming import rounded
from dynamo.heads import NO_LABELS, LinearHead, scored, store_labels
from dynamo.layout import token_groups
from dynamo.metrics import r2_score
from dynamo.partition import Partition, assign_phases, from_result
from dynamo.progress import progress_bar
from dynamo.stepping import BlockStepper, propagator_for

__all__ = ["DESCRIPTION", "compute", "matched_drop", "phase_relation", "summarize"]

DESCRIPTION = (
    "Causal layer swap: accuracy, agreement with the clean run and last-layer R² when block j runs in "
    "layer i's place, for swaps within and across phases."
)


def compute(
    ds: xr.Dataset,
    model,
    width: int = 1,
    partition: Partition | Sequence[Sequence[int]] | None = None,
    images: int | Sequence[int] | None = None,
    reference: str = "target",
    batch_size: int = 64,
    progress: bool = True,
    head: LinearHead | None = None,
    max_distance: int | None = None,
) -> xr.Dataset:
    """Accuracy, agreement and last-layer R² when layers i..i+width-1 are produced by block j.

    Parameters
    ----------
    ds : xarray.Dataset
        Trajectory store with every token; swaps start from its ``hidden`` at layer i - 1.
    model : LoadedModel, timm ViT or BlockStepper
        The ViT the store was recorded with (see `dynamo.stepping.propagator_for`); it must run
        a chosen block at a chosen layer (``run(..., block_for=...)``).
    width : int
        Number of consecutive layers replaced by the same block (the paper used 1, 2, 3).
    partition : Partition or list of list of int, optional
        Phases (1-based block indices, covering 1..L) that classify each swap as within or
        across phases; default `analyses.phases.find_phases` on the store.
    images : int, sequence of int, or None
        See `analyses.perturbation.select_images`. The last layers of these images for one
        swap are held in memory at once (for R²).
    reference : {"target", "prediction"}
        R² denominator: the clean run's variance, or the swapped run's (the paper's order).
    batch_size : int
    progress : bool
    head : LinearHead, optional
        The head accuracy and agreement use instead of the model's own (`dynamo.heads`); a model
        without a classifier needs one, or they are left out (with ``accuracy_note``).
    max_distance : int, optional
        Run only the swaps with |i - j| <= max_distance (the others are NaN, relation "skipped");
        default every pair.

    Returns
    -------
    xarray.Dataset
        Dims ``target`` (first replaced layer i, 1..L-width+1) and ``block`` (block j run in
        its place, 1..L, with the partition as its ``phase`` coordinate): ``accuracy`` (if
        labelled), ``agreement`` (with a head), ``r2`` (target, block, token_kind; ``all``
        pools every token), with ``relation`` (target, block) in {"clean", "within", "across"}
        as a coordinate. Attributes: ``clean_accuracy``, ``accuracy_head`` (``model`` or
        ``probe``), ``head_source``, ``accuracy_images`` (a fitted probe's training images are
        not scored), or ``accuracy_note`` when there is no head or no label.
    """
    propagator = propagator_for(model, ds, head)
    if not isinstance(propagator, BlockStepper):
        raise ValueError(
            f"a layer swap needs a model whose blocks can be reordered (a LoadedModel, timm ViT or BlockStepper), "
            f"not a {type(propagator).__name__}"
        )
    ds = select_images(ds, images)
    L = last_layer(ds)
    if not 1 <= width <= L:
        raise ValueError(f"width must be in 1..{L}, got {width}")
    partition = Partition(find_phases(ds) if partition is None else partition)
    if partition.blocks.tolist() != list(range(1, L + 1)):
        raise ValueError(f"the partition must cover blocks 1..{L} once each, got {partition}")
    targets, sources = np.arange(1, L - width + 2), np.arange(1, L + 1)
    groups = token_groups(ds["token_kind"], pooled=True)
    has_head = propagator.head is not None
    labels = store_labels(ds) if has_head else None
    keep = scored(propagator.linear_head, ds["image"].values)
    has_labels = labels is not None and keep.any()
    like = parameter_of(propagator)
    n = ds.sizes["image"]
    batches = [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]

    with torch.no_grad():
        clean = torch.cat([propagator.run(states_at(ds, 0, b, like), 0, L)[-1] for b in batches]).cpu()
        clean_top1 = propagator.predict(clean.to(like)).cpu().numpy() if has_head else None
        accuracy = np.full((targets.size, sources.size), np.nan)
        agreement = np.full_like(accuracy, np.nan)
        r2 = np.full((targets.size, sources.size, len(groups)), np.nan)
        bar = progress_bar(total=targets.size * sources.size, desc="layer swap", enabled=progress)
        for ti, target in enumerate(targets):
            entries = [states_at(ds, int(target) - 1, b, like) for b in batches]
            replaced = range(int(target), int(target) + width)
            for si, source in enumerate(sources):
                if max_distance is not None and abs(int(source) - int(target)) > max_distance:
                    bar.update()
                    continue
                block_for = [int(source) if layer in replaced else layer for layer in range(1, L + 1)]
                final = torch.cat([propagator.run(x, int(target) - 1, L, block_for=block_for)[-1] for x in entries])
                if has_head:
                    top1 = propagator.predict(final).cpu().numpy()
                    agreement[ti, si] = (top1 == clean_top1).mean()
                if has_labels:
                    accuracy[ti, si] = (top1[keep] == labels[keep]).mean()
                final = final.cpu()
                for gi, index in enumerate(groups.values()):
                    r2[ti, si, gi] = r2_score(final[:, index], clean[:, index], reference=reference)
                bar.update()
        bar.close()

    relation = np.array([[phase_relation(partition, range(t, t + width), s)
                          if max_distance is None or abs(int(s) - int(t)) <= max_distance else "skipped"
                          for s in sources] for t in targets])
    result = xr.Dataset(
        {
            "r2": (
                ("target", "block", "token_kind"),
                r2,
                {"long_name": f"R² of the last layer against the clean run (reference: {reference})"},
            ),
        },
        coords={"target": targets, "block": sources, "token_kind": list(groups), "relation": (("target", "block"), relation)},
    )
    if has_head:
        result["agreement"] = (("target", "block"), agreement, {"long_name": "fraction of images with the clean top-1 class"})
    if has_labels:
        result["accuracy"] = (("target", "block"), accuracy, {"long_name": "top-1 accuracy"})
    result.attrs = {
        "analysis": "layer_swap",
        "model": ds.attrs.get("model", ""),
        "width": width,
        "n_images": n,
        "reference": reference,
        **({} if max_distance is None else {"max_distance": int(max_distance)}),
        **_head_attrs(propagator, has_labels, int(keep.sum())),
    }
    if has_labels:
        result.attrs["clean_accuracy"] = float((clean_top1[keep] == labels[keep]).mean())
    return assign_phases(result, partition)


def _head_attrs(propagator: BlockStepper, has_labels: bool, n_scored: int) -> dict:
    """Which head the accuracies used and on how many images, or the note why there are none."""
    attrs = propagator.head_attrs()
    if "accuracy_note" in attrs or not has_labels:
        return {"accuracy_note": attrs.get("accuracy_note", NO_LABELS)}
    return {**attrs, "accuracy_images": n_scored}


def phase_relation(partition: Partition | Sequence[Sequence[int]], replaced: Sequence[int], source: int) -> str:
    """``"clean"`` if block ``source`` replaces only itself, ``"within"`` if it and every replaced
    layer share a phase, else ``"across"``."""
    replaced = list(replaced)
    if replaced == [source]:
        return "clean"
    phases = Partition(partition).phase_of([*replaced, source])
    return "within" if (phases == phases[-1]).all() else "across"


def matched_drop(result: xr.Dataset, partition: Partition | Sequence[Sequence[int]] | None = None, score: str = "accuracy") -> float:
    """Across-minus-within drop of a score at matched distance: the mean over |i - j| of (mean within − mean across).

    The score drops by clean − score, so this is mean across-phase drop − mean within-phase drop, each
    taken at one distance |i - j| and averaged over the distances that have swaps of both kinds (far
    swaps are more often across phases, so an unmatched mean would reward any partition).

    Parameters
    ----------
    result : xarray.Dataset
        A width-1 `compute` result.
    partition : Partition or list of list of int, optional
        Phases classifying the swaps (default the result's own); the swaps are not re-run.
    score : str
        ``"accuracy"`` or ``"agreement"``.

    Returns
    -------
    float
        NaN when no distance has both within- and across-phase swaps.
    """
    if int(result.attrs.get("width", 1)) != 1:
        raise ValueError("matched_drop compares single-layer swaps (width 1)")
    partition = Partition(from_result(result) if partition is None else partition)
    values = np.asarray(result[score].values, dtype=float)
    targets, sources = result["target"].values, result["block"].values
    distance = np.abs(targets[:, None] - sources[None, :])
    same = partition.phase_of(targets)[:, None] == partition.phase_of(sources)[None, :]
    differences = []
    for d in np.unique(distance[(distance > 0) & np.isfinite(values)]):
        at = (distance == d) & np.isfinite(values)
        if (at & same).any() and (at & ~same).any():
            differences.append(values[at & same].mean() - values[at & ~same].mean())
    return float(np.mean(differences)) if differences else float("nan")


def summarize(result: xr.Dataset) -> dict:
    """Headline numbers: ``width``, ``partition``, ``clean_accuracy`` and the ``accuracy_head`` it
    used (or the ``accuracy_note`` why there is none), and the mean ``accuracy`` (if labelled),
    ``agreement`` (with a head) and ``r2`` (all tokens) and ``n_swaps`` of ``within`` and
    ``across`` phase swaps (keys ``within_accuracy``, ..., ``across_n_swaps``)."""
    summary = {"width": int(result.attrs["width"]), "partition": str(from_result(result))}
    for name in ("clean_accuracy", "accuracy_head", "accuracy_note"):
        if name in result.attrs:
            summary[name] = rounded(result.attrs[name])
    for relation in ("within", "across"):
        mask = result["relation"] == relation
        for name in ("accuracy", "agreement"):
            if name in result:
                summary[f"{relation}_{name}"] = rounded(float(result[name].where(mask).mean()))
        summary[f"{relation}_r2"] = rounded(float(result["r2"].sel(token_kind="all").where(mask).mean()))
        summary[f"{relation}_n_swaps"] = int(mask.sum())
    return summary


