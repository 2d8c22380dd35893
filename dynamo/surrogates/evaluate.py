"""How well any surrogate reproduces its teacher: R² per layer and token kind (`dynamo.metrics`), accuracy."""

from __future__ import annotations

import itertools

import numpy as np
import torch
import xarray as xr
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score

from dynamo.heads import LinearHead, scored
from dynamo.layout import token_groups
from dynamo.metrics import fold_sums, r2_from_sums, r2_sums
from dynamo.partition import assign_phases
from dynamo.serialize import read_hidden

__all__ = ["accuracies", "evaluate", "labels_of", "surrogate_device"]


@torch.no_grad()
def evaluate(
    model,
    ds: xr.Dataset,
    images=None,
    batch_size: int = 64,
    reference: str = "target",
    probe: bool = True,
) -> xr.Dataset:
    """Roll the surrogate out from each image's recorded layer 0 and compare with the teacher.

    Parameters
    ----------
    model : PhaseRecurrence
        A surrogate (`dynamo.surrogates.recurrence`); with a teacher attached, the accuracies use
        its head (`dynamo.stepping.BlockStepper.head`).
    ds : xarray.Dataset
        A trajectory dataset (`dynamo.open_trajectories`) of the teacher, all layers and tokens.
    images : array-like of int, optional
        Positions along ``image`` to evaluate (e.g. held-out images); default all.
    batch_size : int
    reference : {"target", "prediction"}
        R² denominator, see `dynamo.metrics`.
    probe : bool
        Also fit a linear probe on the labels (5-fold cross-validated logistic regression on the
        paper's head input, [cls ‖ patch mean] of the last layer after the teacher's final
        norm), for the teacher's states and for the surrogate's, when the dataset has labels.

    Returns
    -------
    xarray.Dataset
        ``r2`` (layer, token_kind): R² at each layer 0..L, for all tokens ("all") and each kind;
        ``r2_stacked`` (token_kind): over all layers stacked; coordinate ``phase`` (layer). Attrs:
        ``model``, ``r2_final`` (all tokens, layer L), ``r2_reference``, ``n_images``, ``k``; with a
        head, `accuracies`' (else ``accuracy_note``); with labels and ``probe``,
        ``probe_accuracy_teacher``, ``probe_accuracy_surrogate``, ``probe_accuracy_head``.
    """
    positions = np.arange(ds.sizes["image"]) if images is None else np.asarray(images)
    groups = token_groups(ds["token_kind"], pooled=True)
    hidden = ds["hidden"]
    if hidden.sizes["layer"] != model.num_layers + 1:
        raise ValueError(f"the dataset has {hidden.sizes['layer']} layers, the model runs {model.num_layers + 1}")
    device = surrogate_device(model)
    sums = {kind: None for kind in groups}
    labels = labels_of(ds, positions)
    probing = probe and labels is not None and model.teacher is not None
    features = LinearHead(model.teacher.module).features if probing else None
    teacher_predictions, surrogate_predictions, teacher_features, surrogate_features = [], [], [], []
    for begin in range(0, len(positions), batch_size):
        rows = positions[begin : begin + batch_size]
        target = read_hidden(hidden, rows, device)
        states = torch.stack(model.run(target[:, 0], 0), dim=1)
        for kind, index in groups.items():
            batch = r2_sums(states[:, :, index], target[:, :, index], reference, dims=(0, 2, 3))
            sums[kind] = fold_sums(sums[kind], batch)
        if model.head is not None:
            teacher_predictions.append(model.predict(target[:, -1]).cpu())
            surrogate_predictions.append(model.predict(states[:, -1]).cpu())
        if probing:
            teacher_features.append(features(target[:, -1]).cpu())
            surrogate_features.append(features(states[:, -1]).cpu())
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
    if model.teacher is not None and model.head is None:
        result.attrs.update(model.teacher.head_attrs())  # the note: a headless teacher without a linear head
    elif model.teacher is not None:
        teacher, surrogate = torch.cat(teacher_predictions).numpy(), torch.cat(surrogate_predictions).numpy()
        result.attrs.update(accuracies(model.teacher, ds, positions, labels, teacher, surrogate))
    if probing:
        result.attrs["probe_accuracy_teacher"] = _probe(torch.cat(teacher_features).numpy(), labels)
        result.attrs["probe_accuracy_surrogate"] = _probe(torch.cat(surrogate_features).numpy(), labels)
        result.attrs["probe_accuracy_head"] = ("probe: 5-fold cross-validated logistic regression on [cls ‖ patch "
                                               "mean] after the teacher's final norm, of the teacher's / surrogate's states")
    return assign_phases(result, model.partition)


def surrogate_device(model) -> torch.device:
    """Where a surrogate's states go: its tensors' (parameters or buffers), else its teacher's (a
    surrogate without tensors of its own, e.g. `dynamo.surrogates.IdentitySurrogate`)."""
    teacher = model.teacher.module.parameters() if model.teacher is not None else ()
    return next(itertools.chain(model.parameters(), model.buffers(), teacher), torch.empty(0)).device


def labels_of(ds: xr.Dataset, positions: np.ndarray) -> np.ndarray | None:
    """The labels of the images at ``positions``, or None when the dataset has none (or any is unknown, -1)."""
    if "label" not in ds.coords:
        return None
    labels = np.asarray(ds["label"].values)[positions]
    return None if (labels < 0).any() else labels


def accuracies(teacher, ds: xr.Dataset, positions: np.ndarray, labels, predicted: np.ndarray, surrogate: np.ndarray) -> dict:
    """Accuracies of teacher and surrogate predictions, leaving out a fitted probe's training images.

    Parameters
    ----------
    teacher : BlockStepper
        Whose head made the predictions (its `head_attrs` are recorded).
    positions : numpy.ndarray
        Positions along ``image`` of the predictions.
    labels : numpy.ndarray or None
        Against the teacher's predictions when None.
    predicted, surrogate : numpy.ndarray
        (N,) classes of the teacher and of the surrogate; ``surrogate`` may be (S, N) for S variants.

    Returns
    -------
    dict
        ``agreement``, ``accuracy_against``, ``accuracy_images``, ``accuracy_teacher``,
        ``accuracy_surrogate``, ``accuracy_ratio`` (arrays over S for (S, N)), or ``accuracy_note``.
    """
    keep = scored(teacher.linear_head, np.asarray(ds["image"].values)[positions])
    plain = float if np.ndim(surrogate) == 1 else np.asarray
    attrs = {**teacher.head_attrs(), "agreement": plain((surrogate == predicted).mean(-1))}
    if not keep.any():
        return {**attrs, "accuracy_note": "no accuracy: every evaluated image was used to fit the probe"}
    truth = predicted[keep] if labels is None else labels[keep]
    accuracy_teacher = float((predicted[keep] == truth).mean())
    accuracy_surrogate = plain((surrogate[..., keep] == truth).mean(-1))
    return {
        **attrs,
        "accuracy_against": "teacher predictions" if labels is None else "labels",
        "accuracy_images": int(keep.sum()),
        "accuracy_teacher": accuracy_teacher,
        "accuracy_surrogate": accuracy_surrogate,
        "accuracy_ratio": plain(np.divide(accuracy_surrogate, accuracy_teacher) if accuracy_teacher else accuracy_surrogate * np.nan),
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
