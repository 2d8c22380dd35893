"""How well a Raptor surrogate reproduces its teacher: R² per layer and token kind, accuracy.

R² is `dynamo.metrics.r2_score` (its docstring states the convention), accumulated over all
evaluated images so that the value is exact over the set.
"""

from __future__ import annotations

import numpy as np
import torch
import xarray as xr
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score

from dynamo.layout import token_groups
from dynamo.metrics import r2_from_sums, r2_sums
from dynamo.partition import Partition, assign_phases
from dynamo.raptor.model import Raptor

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(
    model: Raptor,
    ds: xr.Dataset,
    images=None,
    batch_size: int = 64,
    reference: str = "target",
    probe: bool = True,
) -> xr.Dataset:
    """Roll the surrogate out from each image's recorded layer 0 and compare with the teacher.

    Parameters
    ----------
    model : Raptor
        With a teacher attached for the accuracy measures (without one they are left out).
    ds : xarray.Dataset
        A trajectory dataset (`dynamo.open_trajectories`) of the teacher, all layers and tokens.
    images : array-like of int, optional
        Positions along ``image`` to evaluate (e.g. held-out images); default all.
    batch_size : int
    reference : {"target", "prediction"}
        R² denominator, see `dynamo.metrics`.
    probe : bool
        Also fit a linear probe on the labels (5-fold cross-validated logistic regression on the
        teacher's pre-logit features of the last layer), for the teacher's states and for the
        surrogate's, when the dataset has labels.

    Returns
    -------
    xarray.Dataset
        ``r2`` (layer, token_kind): R² at each layer 0..L of the rollout, for all tokens
        (``token_kind`` "all") and each token kind present; ``r2_stacked`` (token_kind): over all
        layers stacked (the paper's bar chart). Coordinate ``phase`` (layer): the model's
        partition. Attributes: ``model`` (the teacher's name), ``r2_final`` (all tokens, layer
        L), ``r2_reference``, ``n_images``, ``k``, and with a teacher ``accuracy_teacher``,
        ``accuracy_surrogate``, ``accuracy_ratio`` (surrogate over teacher, both against the
        labels; without labels, against the teacher's predictions), ``agreement`` (fraction of
        images where the surrogate's prediction equals the teacher's) and, with labels and
        ``probe``, ``probe_accuracy_teacher`` / ``probe_accuracy_surrogate``.
    """
    positions = np.arange(ds.sizes["image"]) if images is None else np.asarray(images)
    groups = token_groups(ds["token_kind"], pooled=True)
    hidden = ds["hidden"]
    if hidden.sizes["layer"] != model.num_layers + 1:
        raise ValueError(f"the dataset has {hidden.sizes['layer']} layers, the model runs {model.num_layers + 1}")
    device = next(model.parameters()).device
    sums = {kind: None for kind in groups}
    teacher_logits, surrogate_logits, teacher_features, surrogate_features = [], [], [], []
    for begin in range(0, len(positions), batch_size):
        rows = positions[begin : begin + batch_size]
        target = torch.from_numpy(np.asarray(hidden.isel(image=rows).values, dtype=np.float32)).to(device)
        states = torch.stack(model.run(target[:, 0], 0), dim=1)
        for kind, index in groups.items():
            batch = r2_sums(states[:, :, index], target[:, :, index], reference, dims=(0, 2, 3))
            sums[kind] = batch if sums[kind] is None else tuple(a + b for a, b in zip(sums[kind], batch))
        if model.teacher is not None:
            teacher_logits.append(model.head(target[:, -1]).cpu())
            surrogate_logits.append(model.head(states[:, -1]).cpu())
            teacher_features.append(_pre_logits(model, target[:, -1]).cpu())
            surrogate_features.append(_pre_logits(model, states[:, -1]).cpu())
    layers = np.arange(model.num_layers + 1)
    sums = {kind: tuple(value.cpu() for value in sums[kind]) for kind in groups}
    r2 = np.stack([r2_from_sums(*sums[kind]).numpy() for kind in groups], axis=1)
    stacked = [float(r2_from_sums(*(s.sum() for s in sums[kind][:3]), sums[kind][3] * len(layers))) for kind in groups]
    result = xr.Dataset(
        {
            "r2": (("layer", "token_kind"), r2),
            "r2_stacked": (("token_kind",), np.array(stacked)),
        },
        coords={"layer": layers, "token_kind": list(groups)},
        attrs={
            "model": ds.attrs.get("model"),
            "r2_final": float(r2[-1, 0]),
            "r2_reference": reference,
            "n_images": int(len(positions)),
            "k": model.k,
            "description": "R² of the Raptor rollout from recorded layer 0 against the teacher's layers; "
            f"denominator: variance of the {reference} with one scalar mean",
        },
    )
    if model.teacher is not None:
        result.attrs.update(_accuracies(ds, positions, teacher_logits, surrogate_logits))
        labels = _labels(ds, positions)
        if probe and labels is not None:
            result.attrs["probe_accuracy_teacher"] = _probe(torch.cat(teacher_features).numpy(), labels)
            result.attrs["probe_accuracy_surrogate"] = _probe(torch.cat(surrogate_features).numpy(), labels)
    return assign_phases(result, Partition.from_thresholds(model.thresholds, model.num_layers))


def _pre_logits(model: Raptor, x: torch.Tensor) -> torch.Tensor:
    """The teacher's pooled, normed features of a last-layer state (its head's input)."""
    module = model.teacher.module
    return module.forward_head(module.norm(x), pre_logits=True)


def _labels(ds: xr.Dataset, positions: np.ndarray) -> np.ndarray | None:
    if "label" not in ds.coords:
        return None
    labels = np.asarray(ds["label"].values)[positions]
    return None if (labels < 0).any() else labels


def _accuracies(ds, positions, teacher_logits, surrogate_logits) -> dict:
    teacher = torch.cat(teacher_logits).argmax(-1).numpy()
    surrogate = torch.cat(surrogate_logits).argmax(-1).numpy()
    labels = _labels(ds, positions)
    truth = teacher if labels is None else labels
    accuracy_teacher = float((teacher == truth).mean())
    accuracy_surrogate = float((surrogate == truth).mean())
    return {
        "accuracy_against": "teacher predictions" if labels is None else "labels",
        "accuracy_teacher": accuracy_teacher,
        "accuracy_surrogate": accuracy_surrogate,
        "accuracy_ratio": accuracy_surrogate / accuracy_teacher if accuracy_teacher else float("nan"),
        "agreement": float((surrogate == teacher).mean()),
    }


def _probe(features: np.ndarray, labels: np.ndarray) -> float:
    """5-fold (fewer if a class is rarer) cross-validated accuracy of a logistic-regression probe."""
    classes, counts = np.unique(labels, return_counts=True)
    folds = min(5, int(counts.min()))
    if classes.size < 2 or folds < 2:
        return float("nan")
    probe = LogisticRegression(max_iter=2000)
    cv = StratifiedKFold(folds, shuffle=True, random_state=0)
    return float(cross_val_score(probe, features, labels, cv=cv).mean())
