"""Raptor: k `RaptorBlock`s applied recurrently, each conditioned on the layer it produces, in place of a ViT's L blocks."""

from __future__ import annotations

from torch import nn

from dynamo.stepping import BlockStepper
from dynamo.surrogates.raptor.block import RaptorBlock
from dynamo.surrogates.recurrence import PhaseRecurrence

__all__ = ["Raptor"]


class Raptor(PhaseRecurrence):
    """k Raptor blocks, all built from ``block_config`` (`RaptorBlock`'s keyword arguments), and the router (`PhaseRecurrence`)."""

    name = "Raptor"

    def __init__(self, partition, num_layers: int, block_config: dict, teacher: BlockStepper | None = None):
        super().__init__(partition, num_layers, teacher)
        self.block_config = dict(block_config)
        self.blocks = nn.ModuleList(RaptorBlock(**self.block_config) for _ in range(self.k))

    def apply(self, x, index: int, layer):
        """Block ``index`` (0-based) once, producing ``layer`` (its depth signal): (B, T, D) -> (B, T, D)."""
        return self.blocks[index](x, layer)
