"""Surrogates of a ViT's L blocks: one `SurrogateFitter` base (`base`), the shared recurrence, evaluation,
the closed-form and teacher-block rungs, Raptor, and the ε and loop-count measures.
"""

from dynamo.surrogates.base import FITTERS, SurrogateFitter, split_images
from dynamo.surrogates.evaluate import evaluate
from dynamo.surrogates.measures import epsilon, loop_count, loop_schedule
from dynamo.surrogates.raptor import PAPER_RECIPE, Raptor, RaptorBlock, RaptorFitter, partition_baselines
from dynamo.surrogates.recurrence import PhaseRecurrence
from dynamo.surrogates.rungs import (
                                     ALPHAS,
                                     AffineSurrogate,
                                     DMDFitter,
                                     IdentityFitter,
                                     IdentitySurrogate,
                                     LinearFitter,
                                     PhaseSurrogate,
                                     TeacherBlockFitter,
                                     TeacherBlockSurrogate,
                                     TransitionMoments,
                                     per_layer,
                                     rollout_scores,
                                     transition_moments,
)

SURROGATES = {name: FITTERS[name] for name in ("identity", "linear", "dmd", "teacher-block", "raptor")}

__all__ = ["ALPHAS", "PAPER_RECIPE", "SURROGATES", "AffineSurrogate", "DMDFitter", "IdentityFitter", "IdentitySurrogate", "LinearFitter",
           "PhaseRecurrence", "PhaseSurrogate", "Raptor", "RaptorBlock", "RaptorFitter", "SurrogateFitter", "TeacherBlockFitter",
           "TeacherBlockSurrogate", "TransitionMoments", "epsilon", "evaluate", "loop_count", "loop_schedule", "partition_baselines",
           "per_layer", "rollout_scores", "split_images", "transition_moments"]
