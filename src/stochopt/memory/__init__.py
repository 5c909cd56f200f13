"""Training-memory estimates: model states from the optimizers' declared state layouts, transformer
activations after Korthikanti et al. (2022), ZeRO partitioning after Rajbhandari et al. (2019)."""

from stochopt.memory.estimate import (
    GPT2,
    LEAN_OPTIONS,
    MemoryEstimate,
    Transformer,
    compare,
    estimate,
    lean_options,
    load_module,
    measure_activations,
)
from stochopt.memory.layouts import TORCH_LAYOUTS, optimizer_layout
from stochopt.memory.report import format_table, plot_memory

__all__ = [
    "GPT2", "LEAN_OPTIONS", "MemoryEstimate", "Transformer", "compare", "estimate", "lean_options", "load_module",
    "measure_activations",
    "TORCH_LAYOUTS", "optimizer_layout", "format_table", "plot_memory",
]  # fmt: skip
