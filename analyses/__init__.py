"""Analyses: a trajectory Dataset in, an xarray result out.

Each analysis module has ``DESCRIPTION``, ``compute(ds, ...)`` and ``summarize(result)``.
"""

from analyses import basins, jacobian, perturbation, rank, swap, tokens
from analyses.export import export_trajectories, trajectories
from analyses.jacobian import top_singular_values
from analyses.phases import (
                             boundaries,
                             boundary_stability,
                             choose_k,
                             contiguous_partition,
                             find_phases,
                             maxcut_partition,
                             phase_analysis,
                             phase_scores,
                             thresholds,
)
from analyses.similarity import layer_similarity

__all__ = ["basins", "boundaries", "boundary_stability", "choose_k", "contiguous_partition", "export_trajectories", "find_phases",
           "jacobian", "layer_similarity", "maxcut_partition", "perturbation", "phase_analysis", "phase_scores", "rank", "swap",
           "thresholds", "tokens", "top_singular_values", "trajectories"]
