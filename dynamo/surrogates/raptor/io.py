"""Checkpoints of a running Raptor fit and the stage-1 blocks kept for reuse: one safetensors file each.

A checkpoint holds the weights, the optimizer's state as named tensors and the JSON config
(position, history) in one file renamed into place once (`dynamo.serialize.write_unit`), so a fit
killed at any moment leaves the previous checkpoint or the next one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dynamo.serialize import (
    digest,
    jsonable,
    optimizer_state,
    read_unit,
    tensors_of_optimizer,
    write_unit,
)
from dynamo.surrogates.raptor.model import Raptor

__all__ = ["block_path", "load_block", "load_checkpoint", "save_block", "save_checkpoint"]

CHECKPOINT = "checkpoint.safetensors"


def save_checkpoint(folder: Path, model: Raptor, config: dict, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Write the weights, ``config`` and, mid-segment, the optimizer's state as one file in ``folder``."""
    tensors = {f"model.{name}": value for name, value in model.state_dict().items()}
    if optimizer is not None:
        state, param_groups = tensors_of_optimizer(optimizer)
        tensors.update(state)
        config = {**config, "optimizer": {"param_groups": param_groups}}
    write_unit(folder / CHECKPOINT, tensors, config)


def load_checkpoint(folder: Path, model: Raptor, identity: dict) -> tuple[dict, dict | None] | None:
    """Load the weights of `save_checkpoint` into ``model``; its config and optimizer state, or None if absent.

    Raises
    ------
    ValueError
        If the checkpoint's ``identity`` (the fit's parameters, teacher and images) is not ``identity``.
    """
    if not (folder / CHECKPOINT).exists():
        return None
    tensors, config = read_unit(folder / CHECKPOINT)
    if config["identity"] != jsonable(identity):
        raise ValueError(
            f"{folder} holds a checkpoint of a fit with other parameters or another store; use "
            "another checkpoint directory, or delete it to start over"
        )
    model.load_state_dict({key.removeprefix("model."): value for key, value in tensors.items() if key.startswith("model.")})
    if "optimizer" not in config:
        return config, None
    return config, optimizer_state(tensors, config["optimizer"]["param_groups"])


def save_block(folder: Path, key: dict, block: torch.nn.Module, history: list[dict]) -> None:
    """Keep a trained stage-1 block under its key (`block_path`), with its validation history."""
    write_unit(block_path(folder, key), block.state_dict(), {"key": key, "history": history})


def load_block(folder: Path, key: dict, block: torch.nn.Module) -> list[dict] | None:
    """Load the block kept under ``key`` into ``block`` and return its history; None if none is kept."""
    path = block_path(folder, key)
    if not path.exists():
        return None
    tensors, config = read_unit(path)
    if config["key"] != jsonable(key):
        return None
    block.load_state_dict(tensors)
    return config["history"]


def block_path(folder: Path, key: dict) -> Path:
    """The file of a stage-1 block: named by the sha256 of its key (recipe, teacher, images, layer range, loss)."""
    return Path(folder) / f"block-{digest(key, 20)}.safetensors"
