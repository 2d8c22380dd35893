from figures.basins import plot_class_structure, plot_cls_projection, plot_convergence
from figures.tokens import plot_angular_speed, plot_coherence
from figures.rank import plot_update_rank
from figures.similarity import similarity_grid, similarity_heatmap
from figures.perturbation import plot_perturbation_recovery, plot_recovery_comparison
from figures.jacobian import plot_jacobian_spectrum
from figures.swap import plot_layer_swap
