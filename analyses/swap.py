"""The causal layer-swap test: run a block in another block's place and see what breaks.

The paper's causal test of its phases (methods spec section 3, camera-ready Fig. 15): replace
one, two or three layers of the ViT by another layer; replacement within a phase keeps
accuracy, replacement across phases collapses it. Here layer i (the output of block i) is
produced by block j instead, for every pair (i, j), or a run of ``width`` consecutive layers
i..i+width-1 is produced by block j, each run continuing through the model's own remaining
blocks. Each swap is scored by top-1 accuracy (where the store has labels), agreement with the
clean run's top-1 class, and R² of the last layer against the clean run's last layer, per
token group (R² as `dynamo.raptor.evaluate.r2_score`: one global mean, the clean run's
variance in the denominator by default).

The clean run is the live model's own, from the same stored states, so R² = 1 and agreement =
1 on the diagonal (j = i). A swap enters at the store's layer i - 1, which no swap changes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from analyses.perturbation import last_layer, parameter_of, propagator_for, select_images, states_at
from dynamo.raptor.evaluate import r2_score, token_groups
from dynamo.stepping import BlockStepper

__all__ = ["layer_swap", "phase_relation", "swap_summary"]


def layer_swap(
    ds: xr.Dataset,
    model,
    width: int = 1,
    partition: Sequence[Sequence[int]] | None = None,
    images: int | Sequence[int] | None = None,
    reference: str = "target",
    batch_size: int = 64,
    progress: bool = True,
) -> xr.Dataset:
    """Accuracy, agreement and last-layer R² when layers i..i+width-1 are produced by block j.

    Parameters
    ----------
    ds : xarray.Dataset
        Trajectory store with every token; swaps start from its ``hidden`` at layer i - 1.
    model : LoadedModel or BlockStepper
        The ViT the store was recorded with (see `analyses.perturbation.propagator_for`); it
        must run a chosen block at a chosen layer (``run(..., block_for=...)``).
    width : int
        Number of consecutive layers replaced by the same block (the paper used 1, 2, 3).
    partition : list of list of int, optional
        Phases (1-based block indices) that classify each swap as within or across phases;
        default `analyses.phases.find_phases` on the store.
    images : int, sequence of int, or None
        See `analyses.perturbation.select_images`. The last layers of these images for one
        swap are held in memory at once (for R²).
    reference : {"target", "prediction"}
        R² denominator: the clean run's variance, or the swapped run's (the paper's order).
    batch_size : int
    progress : bool

    Returns
    -------
    xarray.Dataset
        Dims ``target`` (first replaced layer i, 1..L-width+1) and ``source`` (block j, 1..L):
        ``accuracy`` (if labelled), ``agreement``, ``r2`` (target, source, group), with
        ``relation`` (target, source) in {"clean", "within", "across"} as a coordinate, and
        ``clean_accuracy`` in the attributes.
    """
    propagator = propagator_for(model, ds)
    if not isinstance(propagator, BlockStepper):
        raise ValueError(
            f"a layer swap needs a model whose blocks can be reordered (a LoadedModel or BlockStepper), "
            f"not a {type(propagator).__name__}"
        )
    ds = select_images(ds, images)
    L = last_layer(ds)
    if not 1 <= width <= L:
        raise ValueError(f"width must be in 1..{L}, got {width}")
    if partition is None:
        from analyses.phases import find_phases

        partition = find_phases(ds)
    partition = [sorted(int(block) for block in phase) for phase in partition]
    if sorted(b for phase in partition for b in phase) != list(range(1, L + 1)):
        raise ValueError(f"the partition must cover blocks 1..{L} once each, got {partition}")
    targets, sources = np.arange(1, L - width + 2), np.arange(1, L + 1)
    groups = token_groups(ds["token_kind"].values)
    labels = ds["label"].values if "label" in ds.coords else None
    has_labels = labels is not None and (labels >= 0).all()
    like = parameter_of(propagator)
    n = ds.sizes["image"]
    batches = [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]

    with torch.no_grad():
        clean = torch.cat([propagator.run(states_at(ds, 0, b, like), 0, L)[-1] for b in batches]).cpu()
        clean_top1 = propagator.head(clean.to(like)).argmax(-1).cpu().numpy()
        accuracy = np.full((targets.size, sources.size), np.nan)
        agreement = np.full_like(accuracy, np.nan)
        r2 = np.full((targets.size, sources.size, len(groups)), np.nan)
        bar = tqdm(total=targets.size * sources.size, desc="layer swap", disable=not progress)
        for ti, target in enumerate(targets):
            entries = [states_at(ds, int(target) - 1, b, like) for b in batches]
            replaced = range(int(target), int(target) + width)
            for si, source in enumerate(sources):
                block_for = [int(source) if layer in replaced else layer for layer in range(1, L + 1)]
                final = torch.cat([propagator.run(x, int(target) - 1, L, block_for=block_for)[-1] for x in entries])
                top1 = propagator.head(final).argmax(-1).cpu().numpy()
                agreement[ti, si] = (top1 == clean_top1).mean()
                if has_labels:
                    accuracy[ti, si] = (top1 == labels).mean()
                final = final.cpu()
                for gi, index in enumerate(groups.values()):
                    r2[ti, si, gi] = r2_score(final[:, index], clean[:, index], reference=reference)
                bar.update()
        bar.close()

    relation = np.array([[phase_relation(partition, range(t, t + width), s) for s in sources] for t in targets])
    result = xr.Dataset(
        {
            "agreement": (("target", "source"), agreement, {"long_name": "fraction of images with the clean top-1 class"}),
            "r2": (
                ("target", "source", "group"),
                r2,
                {"long_name": f"R² of the last layer against the clean run (reference: {reference})"},
            ),
        },
        coords={"target": targets, "source": sources, "group": list(groups), "relation": (("target", "source"), relation)},
    )
    if has_labels:
        result["accuracy"] = (("target", "source"), accuracy, {"long_name": "top-1 accuracy"})
    result.attrs = {
        "analysis": "layer_swap",
        "model": ds.attrs.get("model", ""),
        "width": width,
        "partition": str(partition),
        "n_images": n,
        "clean_accuracy": float((clean_top1 == labels).mean()) if has_labels else float("nan"),
        "reference": reference,
    }
    return result


def phase_relation(partition: Sequence[Sequence[int]], replaced: Sequence[int], source: int) -> str:
    """``"clean"`` if block ``source`` replaces only itself, ``"within"`` if it and every replaced
    layer share a phase, else ``"across"``."""
    replaced = list(replaced)
    if replaced == [source]:
        return "clean"
    phase_of = {block: index for index, phase in enumerate(partition) for block in phase}
    return "within" if all(phase_of[layer] == phase_of[source] for layer in replaced) else "across"


def swap_summary(result: xr.Dataset) -> dict:
    """Mean accuracy (or agreement), agreement and R² of within- and across-phase swaps.

    Returns
    -------
    dict
        ``{relation: {"accuracy", "agreement", "r2", "n_swaps"}}`` for "within" and "across",
        ``clean_accuracy``, ``width``, ``partition`` and a ``text`` line.
    """
    summary = {"width": int(result.attrs["width"]), "partition": result.attrs["partition"]}
    summary["clean_accuracy"] = result.attrs["clean_accuracy"]
    for relation in ("within", "across"):
        mask = result["relation"] == relation
        entry = {"n_swaps": int(mask.sum())}
        for name in ("accuracy", "agreement"):
            if name in result:
                entry[name] = float(result[name].where(mask).mean())
        entry["r2"] = float(result["r2"].sel(group="all").where(mask).mean())
        summary[relation] = entry
    measure = "accuracy" if "accuracy" in result else "agreement"
    summary["text"] = (
        f"layer swap ({result.attrs['model']}, width {summary['width']}, phases {summary['partition']}): "
        f"clean {measure} {summary['clean_accuracy'] if measure == 'accuracy' else 1.0:.3f}; "
        + "; ".join(
            f"{rel} {summary[rel].get(measure, float('nan')):.3f} (R² {summary[rel]['r2']:.3f}, {summary[rel]['n_swaps']} swaps)"
            for rel in ("within", "across")
        )
    )
    return summary
