"""Raptor: k `RaptorBlock`s applied recurrently, each conditioned on the layer it produces, in place of a ViT's L blocks."""

from __future__ import annotations

from torch import nn

from dynamo.stepping import BlockStepper
from dynamo.surrogates.raptor.block import RaptorBlock
from dynamo.surrogates.recurrence import PhaseRecurrence

__all__ = ["Raptor"]


class Raptor(PhaseRecurrence):
    """k Raptor blocks and the router from layer index to block.

    Parameters
    ----------
    partition : Partition, or list of int
        The phases of blocks 1..L (block i, 0-based, serves phase i; phases need not be
        contiguous), or k - 1 increasing router thresholds (empty for k = 1): target layer t goes to
        block i for the first i with t <= thresholds[i], and to the last block when t exceeds them
        all (`dynamo.surrogates.recurrence.PhaseRecurrence`).
    num_layers : int
        L, the teacher's number of blocks; `run` covers layers 0..L.
    block_config : dict
        Keyword arguments of `RaptorBlock` (dim, num_heads, mlp_ratio, mlp, layerscale_init,
        depth_hidden, depth_scaling, norm_eps), the same for every block.
    teacher : BlockStepper, optional
        The ViT whose embedding and head `embed`, `head` and `forward` use (not a submodule).
    """

    name = "Raptor"

    def __init__(self, partition, num_layers: int, block_config: dict, teacher: BlockStepper | None = None):
        super().__init__(partition, num_layers, teacher)
        self.block_config = dict(block_config)
        self.blocks = nn.ModuleList(RaptorBlock(**self.block_config) for _ in range(self.k))

    def apply(self, x, index: int, layer):
        """Block ``index`` (0-based) once, producing ``layer`` (its depth signal): (B, T, D) -> (B, T, D)."""
        return self.blocks[index](x, layer)
