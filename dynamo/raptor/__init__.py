"""Raptor: k shared blocks, applied recurrently with a depth signal, in place of a ViT's L blocks.

The paper's operational test of the Block-Recurrent Hypothesis (spec section 2). Fit with
`RaptorFitter` on a trajectory dataset; the fitted `Raptor` model runs between any two layers and,
with its teacher's embedding and head, as a whole surrogate of the ViT.
"""

from dynamo.metrics import r2_score
from dynamo.raptor.baselines import baseline_partitions, partition_baselines
from dynamo.raptor.block import RaptorBlock
from dynamo.raptor.evaluate import evaluate
from dynamo.raptor.fit import PAPER_RECIPE, RaptorFitter
from dynamo.raptor.model import Raptor

__all__ = ["PAPER_RECIPE", "Raptor", "RaptorBlock", "RaptorFitter", "baseline_partitions", "evaluate", "partition_baselines", "r2_score"]
