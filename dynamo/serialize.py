"""Written once for every fitted object: JSON conversion, atomic safetensors + JSON files, optimizer
state as named tensors, derived seeds, and the identity keys that decide whether work can be resumed.

Every write goes to a temporary file renamed into place, so a process killed at any moment leaves
the previous file or the next one, never a torn one.
"""

from __future__ import annotations

import hashlib
import json
import math
from os import replace
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from safetensors import safe_open
from safetensors.torch import load_file, save_file

__all__ = ["derived_seed", "digest", "fit_identity", "jsonable", "optimizer_state", "read_hidden", "read_tensors_and_json",
           "read_unit", "tensors_of_optimizer", "write_tensors_and_json", "write_unit"]

METADATA_KEY = "dynamo"


def jsonable(value):
    """Tuples → lists, numpy scalars/arrays → Python, NaN and inf → None: a value that is valid JSON
    and round-trips through it (attrs, configs, summaries)."""
    def plain(item):
        if isinstance(item, dict):
            return {str(key): plain(v) for key, v in item.items()}
        if isinstance(item, list):
            return [plain(v) for v in item]
        return None if isinstance(item, float) and not math.isfinite(item) else item

    return plain(json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v))))


def digest(value, length: int | None = None) -> str:
    """sha256 (hex, first ``length`` characters) of a JSON-able value, keys sorted."""
    return hashlib.sha256(json.dumps(jsonable(value), sort_keys=True).encode()).hexdigest()[:length]


def derived_seed(*parts) -> int:
    """A 32-bit seed that is a function of ``parts`` alone (a fit's seed and what it seeds)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little")


def fit_identity(estimator, attrs: dict, exclude=("checkpoint_dir", "progress", "device"), **extra) -> dict:
    """What an interrupted fit must share with a new one to be resumed: parameters, teacher weights, images.

    Parameters
    ----------
    estimator : sklearn.base.BaseEstimator
    attrs : dict
        The trajectory store's attributes.
    exclude : sequence of str
        Parameters that do not change the result.
    **extra
        More entries (e.g. the store's size).
    """
    params = {k: v for k, v in estimator.get_params().items() if k not in exclude}
    return jsonable({"params": params, "teacher_weights_sha256": attrs.get("weights_sha256"),
                     "images_sha256": attrs.get("identity", {}).get("images_sha256"), **extra})


def _save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: t.detach().contiguous().cpu() for name, t in tensors.items()}, f"{path}.tmp", metadata=metadata)
    replace(f"{path}.tmp", path)


def write_tensors_and_json(tensor_path: Path, json_path: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """Tensors to a safetensors file and ``config`` to a JSON file, each atomically, the JSON last
    (so it names a complete tensor file whenever it exists)."""
    _save(tensors, Path(tensor_path))
    Path(f"{json_path}.tmp").write_text(json.dumps(jsonable(config), indent=1))
    replace(f"{json_path}.tmp", json_path)


def read_tensors_and_json(tensor_path: Path, json_path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and config of `write_tensors_and_json`."""
    return load_file(str(tensor_path)), json.loads(Path(json_path).read_text())


def write_unit(path: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """Tensors and a JSON config as one safetensors file (config in its metadata), renamed into place once."""
    _save(tensors, Path(path), {METADATA_KEY: json.dumps(jsonable(config))})


def read_unit(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and the config of a file written by `write_unit`."""
    with safe_open(str(path), framework="pt") as opened:
        metadata = opened.metadata() or {}
    if METADATA_KEY not in metadata:
        raise ValueError(f"{path} holds no dynamo config (a checkpoint of an older dynamo?); delete it to start over")
    return load_file(str(path)), json.loads(metadata[METADATA_KEY])


def tensors_of_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    """An optimizer's state as named tensors ``optimizer.<param>.<name>``, and its JSON param groups."""
    state = optimizer.state_dict()
    tensors = {f"optimizer.{param}.{name}": torch.as_tensor(value)
               for param, entries in state["state"].items() for name, value in entries.items()}
    return tensors, state["param_groups"]


def optimizer_state(tensors: dict[str, torch.Tensor], param_groups: list) -> dict:
    """The optimizer state dict of `tensors_of_optimizer`'s tensors (other keys ignored) and param groups."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, param, name = key.split(".", 2)
            state.setdefault(int(param), {})[name] = value
    return {"state": state, "param_groups": param_groups}


def read_hidden(hidden: xr.DataArray, rows, device="cpu", **selection) -> torch.Tensor:
    """``hidden`` of the images at positions ``rows`` (and any other ``isel`` selection) as float32 on ``device``."""
    return torch.from_numpy(np.asarray(hidden.isel(image=rows, **selection).values, dtype=np.float32)).to(device)
