"""The Raptor block: a pre-LayerNorm transformer block conditioned on its depth.

Follows the paper's code (``KempnerInstitute/raptor``, ``block.py``; spec section 2.2): LayerNorm,
multi-head attention, LayerScale; LayerNorm, MLP (SwiGLU by default, GELU optional), LayerScale;
and the depth scaling ("t_scale") that makes the recurrent system non-autonomous: a small MLP of
the target layer index t (a raw float, 1..L) gives three gains ``s1, s2, s3`` (each of the model
width), initialised near 1, applied as

    x <- x + s1 * LS1(Attn(LN1(x)))
    x <- x + s2 * LS2(MLP(LN2(x)))
    out = s3 * x
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DepthScaling", "RaptorBlock"]

MLP_KINDS = ("swiglu", "gelu")


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
    layerscale_init : float
        Initial LayerScale value (the paper: 1e-5, so a fresh block is close to the identity).
    depth_hidden : int
        Hidden width of the depth-scaling MLP (the paper: 16).
    depth_scaling : bool
        Whether to use the depth scaling at all (off reproduces the paper's ablation row
        "without depth scaling": the block is then autonomous).
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
    ):
        super().__init__()
        if mlp not in MLP_KINDS:
            raise ValueError(f"mlp must be one of {MLP_KINDS}, got {mlp!r}")
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        hidden = int(dim * mlp_ratio)
        self.mlp_kind = mlp
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.gamma1 = nn.Parameter(torch.full((dim,), float(layerscale_init)))
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * hidden if mlp == "swiglu" else hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.gamma2 = nn.Parameter(torch.full((dim,), float(layerscale_init)))
        self.depth = DepthScaling(dim, depth_hidden) if depth_scaling else None

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.mlp_kind == "swiglu":
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        else:
            h = F.gelu(h)
        return self.fc2(h)

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
        h = self.norm1(x)
        attended = self.attn(h, h, h, need_weights=False)[0]
        if self.depth is None:
            x = x + self.gamma1 * attended
            return x + self.gamma2 * self.mlp(self.norm2(x))
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        s1, s2, s3 = self.depth(t)
        x = x + s1 * (self.gamma1 * attended)
        x = x + s2 * (self.gamma2 * self.mlp(self.norm2(x)))
        return s3 * x
