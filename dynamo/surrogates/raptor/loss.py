"""Raptor's training loss: a token-weighted MSE, and teacher forcing annealed into rollout.

The paper's runs use plain MSE on every stage-1 range but the last, which weights the token
kinds ``0.34 cls + 0.33 registers + 0.33 patches``, and ``0.45, 0.10, 0.45`` in stage 2 (the
``"paper"`` loss). Token kinds are those of `dynamo.layout.token_groups`.

Weights are used as given, as the paper's code does (``w_cls MSE(cls) + w_reg MSE(registers) +
w_patch MSE(patches)``): nothing is renormalised, so a kind the model lacks (registers of a
plain ViT) simply contributes nothing, and the weights need not sum to 1. A distillation token
takes the cls weight unless given its own (``dist``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dynamo.layout import TOKEN_KINDS
from dynamo.surrogates.raptor.model import Raptor

__all__ = ["PAPER_STAGE1_LAST_WEIGHTS", "PAPER_STAGE2_WEIGHTS", "loss_weights", "segment_loss", "stage1_weights",
           "token_loss"]

PAPER_STAGE1_LAST_WEIGHTS = {"cls": 0.34, "register": 0.33, "patch": 0.33}
PAPER_STAGE2_WEIGHTS = {"cls": 0.45, "register": 0.10, "patch": 0.45}


def loss_weights(spec, paper: dict | None) -> dict | None:
    """The token-kind weights of a loss: ``"paper"`` (``paper``), ``"mse"`` (None) or a dict.

    A distillation token without a weight of its own takes the cls weight.
    """
    if isinstance(spec, str):
        if spec not in ("paper", "mse"):
            raise ValueError(f"a loss must be 'paper', 'mse' or a dict of token-kind weights, got {spec!r}")
        spec = paper if spec == "paper" else None
    if spec is None:
        return None
    unknown = set(spec) - set(TOKEN_KINDS)
    if unknown:
        raise ValueError(f"unknown token kinds {sorted(unknown)} in loss weights; use {', '.join(TOKEN_KINDS)}")
    if not all(isinstance(w, (int, float)) and w >= 0 for w in spec.values()):
        raise ValueError(f"loss weights must be non-negative numbers, got {spec}")
    return {"dist": spec.get("cls", 0.0), **spec}


def stage1_weights(spec, k: int) -> list[dict | None]:
    """The loss weights of each of the k stage-1 segments, in depth order.

    Parameters
    ----------
    spec : "paper", "mse", dict, or a sequence of k of ("mse" or dict)
        "paper": MSE on every segment but the last, which is weighted `PAPER_STAGE1_LAST_WEIGHTS`;
        "mse" or one dict: the same for every segment; a sequence: one per segment.
    """
    if isinstance(spec, (list, tuple)):
        if len(spec) != k:
            raise ValueError(f"{len(spec)} stage-1 losses given for {k} segments; give one per segment, or one for all")
        if "paper" in spec:
            raise ValueError("'paper' names a whole stage-1 recipe; per segment give 'mse' or weights")
        return [loss_weights(item, None) for item in spec]
    if spec == "paper":
        return [None] * (k - 1) + [loss_weights(spec, PAPER_STAGE1_LAST_WEIGHTS)]
    return [loss_weights(spec, None)] * k


def token_loss(predicted: torch.Tensor, target: torch.Tensor, weights: dict | None, groups: dict) -> torch.Tensor:
    """MSE, or the token-kind weighted MSE ``sum_kind w_kind MSE(kind)``, weights as given.

    Parameters
    ----------
    predicted, target : torch.Tensor
        (..., T, D) states.
    weights : dict or None
        Kind -> weight (`loss_weights`); None is plain MSE over every token.
    groups : dict of str to torch.Tensor
        Kind -> positions along T (`dynamo.layout.token_groups`, as long tensors).
    """
    if weights is None:
        return F.mse_loss(predicted, target)
    present = {kind: w for kind, w in weights.items() if kind in groups and w}
    if not present:
        raise ValueError(f"the loss weights {weights} give no weight to any token kind of this model ({', '.join(groups)})")
    return sum(
        w * F.mse_loss(predicted.index_select(-2, groups[kind]), target.index_select(-2, groups[kind]))
        for kind, w in present.items()
    )


def segment_loss(
    model: Raptor,
    batch: torch.Tensor,
    start: int,
    weights: dict | None,
    groups: dict,
    anneal: float,
    noise: float = 0.0,
    generator: torch.Generator | None = None,
    ranges: list[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """``anneal * L_TF + (1 - anneal) * L_AR`` on a batch of layers ``start..start + n``.

    Parameters
    ----------
    model : Raptor
    batch : torch.Tensor
        (B, n + 1, T, D) recorded layers start..start + n.
    anneal : float
        Weight of teacher forcing (the routed block maps each recorded layer to the next); the
        rest goes to the rollout from layer ``start`` (its loss averaged over the n steps).
    noise, generator
        Input noise of the rollout, as `Raptor.run`.
    ranges : list of (int, int), optional
        The (a, b) layer ranges within start..start + n that are trained, each rolled out from its
        own recorded layer a (a phase not contiguous in depth, `dynamo.surrogates.raptor.train.Segment`); the
        loss is their mean weighted by their steps. Default the one range start..start + n.
    """
    ranges = ranges or [(start, start + batch.shape[1] - 1)]
    total = sum(b - a for a, b in ranges)
    return sum((b - a) / total * _range_loss(model, batch[:, a - start: b - start + 1], a, weights, groups, anneal, noise, generator)
               for a, b in ranges)


def _range_loss(model, batch, start, weights, groups, anneal, noise, generator) -> torch.Tensor:
    """`segment_loss` on one range: every layer of ``batch`` (B, n + 1, T, D) routed to one block."""
    n = batch.shape[1] - 1
    loss = batch.new_zeros(())
    if anneal > 0:
        block = model.blocks[model.block_index(start + 1)]
        inputs = batch[:, :-1].reshape(-1, *batch.shape[2:])
        t = torch.arange(start + 1, start + n + 1, dtype=batch.dtype, device=batch.device).repeat(batch.shape[0])
        predicted = block(inputs, t).reshape(batch[:, 1:].shape)
        loss = loss + anneal * token_loss(predicted, batch[:, 1:], weights, groups)
    if anneal < 1:
        states = model.run(batch[:, 0], start, start + n, noise=noise, generator=generator)
        rollout = sum(token_loss(states[i], batch[:, i], weights, groups) for i in range(1, n + 1)) / n
        loss = loss + (1 - anneal) * rollout
    return loss
