from figures.dynamics import (
    plot_angular_speed,
    plot_class_structure,
    plot_cls_projection,
    plot_coherence,
    plot_convergence,
    plot_update_rank,
)
from figures.similarity import similarity_grid, similarity_heatmap
from figures.perturbation import (
    plot_jacobian_spectrum,
    plot_layer_swap,
    plot_perturbation_recovery,
    plot_recovery_comparison,
)
