"""Scores of a predicted trajectory against a reference one, shared by Raptor and the analyses.

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

__all__ = ["R2_REFERENCES", "fold_sums", "r2_from_sums", "r2_score", "r2_sums"]

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
    sums = r2_sums(torch.as_tensor(prediction), torch.as_tensor(target), reference, dims=None)
    return float(r2_from_sums(*sums))


def r2_sums(prediction: torch.Tensor, target: torch.Tensor, reference: str, dims) -> tuple:
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


def r2_from_sums(squared_error, total, total_squares, count):
    variance = total_squares / count - (total / count) ** 2
    return 1 - (squared_error / count) / variance


def fold_sums(total: tuple | None, batch: tuple) -> tuple:
    """``total`` plus a batch's `r2_sums` (``batch`` itself when ``total`` is None)."""
    return batch if total is None else tuple(a + b for a, b in zip(total, batch))
