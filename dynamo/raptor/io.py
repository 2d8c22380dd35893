"""Raptor weights and configuration on disk: safetensors tensors plus a JSON file; nothing pickled.

A saved fitter is a folder with ``config.json`` (the fitter's parameters, the partition, the
block configuration, the teacher's identity and the fit's history) and ``weights.safetensors``.
Checkpoints of a running fit use the same two formats (``checkpoint.json``,
``checkpoint.safetensors``), with the optimizer's state flattened into named tensors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

__all__ = ["optimizer_from_tensors", "optimizer_to_tensors", "read_tensors_and_json", "write_tensors_and_json"]


def write_tensors_and_json(tensor_path: str | Path, json_path: str | Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """Write tensors to a safetensors file and ``config`` to a JSON file, each atomically.

    The JSON file is renamed into place last, so it names a complete tensor file whenever it exists.
    """
    tensor_path, json_path = Path(tensor_path), Path(json_path)
    tensor_path.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: t.detach().contiguous().cpu() for name, t in tensors.items()}, f"{tensor_path}.tmp")
    os.replace(f"{tensor_path}.tmp", tensor_path)
    Path(f"{json_path}.tmp").write_text(json.dumps(config, indent=1, default=_jsonable))
    os.replace(f"{json_path}.tmp", json_path)


def read_tensors_and_json(tensor_path: str | Path, json_path: str | Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """Read what `write_tensors_and_json` wrote; None if the JSON file is absent."""
    if not Path(json_path).exists():
        return None
    return load_file(str(tensor_path)), json.loads(Path(json_path).read_text())


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state as named tensors (``optimizer.PARAM.NAME``) and its JSON-able groups."""
    state = optimizer.state_dict()
    tensors = {
        f"optimizer.{param}.{name}": torch.as_tensor(value)
        for param, entries in state["state"].items()
        for name, value in entries.items()
    }
    return tensors, {"param_groups": state["param_groups"]}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: dict) -> None:
    """Restore what `optimizer_to_tensors` gave."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, param, name = key.split(".", 2)
            state.setdefault(int(param), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups["param_groups"]})


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
