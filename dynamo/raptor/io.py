"""Raptor fits on disk, and the teacher they belong to: safetensors tensors plus JSON; nothing pickled.

A saved fitter is a folder with ``config.json`` (the fitter's parameters, the partition, the
block configuration, the teacher's identity and the fit's history) and ``weights.safetensors``.

A checkpoint of a running fit is **one file**, ``checkpoint.safetensors``: the weights, the
optimizer's state flattened into named tensors, and the JSON config (position, history) in the
file's metadata, written to a temporary file and renamed into place once, so a fit killed at any
moment leaves either the previous checkpoint or the next one, never weights of one and position
of another. Stage-1 blocks kept for reuse (`save_block`) are single files written the same way.
"""

from __future__ import annotations

import hashlib
import json
from os import replace
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dynamo.models import LoadedModel, load_recorded_model, rebuild_attrs
from dynamo.partition import Partition
from dynamo.raptor.model import Raptor
from dynamo.stepping import BlockStepper
from dynamo.store import jsonable

__all__ = ["load_block", "load_checkpoint", "load_fitter", "resolve_teacher", "save_block", "save_checkpoint",
           "save_fitter", "teacher_identity"]

FORMAT = "dynamo-raptor/1"
CHECKPOINT = "checkpoint.safetensors"
METADATA_KEY = "dynamo"


def write_tensors_and_json(tensor_path: Path, json_path: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """Write tensors to a safetensors file and ``config`` to a JSON file, each atomically.

    The JSON file is renamed into place last, so it names a complete tensor file whenever it exists.
    """
    tensor_path.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: t.detach().contiguous().cpu() for name, t in tensors.items()}, f"{tensor_path}.tmp")
    replace(f"{tensor_path}.tmp", tensor_path)
    Path(f"{json_path}.tmp").write_text(json.dumps(jsonable(config), indent=1))
    replace(f"{json_path}.tmp", json_path)


def write_unit(path: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """Tensors and a JSON config as one safetensors file (config in its metadata), renamed into place once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {METADATA_KEY: json.dumps(jsonable(config))}
    save_file({name: t.detach().contiguous().cpu() for name, t in tensors.items()}, f"{path}.tmp", metadata=metadata)
    replace(f"{path}.tmp", path)


def read_unit(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and the config of a file written by `write_unit`."""
    with safe_open(str(path), framework="pt") as opened:
        metadata = opened.metadata() or {}
    if METADATA_KEY not in metadata:
        raise ValueError(f"{path} holds no dynamo config (a checkpoint of an older dynamo?); delete it to start over")
    return load_file(str(path)), json.loads(metadata[METADATA_KEY])


# ---- checkpoints of a running fit -------------------------------------------------------


def save_checkpoint(folder: Path, model: Raptor, config: dict, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Write the weights, ``config`` and, mid-segment, the optimizer's state as one file in ``folder``."""
    tensors = {f"model.{name}": value for name, value in model.state_dict().items()}
    if optimizer is not None:
        state = optimizer.state_dict()
        tensors.update({f"optimizer.{param}.{name}": torch.as_tensor(value)
                        for param, entries in state["state"].items() for name, value in entries.items()})
        config = {**config, "optimizer": {"param_groups": state["param_groups"]}}
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
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, param, name = key.split(".", 2)
            state.setdefault(int(param), {})[name] = value
    return config, {"state": state, "param_groups": config["optimizer"]["param_groups"]}


# ---- stage-1 blocks kept for reuse ------------------------------------------------------


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
    digest = hashlib.sha256(json.dumps(jsonable(key), sort_keys=True).encode()).hexdigest()[:20]
    return Path(folder) / f"block-{digest}.safetensors"


# ---- fitted surrogates ------------------------------------------------------------------


def save_fitter(fitter, folder) -> Path:
    """Write a fitted `RaptorFitter` into ``folder`` (``config.json``, ``weights.safetensors``)."""
    config = {
        "format": FORMAT,
        "params": {k: v for k, v in fitter.get_params().items() if k != "checkpoint_dir"},
        "partition": fitter.partition_,
        "num_layers": fitter.model_.num_layers,
        "block_config": fitter.block_config_,
        "teacher": fitter.teacher_identity_,
        "store": fitter.store_,
        "images_sha256": fitter.images_sha256_,
        "validation_images": fitter.validation_images_,
        "training_images": fitter.training_images_,
        "history": fitter.history_,
    }
    folder = Path(folder)
    write_tensors_and_json(folder / "weights.safetensors", folder / "config.json", fitter.model_.state_dict(), config)
    return folder


def load_fitter(cls, folder, teacher: LoadedModel | None = None, device: str | None = None, head=None):
    """A fitted ``cls`` (`RaptorFitter`) from a folder written by `save_fitter`; see `RaptorFitter.load`."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{folder} holds no saved Raptor fitter (no config.json); save one with RaptorFitter.save")
    config = json.loads(config_path.read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{config_path} is not a dynamo Raptor config (format {config.get('format')!r})")
    fitter = cls(**{**config["params"], **({"device": device} if device else {})})
    identity = config["teacher"]
    if teacher is None and (identity["pretrained"] or "init_seed" in identity):
        teacher = load_recorded_model(identity)
    if teacher is not None:
        check_teacher({"weights_sha256": identity["weights_sha256"]}, teacher_identity(teacher))
        teacher.module.to(fitter.device)
    fitter.model_ = Raptor(
        Partition(config["partition"]), config["num_layers"], config["block_config"],
        teacher=None if teacher is None else BlockStepper(teacher, head),
    ).to(fitter.device)
    fitter.model_.load_state_dict(load_file(str(folder / "weights.safetensors")))
    fitter.partition_ = Partition(config["partition"])
    fitter.block_config_ = config["block_config"]
    fitter.teacher_identity_ = identity
    fitter.store_ = config["store"]
    fitter.images_sha256_ = config["images_sha256"]
    fitter.validation_images_ = np.asarray(config["validation_images"], dtype=np.int64)
    fitter.training_images_ = np.asarray(config["training_images"], dtype=np.int64)
    fitter.history_ = config["history"]
    return fitter


# ---- the teacher ------------------------------------------------------------------------


def teacher_identity(teacher: LoadedModel) -> dict:
    """What a fit records of its teacher: what rebuilds it (`dynamo.models.rebuild_attrs`)."""
    return jsonable(rebuild_attrs(teacher))


def resolve_teacher(attrs: dict, teacher: LoadedModel | None) -> LoadedModel:
    """A store's teacher: the one given, or rebuilt from the store's attributes; hashes checked.

    Raises
    ------
    ValueError
        The rebuilt (or given) teacher's weights are not the recorded ones: random weights from a
        store that does not record the seed of their initialisation, or another model.
    """
    if teacher is None:
        teacher = load_recorded_model(attrs)
    if not isinstance(teacher, LoadedModel):
        raise ValueError(f"teacher must be a dynamo LoadedModel (dynamo.load_model), got {type(teacher).__name__}")
    check_teacher(attrs, teacher_identity(teacher))
    return teacher


def check_teacher(attrs: dict, identity: dict) -> None:
    """Raise unless the teacher ``identity`` has the weights hash of ``attrs`` (a store's)."""
    if attrs.get("weights_sha256") != identity["weights_sha256"]:
        raise ValueError(
            f"the teacher {identity['model']} (weights sha256 {identity['weights_sha256'][:12]}) is not "
            f"the model the store was recorded from (sha256 {str(attrs.get('weights_sha256'))[:12]})"
        )
