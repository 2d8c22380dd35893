"""Load a ViT to study: a timm name (hub weights, a local checkpoint, or random init) or a zoo name,
with its input size and preprocessing, so that one `LoadedModel` says everything a recording depends on."""

from __future__ import annotations

import argparse
import ast
import difflib
import hashlib
import math
import re
import socket
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import timm
import timm.data
import torch
from huggingface_hub import constants as hub
from safetensors import SafetensorError, safe_open
from timm.data.transforms import str_to_interp_mode
from torch import nn

from dynamo import zoo
from dynamo.layout import TokenLayout, check_is_vit, token_layout

TIMM_RESERVED = frozenset({"img_size", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path"})
"""`timm.create_model` options that dynamo sets itself (``timm_options`` may not)."""

PREPROCESS_KEYS = ("resize", "crop", "interpolation", "mean", "std")
"""What ``preprocess=`` (``--preprocess``) may override in a model's timm data config."""

STATISTICS = {
    "imagenet": (timm.data.IMAGENET_DEFAULT_MEAN, timm.data.IMAGENET_DEFAULT_STD),
    "inception": (timm.data.IMAGENET_INCEPTION_MEAN, timm.data.IMAGENET_INCEPTION_STD),
    "clip": (timm.data.OPENAI_CLIP_MEAN, timm.data.OPENAI_CLIP_STD),
}
"""Named normalisation statistics accepted for ``mean=`` and ``std=`` (timm's constants)."""

PRESETS = {
    "paper": {"resize": 256, "crop": 224, "interpolation": "bicubic",
              "mean": timm.data.IMAGENET_DEFAULT_MEAN, "std": timm.data.IMAGENET_DEFAULT_STD},
}
"""Preprocessing presets: ``paper`` is the Raptor paper's (Resize 256 bicubic, CenterCrop 224, ImageNet statistics)."""


class ModelLoadError(RuntimeError):
    """The model could not be built or its weights could not be loaded."""


@dataclass
class LoadedModel:
    """A model ready for recording (``module`` in eval mode), with what identifies it.

    Attributes
    ----------
    source : str
        The name it was loaded by (timm name or zoo name).
    pretrained : bool
        Trained weights (hub, checkpoint or zoo) rather than random init.
    data_config : dict
        timm's data config with ``preprocess`` applied: the arguments of `timm.data.create_transform`.
    preprocess : dict
        The overrides of timm's data config asked for; empty for the model's own preprocessing.
    seed : int or None
        Seed of the random initialisation; None for trained weights.
    timm_options : dict
        Extra `timm.create_model` options (not ``img_size``): part of what rebuilds the model.
    """

    module: nn.Module
    source: str
    checkpoint: str | None
    pretrained: bool
    weights_sha256: str
    data_config: dict
    layout: TokenLayout = field(repr=False)
    preprocess: dict = field(default_factory=dict)
    seed: int | None = None
    timm_options: dict = field(default_factory=dict)

    @property
    def num_blocks(self) -> int:
        return len(self.module.blocks)


def load_model(name: str, checkpoint: str | Path | None = None, pretrained: bool = True, *,
               img_size: int | tuple[int, int] | None = None, preprocess: dict | str | None = None, seed: int = 0,
               **timm_kwargs) -> LoadedModel:
    """Build a ViT-family model by name and load its weights.

    Parameters
    ----------
    name : str
        A timm model name (with an optional ``.tag``), or a zoo name starting with ``dynamo-zoo/``.
    checkpoint : str or Path, optional
        Local weights for a timm name: ``.safetensors`` or a torch file (``weights_only=True``),
        loaded strictly as timm loads pretrained weights (wrappers unwrapped, the architecture's
        checkpoint filter, position embeddings resampled); transformers ViT / DINOv2 state dicts
        and ONNX exports through `dynamo.convert`.
    pretrained : bool
        For a timm name without a checkpoint: fetch the hub weights; False builds random weights
        (for tests of mechanics only).
    img_size : int or (int, int), optional
        Input (height, width) in pixels, a multiple of the patch size; default the model's own, or
        the ``crop`` of ``preprocess``.
    preprocess : dict or str, optional
        Overrides of the model's timm data config, or a preset name; see `preprocess_overrides`.
    seed : int
        Seed of the random initialisation (the global torch RNG is left as it was).
    **timm_kwargs
        Passed to `timm.create_model` (``num_classes=``, ``depth=``, ...).

    Raises
    ------
    ModelLoadError
        Unknown name, unreachable hub, a checkpoint that does not fit the architecture, or an
        image size the patch size does not divide.
    NotAViTError
        The model is not a ViT-family transformer.
    ValueError
        Unknown or malformed preprocessing overrides.
    """
    preset, overrides = (preprocess, None) if isinstance(preprocess, str) else (None, preprocess)
    preprocess = preprocess_overrides(preset, overrides)
    img_size = _image_size(img_size, preprocess)
    if name.startswith(zoo.ZOO_PREFIX):
        if checkpoint is not None or timm_kwargs:
            raise ModelLoadError(f"{name} is a zoo model; it takes no checkpoint or timm options")
        module = zoo.load_zoo_model(name)
        built = tuple(module.patch_embed.img_size)
        if img_size is not None and img_size != built:
            raise ModelLoadError(
                f"{name} is a zoo model trained on {built[0]}x{built[1]} images; it cannot be built for "
                f"{img_size[0]}x{img_size[1]}: drop --img-size (and any crop=)"
            )
        is_trained = True
    else:
        reserved = sorted(set(timm_kwargs) & TIMM_RESERVED)
        if reserved:
            raise ModelLoadError(f"timm option {', '.join(reserved)} is set by dynamo itself (use --img-size, "
                                 "--checkpoint, --no-pretrained); drop it from the timm options")
        options = dict(timm_kwargs)
        if img_size is not None:
            timm_kwargs["img_size"] = img_size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                module = _create_timm_model(name, checkpoint, pretrained, **timm_kwargs)
            except TypeError as error:
                if not options:
                    raise
                raise ModelLoadError(f"{name} cannot be built with the timm options {options}: {error}") from None
        is_trained = pretrained or checkpoint is not None
    check_is_vit(module)
    _check_patch_grid(module, name)
    module.eval()
    return LoadedModel(
        module=module,
        source=name,
        checkpoint=None if checkpoint is None else str(Path(checkpoint).resolve()),
        pretrained=is_trained,
        weights_sha256=weights_sha256(module),
        data_config=data_config(module, preprocess),
        layout=token_layout(module),
        preprocess=preprocess,
        seed=None if is_trained else seed,
        timm_options={} if name.startswith(zoo.ZOO_PREFIX) else options,
    )


def rebuild_attrs(loaded: LoadedModel) -> dict:
    """What rebuilds ``loaded`` with `load_recorded_model`: the JSON-ready attributes a store (or a fit) records."""
    return {
        "model": loaded.source,
        "checkpoint": loaded.checkpoint,
        "pretrained": bool(loaded.pretrained),
        "weights_sha256": loaded.weights_sha256,
        "image_size": [int(n) for n in loaded.data_config["input_size"][1:]],
        "preprocess_overrides": dict(loaded.preprocess),
        "init_seed": loaded.seed,
        # only when set, so that the fits and stores of plain models keep the identity they had
        **({"timm_options": dict(loaded.timm_options)} if loaded.timm_options else {}),
    }


def load_recorded_model(attrs: dict) -> LoadedModel:
    """Rebuild the model a store (or fit) was recorded with from its `rebuild_attrs`; compare ``weights_sha256``."""
    image_size = attrs.get("image_size")
    return load_model(
        attrs["model"], attrs.get("checkpoint"), pretrained=attrs.get("pretrained", True),
        img_size=None if image_size is None else tuple(image_size),
        preprocess=attrs.get("preprocess_overrides") or None, seed=attrs.get("init_seed") or 0,
        **(attrs.get("timm_options") or {}),
    )


def data_config(model: nn.Module, preprocess: dict | None = None) -> dict:
    """timm's data config (the arguments of `timm.data.create_transform`) for ``model`` at its input size,
    with `preprocess_overrides` applied (``resize`` as ``crop_pct`` with ``crop_mode="center"``).

    Raises
    ------
    ValueError
        ``crop`` differs from the input size, or ``resize`` does not fit it.
    """
    preprocess = preprocess or {}
    native = timm.data.resolve_model_data_config(model)
    size = tuple(getattr(model.patch_embed, "img_size", None) or native["input_size"][1:])
    args = {"input_size": (native["input_size"][0], *size)}
    args.update({key: preprocess[key] for key in ("interpolation", "mean", "std") if key in preprocess})
    if "crop" in preprocess and tuple(preprocess["crop"]) != size:
        raise ValueError(f"preprocessing crop={_text(preprocess['crop'])} differs from the model's input size "
                         f"{size[0]}x{size[1]}; the crop is the input size, so give one of them")
    if "resize" in preprocess:
        _check_resize(preprocess["resize"], size)
        args.update(crop_pct=crop_pct(size[0], preprocess["resize"]), crop_mode="center")
    return timm.data.resolve_model_data_config(model, args=args)


def parse_img_size(value) -> tuple[int, int] | None:
    """An input size (``N`` or ``H,W`` text, an int, or (height, width)) as (height, width) in pixels.

    Raises
    ------
    ValueError
        Not one or two positive integers.
    """
    if value is None:
        return None
    try:
        return tuple(_size(value))
    except (TypeError, ValueError):
        raise ValueError(f"--img-size must be N or H,W in pixels (positive integers), got {value!r}") from None


def parse_timm_options(text: str | None) -> dict:
    """Command-line ``key=value,...`` extra options of `timm.create_model`; values are Python literals, else strings.

    Raises
    ------
    ValueError
        A part without ``key=``, an empty key, or a key dynamo sets itself (`TIMM_RESERVED`).
    """
    if not text:
        return {}
    options = {}
    for part in (part.strip() for part in str(text).split(",")):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ValueError(f"--timm takes key=value pairs such as global_pool=map,depth=2; cannot read {part!r}")
        try:
            options[key] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            options[key] = value.strip()
    reserved = sorted(set(options) & TIMM_RESERVED)
    if reserved:
        raise ValueError(f"--timm {', '.join(reserved)}: set by dynamo itself (use --img-size, --checkpoint or "
                         "--no-pretrained instead)")
    return options


def parse_preprocess(text: str | None) -> dict:
    """Command-line ``key=value,...`` preprocessing overrides as raw values; a part without ``=`` continues
    the previous key's value (``mean=0.485,0.456,0.406``).

    Raises
    ------
    ValueError
        A part before any ``key=``, or an empty value.
    """
    overrides = {}
    for part in re.split(r",(?=[^,]*=)", text or ""):
        key, has_value, value = part.partition("=")
        if not has_value:
            if key.strip(", "):
                raise ValueError(f"--preprocess takes key=value pairs ({', '.join(PREPROCESS_KEYS)}), got {text!r}")
            continue
        overrides[key.strip()] = [v.strip() for v in value.split(",") if v.strip()]
    empty = [key for key, values in overrides.items() if not values]
    if empty:
        raise ValueError(f"--preprocess {empty[0]}= needs a value, got {text!r}")
    return {key: values[0] if len(values) == 1 else values for key, values in overrides.items()}


def preprocess_overrides(preset: str | None = None, overrides: dict | str | None = None) -> dict:
    """The overrides of a preset (a name in `PRESETS`), with ``overrides`` on top, checked and typed.

    ``overrides`` (a dict, or text for `parse_preprocess`) may set ``resize`` (the shorter side
    before the centre crop), ``crop`` (N or H,W: the input size), ``interpolation`` (a timm name),
    ``mean`` and ``std`` (three numbers or a name in `STATISTICS`).

    Raises
    ------
    ValueError
        Unknown preset or key, or a value of the wrong kind.
    """
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preprocessing preset {preset!r}; presets: {', '.join(PRESETS)}")
    given = parse_preprocess(overrides) if isinstance(overrides, str) else dict(overrides or {})
    merged = {**PRESETS.get(preset, {}), **given}
    unknown = sorted(set(merged) - set(PREPROCESS_KEYS))
    if unknown:
        raise ValueError(f"unknown preprocessing key {unknown[0]!r}; keys: {', '.join(PREPROCESS_KEYS)}")
    checked = {}
    for key, value in merged.items():
        check, kind = _PREPROCESS_CHECKS[key]
        try:
            checked[key] = check(value)
        except (TypeError, ValueError, KeyError):
            raise ValueError(f"preprocessing {key}={_text(value)} is not {kind}") from None
    if "resize" in checked and "crop" in checked:
        _check_resize(checked["resize"], checked["crop"])
    return checked


def crop_pct(crop: int, resize: int) -> float:
    """timm's ``crop_pct`` that resizes to exactly ``resize`` (timm's ``floor(crop / crop_pct)``) before cropping ``crop``."""
    pct = crop / resize
    while math.floor(crop / pct) < resize:
        pct = math.nextafter(pct, 0.0)
    return pct


def _check_resize(resize: int, crop) -> None:
    """Refuse a ``resize`` that timm's centre crop cannot take: a non-square crop, or one larger than ``resize``."""
    if crop[0] != crop[1]:
        raise ValueError(f"preprocessing resize= needs a square crop, got crop={_text(crop)}; drop resize= "
                         "(the crop is then taken after timm's own resize)")
    if resize < crop[0]:
        raise ValueError(f"preprocessing resize={resize} is smaller than crop={crop[0]}; the image is resized, "
                         "then the centre crop taken, so resize must be at least the crop")


def _image_size(img_size, preprocess: dict) -> tuple[int, int] | None:
    """The (height, width) to build the model for: ``img_size``, else the crop of ``preprocess``."""
    img_size, crop = parse_img_size(img_size), preprocess.get("crop")
    crop = None if crop is None else tuple(crop)
    if img_size is not None and crop is not None and img_size != crop:
        raise ValueError(f"--img-size {img_size[0]},{img_size[1]} differs from the preprocessing crop "
                         f"{crop[0]},{crop[1]}; the crop is the model's input size, so give one of them")
    return img_size or crop


def _check_patch_grid(module: nn.Module, name: str) -> None:
    """Refuse an input size that the patch size does not divide (timm would drop the remainder)."""
    if getattr(module.patch_embed, "img_size", None) is None:
        return
    size, patch = tuple(module.patch_embed.img_size), tuple(module.patch_embed.patch_size)
    if any(s % p for s, p in zip(size, patch)):
        fits = "x".join(str(s - s % p) for s, p in zip(size, patch))
        raise ModelLoadError(
            f"image size {size[0]}x{size[1]} is not a multiple of {name}'s patch size {patch[0]}x{patch[1]}; "
            f"the last pixels would be dropped: use --img-size {fits.replace('x', ',')} (or another multiple)"
        )


def _positive_int(value) -> int:
    number = float(value)
    if not number.is_integer() or number <= 0:
        raise ValueError
    return int(number)


def _size(value) -> list[int]:
    """``N``, ``H,W``, a number or a sequence of one or two as [height, width]."""
    parts = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
    sizes = [_positive_int(part) for part in parts]
    if len(sizes) not in (1, 2):
        raise ValueError
    return sizes * (3 - len(sizes))


def _statistics(index: int):
    def check(value):
        if isinstance(value, str) and value.lower() in STATISTICS:
            return list(STATISTICS[value.lower()][index])
        values = [float(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
        if len(values) != 3 or (index == 1 and min(values) <= 0):
            raise ValueError
        return values
    return check


def _interpolation(value) -> str:
    str_to_interp_mode(value)  # KeyError for anything timm does not know
    return value


_PREPROCESS_CHECKS = {
    "resize": (_positive_int, "a positive integer (the shorter side, in pixels)"),
    "crop": (_size, "N or H,W in pixels"),
    "interpolation": (_interpolation, "one of bilinear, bicubic, nearest, lanczos, box, hamming"),
    "mean": (_statistics(0), f"three numbers or one of {', '.join(STATISTICS)}"),
    "std": (_statistics(1), f"three positive numbers or one of {', '.join(STATISTICS)}"),
}


def _text(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _create_timm_model(name: str, checkpoint, pretrained: bool, **timm_kwargs) -> nn.Module:
    if not timm.is_model(name):
        family = [m for m in timm.list_models() if m.split("_")[0] == name.split("_")[0]]
        close = difflib.get_close_matches(name, family or timm.list_models(), n=5, cutoff=0.3)
        raise ModelLoadError(
            f"unknown model {name!r}: neither a timm model name nor a zoo name "
            f"({', '.join(zoo.list_models())}). Similar timm names: {', '.join(close) or 'none'}"
        )
    if checkpoint is not None:
        return _create_from_checkpoint(name, Path(checkpoint), **timm_kwargs)
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


def _create_from_checkpoint(name: str, path: Path, **timm_kwargs) -> nn.Module:
    """Build ``name`` with weights from a local file as timm loads pretrained weights (``pretrained_cfg_overlay``).

    ``num_classes`` is set in the overlay too, so that timm never drops a checkpoint's head for a random one.
    """
    if path.is_dir():
        raise ModelLoadError(f"checkpoint {path} is a folder; pass the weights file inside it (.safetensors, .pth)")
    if not path.is_file():
        raise ModelLoadError(f"checkpoint {path} does not exist")
    from dynamo import convert  # transformers state dicts and ONNX exports; convert imports this module

    if convert.is_transformers_checkpoint(path):
        return convert.create_converted(name, path, **timm_kwargs)
    _check_readable(path)
    overlay = {"file": str(path), **({"num_classes": timm_kwargs["num_classes"]} if "num_classes" in timm_kwargs else {})}
    try:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **timm_kwargs)
    except SafetensorError as error:
        raise _unreadable(path, error) from error
    except Exception as error:  # the file reads: what fails now is fitting it to the model
        text = " ".join(str(error).split())
        detail = (summarize_mismatch(str(error)) if "Error(s) in loading state_dict" in text
                  else f"timm could not convert it ({type(error).__name__}: {text[:200]}); check that it holds "
                  "weights of this architecture")
        raise ModelLoadError(f"checkpoint {path} does not fit {name}: {detail}") from error


def _check_readable(path: Path) -> None:
    """Read a checkpoint's structure without its data (safetensors header; torch pickle with tensors
    on the meta device, ``weights_only=True`` and timm's one allowed global), or raise `ModelLoadError`."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt"):
                pass
        else:
            with torch.serialization.safe_globals([argparse.Namespace]):  # as timm's reader: training args
                torch.load(path, map_location="meta", weights_only=True)
    except Exception as error:  # unpickling refused, not a torch or safetensors file, truncated
        raise _unreadable(path, error) from error


def _unreadable(path: Path, error: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"cannot read checkpoint {path}: {unreadable_reason(error)}. dynamo loads safetensors files, or torch "
        "files that hold only tensors (read with weights_only=True); re-save the state dict with safetensors.torch.save_file"
    )


def unreadable_reason(error: Exception) -> str:
    """Why a torch or safetensors file could not be read, in a few words (never torch's advice to unpickle)."""
    text = str(error)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:  # a pickle of objects other than tensors (torch's weights-only reader refused it)
        return f"it holds Python objects other than tensors ({found.group(1)}), which dynamo never unpickles"
    if isinstance(error, SafetensorError) or "safetensor" in text.lower():
        return "it is not a valid safetensors file (damaged, truncated or another format)"
    return "it is not a torch file of tensors (damaged, truncated, text or another format)"


def summarize_mismatch(message: str) -> str:
    """One line from torch's ``load_state_dict`` error: the first mismatching key (with both
    shapes for a size mismatch) and how many others there are."""
    shapes = re.findall(r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[[^\]]*\])\) "
                        r"from checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)", message)
    missing = re.findall(r'"([^"]+)"', "".join(re.findall(r"Missing key\(s\) in state_dict: (.*)", message)))
    unexpected = re.findall(r'"([^"]+)"', "".join(re.findall(r"Unexpected key\(s\) in state_dict: (.*)", message)))
    problems = ([f"{key} has shape {ours} in the checkpoint and {theirs} in the model" for key, ours, theirs in shapes]
                + [f"{key} is missing from the checkpoint" for key in missing]
                + [f"the checkpoint has {key}, which the model has not" for key in unexpected])
    if not problems:
        return message.strip().splitlines()[0][:300]
    others = f"; and {len(problems) - 1} other mismatching keys" if len(problems) > 1 else ""
    return f"{problems[0]}{others}. Check that it holds weights of this architecture, size and head"


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to the Hugging Face hub endpoint opens within the timeout."""
    url = urllib.parse.urlparse(hub.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def weights_sha256(model: nn.Module) -> str:
    """sha256 of a model's state dict: every name, dtype, shape and raw byte, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
