"""Measures of the block-recurrent hypothesis for any fitted surrogate: its ε, and its loop count.

`epsilon`: the relative Frobenius error of the rollout from layer 0 at every layer, per image (the
paper's ε-BRH). `loop_count`: each phase's map repeated fewer or more times than the phase's length.
"""

from __future__ import annotations

import numpy as np
import torch
import xarray as xr
from scipy import stats

from dynamo.metrics import fold_sums, r2_from_sums, r2_sums
from dynamo.partition import Partition, assign_phases
from dynamo.serialize import read_hidden
from dynamo.surrogates.evaluate import accuracies, labels_of, surrogate_device

__all__ = ["epsilon", "loop_count", "loop_schedule"]

@torch.no_grad()
def epsilon(model, ds: xr.Dataset, images=None, batch_size: int = 64, n_bootstrap: int = 1000,
            confidence: float = 0.95, seed: int = 0) -> xr.Dataset:
    """ε of the ε-BRH: relative Frobenius errors of the surrogate's rollout from each image's layer 0.

    For image i and layer l (1..L), e_il = ||X^_il - X_il||_F / ||X_il||_F over the image's
    (T, D) state; the hypothesis's ε is the mean over images of max_l e_il (every block output
    counts: the intermediate layers and the last), reported with the mean over layers beside it.

    Parameters
    ----------
    model
        A surrogate with ``run(x, start, stop)`` and ``num_layers`` (`PhaseSurrogate`, `Raptor`).
    ds : xarray.Dataset
        The teacher's trajectory dataset.
    images : array-like of int, optional
        Positions along ``image`` (e.g. held-out images); default all.
    batch_size : int
    n_bootstrap : int
        Resamples of the images for the intervals (percentile bootstrap, `scipy.stats.bootstrap`);
        0 for none.
    confidence : float
    seed : int

    Returns
    -------
    xarray.Dataset
        ``relative_error`` (image, layer); ``epsilon_max``, ``epsilon_mean`` (scalars) and their
        ``*_low`` / ``*_high`` bounds; ``relative_error_mean`` (layer): mean over images.
    """
    positions = np.arange(ds.sizes["image"]) if images is None else np.asarray(images)
    device = surrogate_device(model)
    errors = []
    for begin in range(0, len(positions), batch_size):
        rows = positions[begin : begin + batch_size]
        target = read_hidden(ds["hidden"], rows, device)
        states = torch.stack(model.run(target[:, 0], 0)[1:], dim=1)
        truth = target[:, 1:].double()
        errors.append((torch.linalg.vector_norm(states.double() - truth, dim=(-2, -1))
                       / torch.linalg.vector_norm(truth, dim=(-2, -1))).cpu().numpy())
    errors = np.concatenate(errors)
    per_image = {"max": errors.max(axis=1), "mean": errors.mean(axis=1)}
    result = xr.Dataset(
        {"relative_error": (("image", "layer"), errors), "relative_error_mean": (("layer",), errors.mean(axis=0))},
        coords={"image": np.asarray(ds["image"].values)[positions], "layer": np.arange(1, errors.shape[1] + 1)},
        attrs={"model": ds.attrs.get("model"), "n_images": int(len(positions)), "n_bootstrap": int(n_bootstrap),
               "confidence": confidence,
               "description": "relative Frobenius error ||X^ - X||_F / ||X||_F of the rollout from layer 0, per "
                              "image and layer; epsilon_max: mean over images of the max over layers 1..L"},
    )
    for name, values in per_image.items():
        result[f"epsilon_{name}"] = float(values.mean())
        low, high = _interval(values, n_bootstrap, confidence, seed)
        result[f"epsilon_{name}_low"], result[f"epsilon_{name}_high"] = low, high
    return assign_phases(result, model.partition)


def _interval(values: np.ndarray, n_bootstrap: int, confidence: float, seed: int) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values``; NaNs without resamples or with one value."""
    if n_bootstrap < 1 or values.size < 2:
        return float("nan"), float("nan")
    if np.ptp(values) == 0:
        return float(values[0]), float(values[0])
    interval = stats.bootstrap((values,), np.mean, n_resamples=n_bootstrap, confidence_level=confidence,
                               method="percentile", rng=np.random.default_rng(seed)).confidence_interval
    return float(interval.low), float(interval.high)


def loop_schedule(partition: Partition, scale: float) -> list[tuple[int, float]]:
    """Steps of a surrogate run with each phase's block repeated ``max(1, round(scale * n_j))`` times.

    Returns
    -------
    list of (int, float)
        Per step, the 1-based block and the depth signal t: phase j spanning layers a..e (n_j of
        them) run m_j times gets t = a - 1 + s * n_j / m_j for s = 1..m_j, so the depth signal
        covers the phase's range evenly (t is the layer itself when m_j = n_j).
    """
    schedule = []
    for index, phase in enumerate(partition):
        length = len(phase)
        repeats = max(1, int(round(scale * length)))
        schedule += [(index + 1, phase[0] - 1 + step * length / repeats) for step in range(1, repeats + 1)]
    return schedule


@torch.no_grad()
def loop_count(model, ds: xr.Dataset, scales=(0.5, 0.75, 1.0, 1.5, 2.0), images=None, batch_size: int = 64) -> xr.Dataset:
    """The surrogate run with its phases' blocks repeated more or fewer times than the phases' lengths.

    Each phase j's block runs m_j = max(1, round(scale * n_j)) times (`loop_schedule`) from the
    recorded layer 0, and the final state is compared with the teacher's last layer: does the
    block implement an iterative map that tolerates more or fewer steps?

    Parameters
    ----------
    model
        A surrogate with ``step(x, layer, block)``, ``partition``, ``num_layers``
        and, for the accuracies, a teacher with a head (`PhaseSurrogate`, `Raptor`).
    ds : xarray.Dataset
    scales : sequence of float
    images : array-like of int, optional
        Positions along ``image``; default all.
    batch_size : int

    Returns
    -------
    xarray.Dataset
        Over ``scale``: ``steps`` (total block applications), ``repeats`` (scale, phase),
        ``r2_final`` (all tokens, teacher variance, against layer L), ``agreement`` with the
        teacher's predictions, ``accuracy_surrogate`` and ``accuracy_ratio``; attrs
        ``accuracy_teacher``, ``accuracy_against``, or ``accuracy_note`` without a head.
    """
    positions = np.arange(ds.sizes["image"]) if images is None else np.asarray(images)
    partition = model.partition
    schedules = [loop_schedule(partition, scale) for scale in scales]
    device = surrogate_device(model)
    head = getattr(model, "head", None)
    sums = [None] * len(scales)
    predictions = [[] for _ in scales]
    teacher_predictions = []
    for begin in range(0, len(positions), batch_size):
        target = read_hidden(ds["hidden"], positions[begin : begin + batch_size], device, layer=[0, -1])
        if head is not None:
            teacher_predictions.append(model.predict(target[:, 1]).cpu())
        for index, schedule in enumerate(schedules):
            x = target[:, 0]
            for block, t in schedule:
                x = model.step(x, t, block=block)
            batch = r2_sums(x, target[:, 1], "target", dims=None)
            sums[index] = fold_sums(sums[index], batch)
            if head is not None:
                predictions[index].append(model.predict(x).cpu())
    repeats = [[sum(1 for b, _ in schedule if b == j + 1) for j in range(len(partition))] for schedule in schedules]
    result = xr.Dataset(
        {
            "r2_final": (("scale",), np.array([float(r2_from_sums(*s)) for s in sums])),
            "steps": (("scale",), np.array([len(schedule) for schedule in schedules])),
            "repeats": (("scale", "phase"), np.array(repeats)),
        },
        coords={"scale": np.asarray(scales, dtype=float), "phase": np.arange(len(partition))},
        attrs={"model": ds.attrs.get("model"), "k": len(partition), "partition": str(partition),
               "n_images": int(len(positions)),
               "description": "each phase's block repeated max(1, round(scale * n_j)) times from recorded layer 0; "
                              "R² (teacher variance, all tokens) of the final state against the teacher's last layer"},
    )
    if head is None:
        return result.assign_attrs(accuracy_note="no accuracy: the surrogate's teacher has no head")
    teacher = torch.cat(teacher_predictions).numpy()
    surrogate = np.stack([torch.cat(p).numpy() for p in predictions])
    attrs = accuracies(model.teacher, ds, positions, labels_of(ds, positions), teacher, surrogate)
    for name in ("agreement", "accuracy_surrogate", "accuracy_ratio"):
        if name in attrs:
            result[name] = ("scale", attrs.pop(name))
    return result.assign_attrs({name: attrs[name] for name in ("accuracy_teacher", "accuracy_against", "accuracy_note")
                                if name in attrs})
