"""How well a Raptor surrogate reproduces its teacher: R² per layer and token group, accuracy.

R² convention. The paper's code uses ``overcomplete.metrics.r2_score(x, x_hat) = 1 -
mean((x - x_hat)^2) / mean((x - mean(x))^2)`` with one scalar global mean, called as
``r2_score(raptor, teacher)``: the denominator is the variance of the *surrogate's* states. dynamo
keeps the scalar global mean over tokens and features but by default puts the *teacher's*
variance in the denominator (``reference="target"``: the fraction of the teacher's variance
explained, which a surrogate cannot raise by being noisier); ``reference="prediction"`` gives the
paper's order. Sums are accumulated over all evaluated images, so the value is exact over the set
(the paper averages per-batch values weighted by batch size).
"""

from __future__ import annotations

import numpy as np
import torch
import xarray as xr
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score

from dynamo.raptor.model import Raptor

__all__ = ["R2_REFERENCES", "evaluate", "r2_score", "token_groups"]

R2_REFERENCES = ("target", "prediction")


def r2_score(prediction, target, reference: str = "target") -> float:
    """R² of a prediction of ``target``, with one scalar mean over all entries.

    Parameters
    ----------
    prediction, target : array-like or torch.Tensor
        Same shape, e.g. (B, T, D) states.
    reference : {"target", "prediction"}
        Whose variance is the denominator; "prediction" is the paper's argument order.

    Returns
    -------
    float
        ``1 - mean((prediction - target)^2) / var(reference)``.
    """
    sums = _r2_sums(torch.as_tensor(prediction), torch.as_tensor(target), reference, dims=None)
    return float(_r2_from_sums(*sums))


def _r2_sums(prediction: torch.Tensor, target: torch.Tensor, reference: str, dims) -> tuple:
    """Squared error, sum and sum of squares of the reference, and counts, reduced over ``dims``."""
    if reference not in R2_REFERENCES:
        raise ValueError(f"reference must be one of {R2_REFERENCES}, got {reference!r}")
    prediction, target = prediction.double(), target.double()
    ref = target if reference == "target" else prediction
    dims = tuple(range(prediction.ndim)) if dims is None else dims
    count = torch.tensor(float(np.prod([prediction.shape[d] for d in dims])), device=prediction.device)
    return (
        ((prediction - target) ** 2).sum(dims),
        ref.sum(dims),
        (ref**2).sum(dims),
        count,
    )


def _r2_from_sums(squared_error, total, total_squares, count):
    variance = total_squares / count - (total / count) ** 2
    return 1 - (squared_error / count) / variance


def token_groups(token_kind) -> dict[str, np.ndarray]:
    """Token positions of each group: ``all``, ``cls`` (cls and distillation tokens), ``register``, ``patch``.

    Groups with no tokens in the layout are left out.
    """
    kinds = np.array([str(kind) for kind in np.asarray(token_kind)])
    groups = {
        "all": np.arange(kinds.size),
        "cls": np.flatnonzero(np.isin(kinds, ["cls", "dist"])),
        "register": np.flatnonzero(kinds == "register"),
        "patch": np.flatnonzero(kinds == "patch"),
    }
    return {name: index for name, index in groups.items() if index.size}


@torch.no_grad()
def evaluate(
    model: Raptor,
    dataset: xr.Dataset,
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
    dataset : xarray.Dataset
        A trajectory dataset (`dynamo.open_trajectories`) of the teacher, all layers and tokens.
    images : array-like of int, optional
        Positions along ``image`` to evaluate (e.g. held-out images); default all.
    batch_size : int
    reference : {"target", "prediction"}
        R² denominator, see the module docstring.
    probe : bool
        Also fit a linear probe on the labels (5-fold cross-validated logistic regression on the
        teacher's pre-logit features of the last layer), for the teacher's states and for the
        surrogate's, when the dataset has labels.

    Returns
    -------
    xarray.Dataset
        ``r2`` (layer, group): R² at each layer 0..L of the rollout, for all tokens and each
        token group; ``r2_stacked`` (group): over all layers stacked (the paper's bar chart).
        Attributes: ``r2_final`` (all tokens, layer L), ``r2_reference``, and with a teacher
        ``accuracy_teacher``, ``accuracy_surrogate``, ``accuracy_ratio`` (surrogate over teacher,
        both against the labels; without labels, against the teacher's predictions), ``agreement``
        (fraction of images where the surrogate's prediction equals the teacher's) and, with
        labels and ``probe``, ``probe_accuracy_teacher`` / ``probe_accuracy_surrogate``.
    """
    positions = np.arange(dataset.sizes["image"]) if images is None else np.asarray(images)
    groups = token_groups(dataset["token_kind"].values)
    hidden = dataset["hidden"]
    if hidden.sizes["layer"] != model.num_layers + 1:
        raise ValueError(f"the dataset has {hidden.sizes['layer']} layers, the model runs {model.num_layers + 1}")
    sums = {name: None for name in groups}
    teacher_logits, surrogate_logits, teacher_features, surrogate_features = [], [], [], []
    for begin in range(0, len(positions), batch_size):
        rows = positions[begin : begin + batch_size]
        device = next(model.parameters()).device
        target = torch.from_numpy(np.asarray(hidden.isel(image=rows).values, dtype=np.float32)).to(device)
        states = torch.stack(model.run(target[:, 0], 0), dim=1)
        for name, index in groups.items():
            batch = _r2_sums(states[:, :, index], target[:, :, index], reference, dims=(0, 2, 3))
            sums[name] = batch if sums[name] is None else tuple(a + b for a, b in zip(sums[name], batch))
        if model.teacher is not None:
            teacher_logits.append(model.head(target[:, -1]).cpu())
            surrogate_logits.append(model.head(states[:, -1]).cpu())
            teacher_features.append(_pre_logits(model, target[:, -1]).cpu())
            surrogate_features.append(_pre_logits(model, states[:, -1]).cpu())
    layers = np.arange(model.num_layers + 1)
    sums = {name: tuple(value.cpu() for value in sums[name]) for name in groups}
    r2 = np.stack([_r2_from_sums(*sums[name]).numpy() for name in groups], axis=1)
    stacked = [float(_r2_from_sums(*(s.sum() for s in sums[name][:3]), sums[name][3] * len(layers))) for name in groups]
    result = xr.Dataset(
        {
            "r2": (("layer", "group"), r2),
            "r2_stacked": (("group",), np.array(stacked)),
        },
        coords={"layer": layers, "group": list(groups)},
        attrs={
            "r2_final": float(r2[-1, 0]),
            "r2_reference": reference,
            "n_images": int(len(positions)),
            "k": model.k,
            "thresholds": list(model.thresholds),
            "description": "R² of the Raptor rollout from recorded layer 0 against the teacher's layers; "
            f"denominator: variance of the {reference} with one scalar mean",
        },
    )
    if model.teacher is not None:
        result.attrs.update(_accuracies(dataset, positions, teacher_logits, surrogate_logits))
        labels = _labels(dataset, positions)
        if probe and labels is not None:
            result.attrs["probe_accuracy_teacher"] = _probe(torch.cat(teacher_features).numpy(), labels)
            result.attrs["probe_accuracy_surrogate"] = _probe(torch.cat(surrogate_features).numpy(), labels)
    return result


def _pre_logits(model: Raptor, x: torch.Tensor) -> torch.Tensor:
    """The teacher's pooled, normed features of a last-layer state (its head's input)."""
    module = model.teacher.module
    return module.forward_head(module.norm(x), pre_logits=True)


def _labels(dataset: xr.Dataset, positions: np.ndarray) -> np.ndarray | None:
    if "label" not in dataset.coords:
        return None
    labels = np.asarray(dataset["label"].values)[positions]
    return None if (labels < 0).any() else labels


def _accuracies(dataset, positions, teacher_logits, surrogate_logits) -> dict:
    teacher = torch.cat(teacher_logits).argmax(-1).numpy()
    surrogate = torch.cat(surrogate_logits).argmax(-1).numpy()
    labels = _labels(dataset, positions)
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
