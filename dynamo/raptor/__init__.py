"""Raptor: k shared blocks, applied recurrently with a depth signal, in place of a ViT's L blocks.

The paper's operational test of the Block-Recurrent Hypothesis (spec section 2). Fit with
`RaptorFitter` on a trajectory store; the fitted `Raptor` model runs between any two layers and,
with its teacher's embedding and head, as a whole surrogate of the ViT.
"""

from dynamo.raptor.baselines import partition_baselines, random_contiguous_partition, uniform_partition
from dynamo.raptor.block import RaptorBlock
from dynamo.raptor.evaluate import evaluate, r2_score
from dynamo.raptor.fit import RaptorFitter, parse_partition
from dynamo.raptor.model import Raptor

__all__ = [
    "Raptor",
    "RaptorBlock",
    "RaptorFitter",
    "evaluate",
    "parse_partition",
    "partition_baselines",
    "r2_score",
    "random_contiguous_partition",
    "uniform_partition",
]
