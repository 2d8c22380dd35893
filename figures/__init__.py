"""Figures: one plotting function per figure kind; each takes a result and returns a Figure."""

from figures.basins import plot_class_structure, plot_cls_projection, plot_convergence
from figures.jacobian import plot_jacobian_spectrum
from figures.perturbation import plot_perturbation_recovery, plot_recovery_comparison
from figures.rank import plot_update_rank
from figures.similarity import similarity_grid, similarity_heatmap
from figures.swap import plot_layer_swap
from figures.tokens import plot_angular_speed, plot_coherence

__all__ = ["plot_angular_speed", "plot_class_structure", "plot_cls_projection", "plot_coherence", "plot_convergence",
           "plot_jacobian_spectrum", "plot_layer_swap", "plot_perturbation_recovery", "plot_recovery_comparison",
           "plot_update_rank", "similarity_grid", "similarity_heatmap"]
