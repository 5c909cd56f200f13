"""stochopt: stochastic optimizers for PyTorch, exact and fast, with the tools to train and compare them."""

from stochopt.engine import EngineOptimizer, NonFiniteGradientError
from stochopt.optim import (
    QHM,
    SGD,
    AdaBound,
    Adadelta,
    Adagrad,
    Adam,
    AdamW,
    LazyAdam,
    Lion,
    NAdam,
    QHAdam,
    RAdam,
    RMSprop,
)
from stochopt.registry import create_optimizer, list_optimizers, optimizer_entry, register

__version__ = "0.1.0"

__all__ = [
    "QHM", "SGD", "AdaBound", "Adadelta", "Adagrad", "Adam", "AdamW", "LazyAdam", "Lion", "NAdam", "QHAdam",
    "RAdam", "RMSprop", "EngineOptimizer", "NonFiniteGradientError", "create_optimizer", "list_optimizers",
    "optimizer_entry", "register", "__version__",
]  # fmt: skip
