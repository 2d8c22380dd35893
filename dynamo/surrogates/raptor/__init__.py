"""Raptor: k shared blocks, applied recurrently with a depth signal, in place of a ViT's L blocks."""

from dynamo.surrogates.raptor.baselines import partition_baselines
from dynamo.surrogates.raptor.block import RaptorBlock
from dynamo.surrogates.raptor.fit import PAPER_RECIPE, RaptorFitter
from dynamo.surrogates.raptor.model import Raptor

__all__ = ["PAPER_RECIPE", "Raptor", "RaptorBlock", "RaptorFitter", "partition_baselines"]
