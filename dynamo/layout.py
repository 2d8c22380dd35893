"""Token layout of a ViT-family model, read off timm's own attributes, and dynamo's one vocabulary.

Token kinds, the reduced views stored beside ``hidden`` and the dimension names results use: ``image``,
``layer`` (0..L), ``block`` (1..L, for one-step quantities), ``token`` (with ``token_kind``), ``feature``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the layout is read from a model, but the vocabulary needs no torch
    from torch import nn

TOKEN_KINDS = ("cls", "dist", "register", "patch")
REDUCED_VIEWS = ("cls", "patch_mean", "register_mean")  # per-layer summaries stored beside `hidden`
ALL_TOKENS = "all"  # the token_kind label of a quantity pooled over every token
PAPER_TOKENS = "cls+patch_mean"  # the paper's token view: the cls token and the patch mean, averaged
CLS_LESS_TOKENS = "patch_mean"  # the view of a model without a cls token (SigLIP, gap and map-pooled ViTs)


class NotAViTError(TypeError):
    """The model is not a ViT-family transformer that dynamo can record."""


@dataclass(frozen=True)
class TokenLayout:
    """Where each token sits in the residual stream: timm's ``[cls, dist, registers...]``, then patches row-major over ``grid``."""

    has_cls: bool
    has_dist: bool
    num_registers: int
    grid: tuple[int, int]

    @property
    def num_prefix(self) -> int:
        """Number of tokens before the first patch token."""
        return int(self.has_cls) + int(self.has_dist) + self.num_registers

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        return self.num_prefix + self.num_patches

    def token_kind(self) -> np.ndarray:
        """Kind of every token, shape (T,), values in ``TOKEN_KINDS``."""
        kinds = ["cls"] * self.has_cls + ["dist"] * self.has_dist + ["register"] * self.num_registers
        return np.array(kinds + ["patch"] * self.num_patches, dtype=object).astype(str)

    def patch_rows_cols(self) -> tuple[np.ndarray, np.ndarray]:
        """Patch row and column of every token, shape (T,) each; -1 for prefix tokens."""
        rows, cols = np.divmod(np.arange(self.num_patches), self.grid[1])
        pad = np.full(self.num_prefix, -1)
        return np.concatenate([pad, rows]), np.concatenate([pad, cols])

    def indices(self, kind: str) -> np.ndarray:
        """Sequence positions of the tokens of one kind, shape (n,)."""
        if kind not in TOKEN_KINDS:
            raise ValueError(f"unknown token kind {kind!r}; expected one of {TOKEN_KINDS}")
        return np.flatnonzero(self.token_kind() == kind)

    def to_attrs(self) -> dict:
        """Plain-JSON description, as stored in a trajectory dataset's attrs."""
        return {
            "has_cls": self.has_cls,
            "has_dist": self.has_dist,
            "num_registers": self.num_registers,
            "num_prefix_tokens": self.num_prefix,
            "patch_grid": list(self.grid),
        }


def token_kinds(token_kind) -> np.ndarray:
    """A store's or result's ``token_kind`` values as a plain ``str`` array (zarr may give StringDType)."""
    values = np.asarray(getattr(token_kind, "values", token_kind))
    return np.array([str(v) for v in values.ravel()], dtype=str).reshape(values.shape)


def default_tokens(ds, tokens: str | None = None) -> str:
    """The token view a layer measure reads: ``tokens`` if given, else ``cls+patch_mean``, or ``patch_mean`` without a cls token."""
    if tokens:
        return tokens
    has_cls = ds.attrs.get("has_cls")
    if has_cls is None:
        has_cls = "cls" in ds.data_vars or ("token_kind" in ds.coords and "cls" in token_kinds(ds["token_kind"]))
    return PAPER_TOKENS if has_cls else CLS_LESS_TOKENS


POOLING_WORDS = {
    "map": "it pools by attention (map), whose pooled token is computed from the last layer only and is not a "
           "token of the residual stream",
    "avg": "it pools by averaging its patch tokens (avg)",
}
"""Why the patch mean stands for a cls-less model's readout, by its timm ``global_pool``."""


def describe_tokens(ds, tokens: str) -> str:
    """A token view in words, with the reason it is the model's default where it is.

    Parameters
    ----------
    ds : xarray.Dataset
        A trajectory dataset (its ``has_cls``, ``global_pool`` and ``timm_options`` attrs).
    tokens : str
        The view read (`default_tokens`).

    Returns
    -------
    str
        ``tokens`` followed by its reason in parentheses.
    """
    if tokens != default_tokens(ds):
        return f"{tokens} (chosen with --tokens)"
    if tokens == PAPER_TOKENS:
        return f"{tokens} (the paper's [cls, patch mean])"
    pool = ds.attrs.get("global_pool") or (ds.attrs.get("timm_options") or {}).get("global_pool")
    reason = f"; {POOLING_WORDS[pool]}" if pool in POOLING_WORDS else ""
    return f"{tokens} (the model has no cls token{reason})"


def token_groups(token_kind, *, pooled: bool = False) -> dict[str, np.ndarray]:
    """Positions along ``token`` of each kind present in ``token_kind`` (T,), in `TOKEN_KINDS` order; ``pooled`` puts ``all`` first."""
    kinds = token_kinds(token_kind)
    groups = {ALL_TOKENS: np.arange(kinds.size)} if pooled else {}
    groups.update({kind: np.flatnonzero(kinds == kind) for kind in TOKEN_KINDS if (kinds == kind).any()})
    return groups


def token_layout(model: nn.Module) -> TokenLayout:
    """Read the token layout of a timm ViT-family model; raises `NotAViTError` for a model without a ViT's parts."""
    check_is_vit(model)
    has_cls = getattr(model, "cls_token", None) is not None
    has_dist = getattr(model, "dist_token", None) is not None
    num_prefix = int(model.num_prefix_tokens)
    num_registers = num_prefix - int(has_cls) - int(has_dist)
    declared = getattr(model, "num_reg_tokens", None)
    if declared is not None and declared != num_registers:
        raise NotAViTError(
            f"{type(model).__name__}: num_prefix_tokens={num_prefix} does not add up to "
            f"cls={has_cls} + dist={has_dist} + num_reg_tokens={declared}; "
            "dynamo cannot tell which prefix token is which"
        )
    grid = tuple(int(g) for g in model.patch_embed.grid_size)
    return TokenLayout(has_cls, has_dist, num_registers, grid)


def check_is_vit(model: nn.Module) -> None:
    """Raise `NotAViTError` unless the model is a ViT-family transformer dynamo can hook."""
    name = type(model).__name__
    missing = [
        attr for attr in ("patch_embed", "blocks", "num_prefix_tokens") if not hasattr(model, attr)
    ]
    if missing:
        raise NotAViTError(
            f"{name} is not a ViT-family transformer: it has no {', '.join(missing)}. dynamo "
            "records timm models whose residual stream is a token sequence passed through "
            "`model.blocks` (vit_*, deit_*, DINOv2, eva, ...); CNNs and hybrid stage-wise "
            "models such as Swin are not supported."
        )
    from torch import nn

    if not isinstance(model.blocks, (nn.Sequential, nn.ModuleList)) or len(model.blocks) == 0:
        raise NotAViTError(
            f"{name}.blocks is a {type(model.blocks).__name__}, not a non-empty sequence of "
            "transformer blocks; dynamo cannot record its layers"
        )
    if hasattr(model, "blocks_token_only") or hasattr(model, "local_up_to_layer"):
        raise NotAViTError(
            f"{name} adds its class token partway through depth (CaiT's class-attention blocks, ConViT's "
            "local_up_to_layer), so its blocks do not all see the same tokens; dynamo records models whose "
            "token layout is fixed through depth (vit_*, deit_*, DINOv2, eva, ...)"
        )
    if getattr(model.patch_embed, "grid_size", None) is None:
        raise NotAViTError(f"{name}.patch_embed has no grid_size; cannot lay out patch tokens")
