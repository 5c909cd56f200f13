"""Pictures of how optimizers move: paths on 2-D test functions (PNG, GIF), and the seeds' small figures."""

from stochopt.viz.figures import bias_correction, momentum_memory, plot_bias_correction, plot_momentum_memory
from stochopt.viz.functions import FUNCTIONS, Surface, surface
from stochopt.viz.trajectories import animate_paths, parse_optimizer, plot_paths, run_path

__all__ = [
    "bias_correction", "momentum_memory", "plot_bias_correction", "plot_momentum_memory", "FUNCTIONS",
    "Surface", "surface", "animate_paths", "parse_optimizer", "plot_paths", "run_path",
]  # fmt: skip
