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
from analyses.convergence import basins
from analyses.export import export_trajectories, trajectories
from analyses.rank import update_rank
from analyses.tokens import token_dynamics
from analyses.perturbation import perturbation_recovery
from analyses.jacobian import jacobian_spectrum, top_singular_values
from analyses.swap import layer_swap
