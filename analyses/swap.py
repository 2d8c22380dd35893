"""The causal layer-swap test (the paper's Fig. 15): layer i (or a run of ``width`` layers from i) produced by
block j instead, scored by accuracy, agreement with the clean run's top-1 and last-layer R², per token kind.
The clean run starts from the same stored states, so the diagonal (j = i) has R² = 1 and agreement = 1."""

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


def compute(ds: xr.Dataset, model, width: int = 1, partition: Partition | Sequence[Sequence[int]] | None = None,
            images: int | Sequence[int] | None = None, reference: str = "target", batch_size: int = 64, progress: bool = True,
            head: LinearHead | None = None, max_distance: int | None = None) -> xr.Dataset:
    """Accuracy, agreement and last-layer R² when layers i..i+width-1 are produced by block j.

    Parameters
    ----------
    ds : xarray.Dataset
        Trajectory store with every token; swaps start from its ``hidden`` at layer i - 1.
    model : LoadedModel, timm ViT or BlockStepper
        The ViT the store was recorded with (`dynamo.stepping.propagator_for`).
    width : int
        Number of consecutive layers replaced by the same block (the paper used 1, 2, 3).
    partition : Partition or list of list of int, optional
        Phases covering blocks 1..L that classify each swap; default `analyses.phases.find_phases`.
    images : int, sequence of int, or None
        See `analyses.perturbation.select_images`; their last layers for one swap are held in memory.
    reference : {"target", "prediction"}
        R² denominator: the clean run's variance, or the swapped run's (the paper's order).
    head : LinearHead, optional
        The head for accuracy and agreement instead of the model's own; without any they are left out.
    max_distance : int, optional
        Run only the swaps with |i - j| <= max_distance (the others NaN, relation "skipped").

    Returns
    -------
    xarray.Dataset
        Dims ``target`` (first replaced layer i) and ``block`` (block j, with the ``phase`` coordinate):
        ``accuracy`` (if labelled), ``agreement`` (with a head), ``r2`` (target, block, token_kind; ``all``
        pools every token), coordinate ``relation`` in {"clean", "within", "across"}; attrs
        ``clean_accuracy`` and the head's (``accuracy_images`` leaves out a probe's training images), or
        ``accuracy_note`` when there is no head or no label.
    """
    propagator = propagator_for(model, ds, head)
    if not isinstance(propagator, BlockStepper):
        raise ValueError(f"a layer swap needs a model whose blocks can be reordered (a LoadedModel, timm ViT or "
                         f"BlockStepper), not a {type(propagator).__name__}")
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
        {"r2": (("target", "block", "token_kind"), r2,
                {"long_name": f"R² of the last layer against the clean run (reference: {reference})"})},
        coords={"target": targets, "block": sources, "token_kind": list(groups), "relation": (("target", "block"), relation)},
    )
    if has_head:
        result["agreement"] = (("target", "block"), agreement, {"long_name": "fraction of images with the clean top-1 class"})
    if has_labels:
        result["accuracy"] = (("target", "block"), accuracy, {"long_name": "top-1 accuracy"})
    result.attrs = {"analysis": "layer_swap", "model": ds.attrs.get("model", ""), "width": width, "n_images": n,
                    "reference": reference, **({} if max_distance is None else {"max_distance": int(max_distance)}),
                    **_head_attrs(propagator, has_labels, int(keep.sum()))}
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
    """Across-minus-within drop of ``score`` (accuracy or agreement) in a width-1 result, at matched distance.

    The mean over distances |i - j| with swaps of both kinds of (mean within − mean across): far swaps are more
    often across phases, so an unmatched mean would reward any partition. ``partition`` reclassifies the swaps
    (default the result's own). NaN when no distance has both kinds.
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
    """Headline numbers: ``width``, ``partition``, ``clean_accuracy``, ``accuracy_head`` or ``accuracy_note``, and
    the mean ``accuracy``, ``agreement``, ``r2`` (all tokens) and ``n_swaps`` of within- and across-phase swaps."""
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


