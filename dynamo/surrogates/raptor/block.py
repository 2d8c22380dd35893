"""The Raptor block: a pre-LayerNorm timm-style transformer block conditioned on its depth (the paper's ``block.py``).

A small MLP of the target layer index t gives three gains ``s1, s2, s3``, initialised near 1:

    x <- x + s1 * LS1(Attn(LN1(x)))
    x <- x + s2 * LS2(MLP(LN2(x)))
    out = s3 * x
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Attention, LayerScale, Mlp, SwiGLUPacked
from torch import nn

__all__ = ["DepthScaling", "RaptorBlock", "copy_teacher_block", "teacher_mlp"]

MLP_KINDS = ("swiglu", "gelu")
# parameter names of fits saved before the block used timm's layers -> their names now
RENAMED = {"fc1.": "mlp.fc1.", "fc2.": "mlp.fc2.", "gamma1": "ls1.gamma", "gamma2": "ls2.gamma",
           "attn.in_proj_weight": "attn.qkv.weight", "attn.in_proj_bias": "attn.qkv.bias", "attn.out_proj.": "attn.proj."}


class DepthScaling(nn.Module):
    """Three per-feature gains from the target layer index: ``W2 SiLU(W1 t + b1) + b2 + 1``.

    Parameters
    ----------
    dim : int
        Model width D; the output is 3 * D gains.
    hidden : int
        Width of the hidden layer (the paper: 16).
    init_std : float
        Standard deviation of the last layer's weights and bias at initialisation (the paper:
        1e-4), so every gain starts within about 1e-3 of 1.
    """

    def __init__(self, dim: int, hidden: int = 16, init_std: float = 1e-4):
        super().__init__()
        self.hidden = nn.Linear(1, hidden)
        self.out = nn.Linear(hidden, 3 * dim)
        nn.init.normal_(self.out.weight, std=init_std)
        nn.init.normal_(self.out.bias, std=init_std)

    def forward(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gains for target layers ``t``: (B,) floats -> three (B, 1, D) tensors."""
        gains = self.out(F.silu(self.hidden(t.reshape(-1, 1).float()))) + 1.0
        return gains.unsqueeze(1).chunk(3, dim=-1)


class RaptorBlock(nn.Module):
    """One Raptor block, to be applied recurrently over a range of depth.

    Parameters
    ----------
    dim : int
        Width D of the residual stream (the teacher's).
    num_heads : int
        Attention heads (the teacher's by default).
    mlp_ratio : float
        MLP hidden width over D. With ``mlp="swiglu"`` the first linear maps D -> 2 * hidden, as
        in the paper (so a SwiGLU block has about 1.33x the MLP MACs of a GELU one).
    mlp : {"swiglu", "gelu"}
        `timm.layers.SwiGLUPacked` (SiLU of the first half of ``fc1`` gates the second) or
        `timm.layers.Mlp`.
    layerscale_init : float
        Initial LayerScale value (the paper: 1e-5, so a fresh block is close to the identity).
    depth_hidden : int
        Hidden width of the depth-scaling MLP (the paper: 16).
    depth_scaling : bool
        Whether to use the depth scaling at all (off reproduces the paper's ablation row
        "without depth scaling": the block is then autonomous).
    norm_eps : float
        The LayerNorms' epsilon (torch's default; a block copied from a teacher takes the teacher's).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        mlp: str = "swiglu",
        layerscale_init: float = 1e-5,
        depth_hidden: int = 16,
        depth_scaling: bool = True,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        if mlp not in MLP_KINDS:
            raise ValueError(f"mlp must be one of {MLP_KINDS}, got {mlp!r}")
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=True)
        self.ls1 = LayerScale(dim, float(layerscale_init))
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = SwiGLUPacked(dim, 2 * hidden, dim) if mlp == "swiglu" else Mlp(dim, hidden)
        self.ls2 = LayerScale(dim, float(layerscale_init))
        self.depth = DepthScaling(dim, depth_hidden) if depth_scaling else None
        self.register_load_state_dict_pre_hook(_rename_old_keys)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """Apply the block once.

        Parameters
        ----------
        x : torch.Tensor
            (B, T, D) residual stream at layer t - 1.
        t : torch.Tensor or float
            The target layer index (1..L), a scalar or (B,).

        Returns
        -------
        torch.Tensor
            (B, T, D), the block's estimate of layer t.
        """
        attended = self.ls1(self.attn(self.norm1(x)))
        if self.depth is None:
            x = x + attended
            return x + self.ls2(self.mlp(self.norm2(x)))
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        s1, s2, s3 = self.depth(t)
        x = x + s1 * attended
        x = x + s2 * self.ls2(self.mlp(self.norm2(x)))
        return s3 * x


def teacher_mlp(teacher_block: nn.Module) -> dict:
    """``{"mlp": "gelu" | "swiglu", "mlp_ratio": r}``: the `RaptorBlock` MLP of a timm block's shape.

    A gated MLP (``fc1`` twice as wide as ``fc2``'s input, timm's ``SwiGLUPacked``) is "swiglu",
    any other "gelu"; the ratio is the hidden width over the model width, as `RaptorBlock` takes it.
    """
    fc1, fc2 = teacher_block.mlp.fc1, teacher_block.mlp.fc2
    gated = fc1.out_features != fc2.in_features
    return {"mlp": "swiglu" if gated else "gelu", "mlp_ratio": fc2.in_features / fc1.in_features}


@torch.no_grad()
def copy_teacher_block(block: RaptorBlock, teacher_block: nn.Module) -> RaptorBlock:
    """Load a timm ViT block's weights into ``block`` (its depth scaling keeps its near-1 initialisation).

    A ``qkv`` without bias gives zero biases, a block without LayerScale gammas of one.

    Raises
    ------
    ValueError
        The teacher block is not a plain pre-norm ViT block of the same shape and MLP kind (the
        message names the ``mlp``/``mlp_ratio``/``num_heads`` to pass).
    """
    attn, dim = teacher_block.attn, block.norm1.normalized_shape[0]
    unsupported = [name for name in ("q_norm", "k_norm", "norm") if not isinstance(getattr(attn, name, nn.Identity()), nn.Identity)]
    if not hasattr(attn, "qkv") or unsupported or getattr(attn, "num_heads", None) != block.attn.num_heads:
        raise ValueError(
            f"cannot start from the teacher's block: its attention ({type(attn).__name__}"
            f"{', with ' + ', '.join(unsupported) if unsupported else ''}) is not a plain timm Attention with "
            f"{block.attn.num_heads} heads; pass num_heads={getattr(attn, 'num_heads', '?')} or a random init"
        )
    if type(teacher_block.mlp) is not type(block.mlp) or type(getattr(teacher_block.mlp, "act", None)) is not type(block.mlp.act) \
            or teacher_block.mlp.fc1.weight.shape != block.mlp.fc1.weight.shape:
        kind = teacher_mlp(teacher_block)
        raise ValueError(
            f"cannot start from the teacher's block: its MLP ({type(teacher_block.mlp).__name__}, "
            f"{type(getattr(teacher_block.mlp, 'act', None)).__name__}, {teacher_block.mlp.fc1.out_features} hidden) is not "
            f"this block's; pass mlp={kind['mlp']!r} and mlp_ratio={kind['mlp_ratio']:g}"
        )
    defaults = {"attn.qkv.bias": torch.zeros(3 * dim), "ls1.gamma": torch.ones(dim), "ls2.gamma": torch.ones(dim)}
    state = {**defaults, **teacher_block.state_dict()}
    missing, unexpected = block.load_state_dict(state, strict=False)
    if unexpected or any(not key.startswith("depth.") for key in missing):
        raise ValueError(f"cannot start from the teacher's block: its weights {unexpected} have no place in a Raptor "
                         f"block, and {[k for k in missing if not k.startswith('depth.')]} are missing")
    block.norm1.eps, block.norm2.eps = teacher_block.norm1.eps, teacher_block.norm2.eps
    return block


def _rename_old_keys(module, state_dict, prefix, *args) -> None:
    """Load a state dict saved with the block's former names (``fc1``, ``gamma1``, ...)."""
    for key in [key for key in state_dict if key.startswith(prefix)]:
        name = key[len(prefix):]
        old = next((old for old in RENAMED if name.startswith(old)), None)
        if old is not None:
            state_dict[prefix + RENAMED[old] + name[len(old):]] = state_dict.pop(key)
