"""Measures of the block-recurrent hypothesis for any fitted surrogate: its ε, and its loop count."""

from __future__ import annotations

import numpy as np
import torch
import xarray as xr
from scipy import stats

from dynamo.layout import token_groups
from dynamo.metrics import fold_sums, r2_from_sums, r2_sums
from dynamo.partition import Partition, assign_phases
from dynamo.serialize import read_hidden
from dynamo.surrogates.evaluate import accuracies, labels_of, surrogate_device

__all__ = ["DEPTH_SIGNALS", "EPSILON_STATISTICS", "epsilon", "loop_count", "loop_schedule"]

EPSILON_STATISTICS = ("epsilon", "epsilon_strict", "epsilon_mean")
"""ε of the ε-BRH (max over layers of the mean over images), the stricter mean over images of the max over layers, and the mean over both."""


@torch.no_grad()
def epsilon(model, ds: xr.Dataset, images=None, batch_size: int = 64, n_bootstrap: int = 1000,
            confidence: float = 0.95, seed: int = 0) -> xr.Dataset:
    """ε of the ε-BRH from the relative errors e_il = ||X^_il - X_il||_F / ||X_il||_F of the rollout from layer 0, and its skill over the identity.

    Parameters
    ----------
    model : PhaseRecurrence
        A fitted surrogate (``run``, ``partition``).
    images : array-like of int, optional
        Positions along ``image`` to score; default all.
    n_bootstrap, confidence, seed
        Percentile-bootstrap intervals over images (images resampled jointly for every statistic); 0 gives NaNs.

    Returns
    -------
    xarray.Dataset
        ``relative_error`` and ``relative_error_identity`` (image, token_kind, layer), the identity being x_l = x_0;
        ``relative_error_mean`` (token_kind, layer); per token_kind (all tokens, then each kind's rows alone):
        ``epsilon`` = max_l E_i e_il (the ε-BRH's), ``epsilon_layer`` (its layer), ``epsilon_strict`` = E_i max_l e_il,
        ``epsilon_mean`` = E_il e_il, the same of the identity (``*_identity``), ``skill`` = 1 - epsilon /
        epsilon_identity and ``skill_strict``, each with ``*_low`` / ``*_high``.
    """
    positions = np.arange(ds.sizes["image"]) if images is None else np.asarray(images)
    groups = token_groups(ds["token_kind"], pooled=True)
    device = surrogate_device(model)
    errors, identity = [], []
    for begin in range(0, len(positions), batch_size):
        target = read_hidden(ds["hidden"], positions[begin : begin + batch_size], device).double()
        states = torch.stack(model.run(target[:, 0].float(), 0)[1:], dim=1).double()
        truth, start = target[:, 1:], target[:, :1]
        errors.append(_relative(states, truth, groups))
        identity.append(_relative(start, truth, groups))
    errors, identity = np.concatenate(errors), np.concatenate(identity)  # (image, token_kind, layer)
    values = _statistics(errors, identity)
    intervals = _intervals(errors, identity, n_bootstrap, confidence, seed)
    kinds = list(groups)
    result = xr.Dataset(
        {"relative_error": (("image", "token_kind", "layer"), errors),
         "relative_error_identity": (("image", "token_kind", "layer"), identity),
         "relative_error_mean": (("token_kind", "layer"), errors.mean(axis=0)),
         "epsilon_layer": (("token_kind",), errors.mean(axis=0).argmax(axis=-1) + 1)},
        coords={"image": np.asarray(ds["image"].values)[positions], "token_kind": kinds,
                "layer": np.arange(1, errors.shape[-1] + 1)},
        attrs={"model": ds.attrs.get("model"), "n_images": int(len(positions)), "n_bootstrap": int(n_bootstrap),
               "confidence": confidence,
               "description": "relative Frobenius error ||X^ - X||_F / ||X||_F of the rollout from layer 0 per image, "
                              "token kind (its rows alone) and layer 1..L; epsilon: max over layers of the mean over "
                              "images (the ε-BRH's bound); epsilon_strict: mean over images of the max over layers; "
                              "identity: x_l = x_0 on the same images; skill: 1 - epsilon / epsilon_identity (NaN "
                              "where the identity is exact); intervals: percentile bootstrap over images"},
    )
    for index, name in enumerate(values):
        result[name] = ("token_kind", values[name])
        result[f"{name}_low"] = ("token_kind", intervals[0][index])
        result[f"{name}_high"] = ("token_kind", intervals[1][index])
    return assign_phases(result, model.partition)


def _relative(states: torch.Tensor, truth: torch.Tensor, groups: dict) -> np.ndarray:
    """Relative Frobenius errors (B, kinds, L) of (B, L or 1, T, D) states against (B, L, T, D) truth, each kind's rows alone."""
    return torch.stack([torch.linalg.vector_norm(states[:, :, rows] - truth[:, :, rows], dim=(-2, -1))
                        / torch.linalg.vector_norm(truth[:, :, rows], dim=(-2, -1)) for rows in groups.values()],
                       dim=1).cpu().numpy()


def _statistics(errors: np.ndarray, identity: np.ndarray) -> dict[str, np.ndarray]:
    """Every ε statistic (..., kinds) of (..., image, kind, layer) errors of the surrogate and of the identity."""
    values = {}
    for suffix, e in (("", errors), ("_identity", identity)):
        values[f"epsilon{suffix}"] = e.mean(axis=-3).max(axis=-1)
        values[f"epsilon_strict{suffix}"] = e.max(axis=-1).mean(axis=-2)
        values[f"epsilon_mean{suffix}"] = e.mean(axis=(-3, -1))
    with np.errstate(divide="ignore", invalid="ignore"):
        for name in ("epsilon", "epsilon_strict"):
            reference = values[f"{name}_identity"]
            values[name.replace("epsilon", "skill")] = np.where(reference > 0, 1 - values[name] / reference, np.nan)
    return values


def _intervals(errors: np.ndarray, identity: np.ndarray, n_bootstrap: int, confidence: float,
               seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Percentile-bootstrap bounds (statistic, kind) of every `_statistics` value, images resampled jointly; NaNs without resamples or with one image."""
    count = len(_statistics(errors[:1], identity[:1]))
    shape = (count, errors.shape[1])
    if n_bootstrap < 1 or errors.shape[0] < 2:
        return np.full(shape, np.nan), np.full(shape, np.nan)

    def statistic(rows, axis=-1):
        return np.moveaxis(np.stack(list(_statistics(errors[rows], identity[rows]).values())), -1, 1)  # (statistic, kind[, resample])

    with np.errstate(divide="ignore", invalid="ignore"):
        interval = stats.bootstrap((np.arange(errors.shape[0]),), statistic, n_resamples=n_bootstrap, vectorized=True,
                                   batch=max(1, (1 << 22) // errors.size), confidence_level=confidence,
                                   method="percentile", rng=np.random.default_rng(seed)).confidence_interval
    return np.asarray(interval.low).reshape(shape), np.asarray(interval.high).reshape(shape)


DEPTH_SIGNALS = {
    "trained": "step s of m_j in phase j takes the depth signal of the phase's ceil(s * n_j / m_j)-th layer: only values "
               "seen in training, never decreasing, the phase's last layer at its last step, every layer at least "
               "once when m_j >= n_j",
    "interpolated": "step s of m_j in phase j (layers a..e) takes t = a - 1 + s * n_j / m_j: evenly spaced, so at "
                    "non-integer multiples of n_j values never seen in training; a change with the scale mixes more "
                    "loops with an unseen depth signal",
}
"""How `loop_schedule` maps a step within a phase to the depth signal, by name; both give each layer itself at scale 1."""


def loop_schedule(partition: Partition, scale: float, depth_signal: str = "trained") -> list[tuple[int, float]]:
    """Per step, the 1-based block and depth signal of a run with phase j's block repeated m_j = ``max(1, round(scale * n_j))`` times.

    Parameters
    ----------
    partition : Partition
        The phases; n_j is phase j's number of layers.
    scale : float
        Multiple of every phase's length.
    depth_signal : {"trained", "interpolated"}
        The map from step to depth signal, as `DEPTH_SIGNALS` states.
    """
    if depth_signal not in DEPTH_SIGNALS:
        raise ValueError(f"depth_signal must be one of {', '.join(DEPTH_SIGNALS)}, got {depth_signal!r}")
    schedule = []
    for index, phase in enumerate(partition):
        length = len(phase)
        repeats = max(1, int(round(scale * length)))
        for step in range(1, repeats + 1):
            if depth_signal == "trained":
                t = float(phase[-(-step * length // repeats) - 1])  # ceil(step * length / repeats), in integers
            else:
                t = phase[0] - 1 + step * length / repeats
            schedule.append((index + 1, t))
    return schedule


@torch.no_grad()
def loop_count(model, ds: xr.Dataset, scales=(0.5, 0.75, 1.0, 1.5, 2.0), images=None, batch_size: int = 64,
               depth_signal: str = "trained") -> xr.Dataset:
    """The surrogate run from layer 0 with its phases' blocks repeated ``scale`` times their lengths, against layer L.

    ``model`` has ``step(x, layer, block)``, ``partition``, ``num_layers`` (and a teacher head for accuracies);
    ``images`` are positions (default all); ``depth_signal`` as `loop_schedule`. Returns, over ``scale``: ``steps``,
    ``repeats`` (scale, phase), ``r2_final``, ``agreement``, ``accuracy_surrogate``, ``accuracy_ratio``; attrs
    ``depth_signal`` (its rule in words), ``accuracy_teacher``, ``accuracy_against``, or ``accuracy_note``.
    """
    bad = [scale for scale in scales if not (np.isfinite(scale) and scale > 0)]
    if bad or not len(scales):
        raise ValueError(f"loop scales must be finite numbers above 0 (multiples of each phase's length), got {list(scales)}")
    positions = np.arange(ds.sizes["image"]) if images is None else np.asarray(images)
    partition = model.partition
    schedules = [loop_schedule(partition, scale, depth_signal) for scale in scales]
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
               "n_images": int(len(positions)), "depth_signal": depth_signal,
               "depth_signal_rule": DEPTH_SIGNALS[depth_signal],
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
