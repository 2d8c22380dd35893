"""Hugging Face transformers ViT / DINOv2 checkpoints (state dicts and ONNX exports) as timm ViTs, by one table
of parameter names (`RULES`); position embeddings are resampled as the source model resamples them."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from dynamo.models import ModelLoadError, summarize_mismatch

PATCH_WEIGHT = "embeddings.patch_embeddings.projection.weight"
"""The transformers parameter whose name marks a ViT/DINOv2 backbone (and its prefix)."""

TOWER_WEIGHT = "embeddings.patch_embedding.weight"
"""The transformers parameter of CLIP / SigLIP vision towers, which are refused."""

_LAYER = r"(?:encoder\.layer|layers)\.(\d+)"

RULES = [
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.register_tokens", "reg_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (rf"{_LAYER}\.(?:norm1|layernorm_before)\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (rf"{_LAYER}\.attention\.(?:attention\.)?(?:query|key|value|q_proj|k_proj|v_proj)\.(weight|bias)",
     r"blocks.\1.attn.qkv.\2"),
    (rf"{_LAYER}\.attention\.(?:output\.dense|o_proj)\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (rf"{_LAYER}\.layer_scale1\.lambda1", r"blocks.\1.ls1.gamma"),
    (rf"{_LAYER}\.(?:norm2|layernorm_after)\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (rf"{_LAYER}\.(?:mlp\.fc1|mlp\.weights_in|intermediate\.dense)\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (rf"{_LAYER}\.mlp\.(?:gate_proj|up_proj)\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (rf"{_LAYER}\.(?:mlp\.fc2|mlp\.weights_out|mlp\.down_proj|output\.dense)\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (rf"{_LAYER}\.layer_scale2\.lambda1", r"blocks.\1.ls2.gamma"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
]
"""transformers parameter name (without the backbone's prefix; transformers 4's names, as on the
hub, and transformers 5's) → timm name. Query, key and value are stacked, in that order, into
timm's ``qkv``; a SwiGLU's gate and up projections (transformers 5) into its packed ``fc1``."""

STACKED = {"query": "query", "q_proj": "query", "key": "key", "k_proj": "key", "value": "value", "v_proj": "value",
           "gate_proj": "gate", "up_proj": "up"}
"""transformers module → its part of a stacked timm parameter; parts are stacked in `_ORDER`."""

_ORDER = {"attn.qkv": ("query", "key", "value"), "mlp.fc1": ("gate", "up")}

UNUSED = (r"embeddings\.mask_token", r"pooler\.dense\.(weight|bias)")
"""transformers parameters that no forward pass to the last hidden state uses: DINOv2's mask
token (masked training only) and ViT's tanh pooler (after the final norm)."""


@dataclass(frozen=True)
class Resampling:
    """How a source model resamples its patch position embedding: bicubic ``interpolate`` with this ``antialias``."""

    antialias: bool = False


FAMILIES = {
    "vit": (Resampling(antialias=False), 1e-12),
    "dinov2": (Resampling(antialias=False), 1e-6),
    "dinov2_registers": (Resampling(antialias=True), 1e-6),
}
"""transformers family → (its ``interpolate_pos_encoding``, its default ``layer_norm_eps``)."""


def is_transformers_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is an ONNX file or a state dict in transformers' parameter names."""
    path = Path(path)
    if path.suffix == ".onnx":
        return True
    try:
        keys = _state_dict_keys(path)
    except Exception:  # unreadable: the ordinary loader says why
        return False
    return any(k.endswith(PATCH_WEIGHT) or k.endswith(TOWER_WEIGHT) for k in keys)


def create_converted(name: str, path: str | Path, **timm_kwargs) -> nn.Module:
    """Build timm model ``name`` (``vit_small_patch14_dinov2`` for a DINOv2-S/14) with every parameter set from
    a transformers ``.onnx``, ``.safetensors`` or torch state dict; ``num_classes`` defaults to 0 (no classifier).

    Raises
    ------
    ModelLoadError
        A parameter the mapping cannot place, a timm parameter the checkpoint does not set,
        a CLIP / SigLIP tower, or an ONNX file without the ``onnx`` package.
    """
    path = Path(path)
    if path.suffix == ".onnx":
        source, resampling = read_onnx(path)
    else:
        source, resampling = read_state_dict(path), None
    model = timm.create_model(name, pretrained=False, **{"num_classes": 0, **timm_kwargs})
    try:
        weights, family = transformers_to_timm(source, model, resampling)
    except ModelLoadError as error:
        raise ModelLoadError(f"checkpoint {path} does not fit {name}: {error}") from None
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as error:  # a shape mismatch
        raise ModelLoadError(f"checkpoint {path} (a transformers {family} backbone) does not fit {name}: "
                             f"{summarize_mismatch(str(error))}") from None
    if missing or unexpected:
        first = (f"timm's {missing[0]} is set by no parameter of the checkpoint" if missing
                 else f"the checkpoint sets timm's {unexpected[0]}, which {name} has not")
        others = len(missing) + len(unexpected) - 1
        raise ModelLoadError(f"checkpoint {path} (a transformers {family} backbone) does not fit {name}: {first}"
                             + (f"; and {others} other mismatching keys" if others else "")
                             + ". Check that it holds weights of this architecture and size")
    eps = FAMILIES[family][1]
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.eps = eps
    return model


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a torch file of tensors (``weights_only=True``)."""
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as file:
            return {k: file.get_tensor(k) for k in file.keys()}
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def transformers_to_timm(state_dict: dict[str, torch.Tensor], model: nn.Module,
                         resampling: Resampling | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """Rename a transformers backbone's parameters (any prefix before ``embeddings.``) to timm's, with the
    position embedding fitted to ``model``'s grid (by ``resampling``, default the family's transformers code).

    Returns
    -------
    weights : dict
        timm parameter names → tensors.
    family : str
        A key of `FAMILIES`.

    Raises
    ------
    ModelLoadError
        The first parameter the mapping cannot place (or a query/key/value without its siblings).
    """
    if any(k.endswith(TOWER_WEIGHT) for k in state_dict):
        raise ModelLoadError(
            "it is a CLIP / SigLIP vision tower in transformers' names, which dynamo does not convert "
            "(its layers, pre-norm and position table differ from ViTModel/Dinov2Model); use timm's own "
            "OpenCLIP / OpenAI CLIP checkpoint or the hub weights of the timm name")
    prefix = next((k[: -len(PATCH_WEIGHT)] for k in state_dict if k.endswith(PATCH_WEIGHT)), None)
    if prefix is None:
        raise ModelLoadError(f"no {PATCH_WEIGHT}: not a transformers ViTModel/Dinov2Model checkpoint")
    own = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    family = ("dinov2_registers" if "embeddings.register_tokens" in own
              else "dinov2" if any(".layer_scale1." in k or ".norm1." in k for k in own) else "vit")
    weights, stacked = {}, {}
    for key, tensor in own.items():
        if any(re.fullmatch(pattern, key) for pattern in UNUSED):
            continue
        target = next((re.sub(p, t, key) for p, t in RULES if re.fullmatch(p, key)), None)
        if target is None:
            raise ModelLoadError(f"cannot place parameter {prefix}{key} of shape {list(tensor.shape)}: it is "
                                 "not in the ViTModel / Dinov2Model / Dinov2WithRegistersModel mapping")
        if key.split(".")[-2] in STACKED:
            stacked.setdefault(target, {})[STACKED[key.split(".")[-2]]] = tensor
        else:
            weights[target] = tensor
    for target, parts in stacked.items():
        _, block, *module, kind = target.split(".")  # blocks.N.attn.qkv.weight
        module = ".".join(module)
        order = _ORDER[module]
        absent = [part for part in order if part not in parts]
        if absent:
            names = [k for k, v in STACKED.items() if v == absent[0]]
            raise ModelLoadError(f"layer {block} has no {absent[0]} {kind} ({' or '.join(names)}) beside the "
                                 f"other parts of timm's {module}")
        weights[target] = torch.cat([parts[part] for part in order])
    if "pos_embed" in weights and "cls_token" in weights:
        grid = tuple(model.patch_embed.grid_size)
        position = weights.pop("pos_embed")
        patches = resample_position_embedding(position[:, 1:], grid, resampling or FAMILIES[family][0])
        if getattr(model, "no_embed_class", False):  # timm adds no position to prefix tokens: fold cls's in
            weights["cls_token"] = weights["cls_token"] + position[:, :1]
            weights["pos_embed"] = patches
        else:
            weights["pos_embed"] = torch.cat([position[:, :1], patches], dim=1)
    return weights, family


def resample_position_embedding(patches: torch.Tensor, grid: tuple[int, int], resampling: Resampling) -> torch.Tensor:
    """A square grid of patch position embeddings (1, side * side, dim) resampled to ``grid`` (rows, columns) as
    transformers does (bicubic in float32, ``align_corners=False``): (1, rows * columns, dim) in the input's dtype."""
    _, count, dim = patches.shape
    side = math.isqrt(count)
    if side * side != count:
        raise ModelLoadError(f"the position embedding has {count} patch positions, not a square grid")
    if (side, side) == tuple(grid):
        return patches
    square = patches.reshape(1, side, side, dim).permute(0, 3, 1, 2).to(torch.float32)
    resampled = F.interpolate(square, size=tuple(grid), mode="bicubic", align_corners=False,
                              antialias=resampling.antialias)
    return resampled.permute(0, 2, 3, 1).reshape(1, -1, dim).to(patches.dtype)


def read_onnx(path: Path) -> tuple[dict[str, torch.Tensor], Resampling | None]:
    """transformers-named parameters of the backbone in an ONNX export, and its position resampling.

    Named initializers keep their names; a ``.../<module>/MatMul`` node's initializer gives
    ``<module>.weight`` (transposed); the position embeddings are the unnamed initializers that a
    ``Concat`` and a ``Reshape`` in the ``embeddings`` scope read, resampled by the ``Resize`` there.

    Raises
    ------
    ModelLoadError
        ``onnx`` is not installed, the file is not an ONNX model, or its resampling is not
        bicubic with half-pixel centres.
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise ModelLoadError(f"reading the ONNX checkpoint {path} needs the onnx package: pip install onnx") from None
    try:
        graph = onnx.load(str(path)).graph
    except Exception as error:
        raise ModelLoadError(f"cannot read ONNX checkpoint {path}: {str(error).strip()[:200]}") from None
    initializers = {i.name: i for i in graph.initializer}

    def tensor(name):
        return torch.from_numpy(numpy_helper.to_array(initializers[name]).copy())

    patch = next((n for n in initializers if n.endswith(PATCH_WEIGHT) or n.endswith(TOWER_WEIGHT)), None)
    if patch is None:
        raise ModelLoadError(f"ONNX checkpoint {path} has no initializer named ...{PATCH_WEIGHT}: not an "
                             "export of a transformers ViTModel / Dinov2Model")
    prefix = patch[: -len(PATCH_WEIGHT if patch.endswith(PATCH_WEIGHT) else TOWER_WEIGHT)]
    scope = "/" + prefix.replace(".", "/")
    named = [n for n in initializers if n.startswith(prefix) and not n.startswith(("onnx::", "/"))]
    state = {n: tensor(n) for n in named}
    resampling, position = None, {}
    for node in graph.node:
        if not node.name.startswith(scope):
            continue
        if node.op_type == "MatMul" and node.name.endswith("/MatMul") and node.input[1] in initializers:
            module = node.name[1: -len("/MatMul")].replace("/", ".")
            state[f"{module}.weight"] = tensor(node.input[1]).T.contiguous()
        elif node.name.startswith(f"{scope}embeddings/"):
            embedding = [i for i in node.input if i in initializers and i not in state
                         and len(initializers[i].dims) == 3 and initializers[i].dims[0] == 1]
            if node.op_type == "Concat" and embedding and initializers[embedding[0]].dims[1] == 1:
                position["cls"] = tensor(embedding[0])
            elif node.op_type == "Reshape" and embedding and initializers[embedding[0]].dims[1] > 1:
                position["patches"] = tensor(embedding[0])
            elif node.op_type == "Resize":
                resampling = _onnx_resampling(node, path)
    if f"{prefix}embeddings.position_embeddings" not in state and len(position) == 2:
        state[f"{prefix}embeddings.position_embeddings"] = torch.cat([position["cls"], position["patches"]], dim=1)
    return state, resampling


def _onnx_resampling(node, path: Path) -> Resampling:
    """The `Resampling` of an ONNX ``Resize`` node, if it is torch's bicubic to a size."""
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    mode, transform = attrs.get("mode", b"nearest").decode(), attrs.get("coordinate_transformation_mode", b"half_pixel").decode()
    by_size = len(node.input) > 3 and node.input[3] != ""
    if (mode != "cubic" or transform not in ("half_pixel", "pytorch_half_pixel") or not by_size
            or abs(attrs.get("cubic_coeff_a", -0.75) + 0.75) > 1e-9 or attrs.get("exclude_outside", 0)):
        raise ModelLoadError(
            f"ONNX checkpoint {path} resamples its position embedding in {node.name} by {mode} "
            f"({transform}, {'sizes' if by_size else 'scales'}); dynamo reproduces only bicubic resampling "
            "to a size with half-pixel centres (transformers' interpolate_pos_encoding)")
    return Resampling(antialias=bool(attrs.get("antialias", 0)))


def _state_dict_keys(path: Path) -> list[str]:
    """Parameter names of a safetensors or torch state dict, without reading the data."""
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as file:
            return list(file.keys())
    state = torch.load(path, map_location="meta", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else {}
    return [k for k in state if isinstance(k, str)]
