"""Load a ViT to study: a timm name (hub weights, a local checkpoint, or random init) or a zoo name.

Every command that takes a model goes through `load_model`, so a timm name
(``vit_small_patch14_reg4_dinov2``), a timm name with ``checkpoint=`` a local file, and a
name from dynamo's own zoo (``dynamo-zoo/vit-digits-reg4``) all behave alike.
"""

from __future__ import annotations

import difflib
import hashlib
import socket
import sys
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import timm
import timm.data
import torch
from huggingface_hub import constants as hub
from torch import nn

from dynamo import zoo
from dynamo.layout import TokenLayout, check_is_vit, token_layout


class ModelLoadError(RuntimeError):
    """The model could not be built or its weights could not be loaded."""


@dataclass
class LoadedModel:
    """A model ready for recording, with what identifies it.

    Attributes
    ----------
    module : torch.nn.Module
        The timm model, in eval mode.
    source : str
        The name it was loaded by (timm name or zoo name).
    checkpoint : str or None
        Local checkpoint file the weights came from, if any.
    pretrained : bool
        Whether the weights are trained ones (hub, checkpoint or zoo) rather than random init.
    weights_sha256 : str
        sha256 over the state dict (names, dtypes, shapes and bytes, in name order).
    data_config : dict
        timm's preprocessing for the model (input_size, interpolation, mean, std, crop_pct, ...).
    layout : TokenLayout
    """

    module: nn.Module
    source: str
    checkpoint: str | None
    pretrained: bool
    weights_sha256: str
    data_config: dict
    layout: TokenLayout = field(repr=False)

    @property
    def num_blocks(self) -> int:
        return len(self.module.blocks)


def load_model(
    name: str,
    checkpoint: str | Path | None = None,
    pretrained: bool = True,
    **timm_kwargs,
) -> LoadedModel:
    """Build a ViT-family model by name and load its weights.

    Parameters
    ----------
    name : str
        A timm model name, or a zoo name starting with ``dynamo-zoo/``.
    checkpoint : str or Path, optional
        Local weights for a timm name: ``.safetensors`` (preferred) or a torch file, which is
        loaded with ``weights_only=True`` and so never unpickles arbitrary objects.
    pretrained : bool
        For a timm name without a checkpoint: fetch the hub weights (needs the internet or a
        local hub cache). False builds random weights, which suit tests of mechanics only.
    **timm_kwargs
        Passed to `timm.create_model` (``img_size=``, ``num_classes=``, ...).

    Raises
    ------
    ModelLoadError
        Unknown name, unreachable hub, or a checkpoint that does not fit the architecture.
    NotAViTError
        The model is not a ViT-family transformer.
    """
    if name.startswith(zoo.ZOO_PREFIX):
        if checkpoint is not None or timm_kwargs:
            raise ModelLoadError(f"{name} is a zoo model; it takes no checkpoint or timm options")
        module = zoo.load_zoo_model(name)
        is_trained = True
    else:
        module = _create_timm_model(name, pretrained and checkpoint is None, **timm_kwargs)
        is_trained = pretrained or checkpoint is not None
        if checkpoint is not None:
            load_checkpoint(module, checkpoint)
    check_is_vit(module)
    module.eval()
    return LoadedModel(
        module=module,
        source=name,
        checkpoint=None if checkpoint is None else str(Path(checkpoint).resolve()),
        pretrained=is_trained,
        weights_sha256=weights_sha256(module),
        data_config=data_config(module),
        layout=token_layout(module),
    )


def data_config(model: nn.Module) -> dict:
    """timm's preprocessing for ``model``, with the input size the model was actually built for.

    ``resolve_data_config`` reads the pretrained config, which keeps the default input size
    when a model is created with another ``img_size``; the patch embedding knows the truth.
    """
    config = timm.data.resolve_data_config({}, model=model)
    built = getattr(model.patch_embed, "img_size", None)
    if built is not None:
        config["input_size"] = (config["input_size"][0], *built)
    return config


def _create_timm_model(name: str, pretrained: bool, **timm_kwargs) -> nn.Module:
    if not timm.is_model(name):
        family = [m for m in timm.list_models() if m.split("_")[0] == name.split("_")[0]]
        close = difflib.get_close_matches(name, family or timm.list_models(), n=5, cutoff=0.3)
        raise ModelLoadError(
            f"unknown model {name!r}: neither a timm model name nor a zoo name "
            f"({', '.join(zoo.list_models())}). Similar timm names: {', '.join(close) or 'none'}"
        )
    offline = pretrained and not _hub_reachable()
    # huggingface_hub reads HF_HUB_OFFLINE at every request: offline, cached weights load, missing ones fail at once
    saved, hub.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE or offline
    try:
        return timm.create_model(name, pretrained=pretrained, **timm_kwargs)
    except (OSError, RuntimeError, ValueError) as error:
        if not pretrained:
            raise
        why = "the model hub is unreachable and the weights are not in the local cache" if offline else str(error)
        raise ModelLoadError(
            f"could not get pretrained weights for {name}: {why}. Pass local weights with "
            f"--checkpoint FILE (python: checkpoint=), use --no-pretrained for random weights "
            f"(mechanics only), or use the bundled model {zoo.DEFAULT_MODEL}."
        ) from error
    finally:
        hub.HF_HUB_OFFLINE = saved


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to the Hugging Face hub endpoint opens within the timeout."""
    url = urllib.parse.urlparse(hub.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load local weights into ``model`` in place, strictly.

    ``.safetensors`` files are read with safetensors; any other file with
    ``torch.load(weights_only=True)``. A state dict nested under ``state_dict``, ``model`` or
    ``module`` is unwrapped, and the architecture's own timm ``checkpoint_filter_fn`` (if it
    has one) converts original-format checkpoints (e.g. official DINOv2 or DeiT files).

    Raises
    ------
    ModelLoadError
        Missing file, unsafe or unreadable file, or keys/shapes that do not fit the model.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ModelLoadError(
            f"cannot read checkpoint {path}: {error}. dynamo loads safetensors files, or torch "
            "files that hold only tensors (weights_only=True); re-save the state dict with "
            "safetensors.torch.save_file if it contains other objects"
        ) from error
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    try:
        if filter_fn is not None:
            state = filter_fn(state, model)
        model.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError, ValueError) as error:
        raise ModelLoadError(
            f"checkpoint {path} does not fit {type(model).__name__}: {error}"
        ) from error


def weights_sha256(model: nn.Module) -> str:
    """sha256 of a model's state dict: every name, dtype, shape and raw byte, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
