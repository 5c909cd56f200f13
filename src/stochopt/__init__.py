"""stochopt: stochastic optimizers for PyTorch, exact and fast, with the tools to train and compare them."""

from stochopt.engine import EngineOptimizer, NonFiniteGradientError
from stochopt.extras import installed_version
from stochopt.optim import (
    ADOPT,
    MARS,
    QHM,
    SGD,
    SOAP,
    AdaBound,
    Adadelta,
    Adafactor,
    AdaFisher,
    Adagrad,
    Adam,
    AdamW,
    AdamWScheduleFree,
    AdEMAMix,
    Lamb,
    Lars,
    LazyAdam,
    Lion,
    Lookahead,
    Muon,
    NAdam,
    Newton,
    Prodigy,
    QHAdam,
    RAdam,
    Ranger,
    RMSprop,
    SGDScheduleFree,
    Shampoo,
    gradient_centralization,
    muon_param_groups,
    update_bn_at_x,
)
from stochopt.registry import create_optimizer, list_optimizers, optimizer_entry, register
from stochopt.training import EMA, SWA

__version__ = installed_version()

__all__ = [
    "QHM", "SGD", "AdaBound", "Adadelta", "Adagrad", "Adam", "AdamW", "LazyAdam", "Lion", "NAdam", "QHAdam",
    "RAdam", "RMSprop", "Lamb", "Lars", "Adafactor", "Ranger", "Lookahead", "gradient_centralization",
    "SWA", "EMA", "EngineOptimizer", "NonFiniteGradientError", "create_optimizer", "list_optimizers",
    "optimizer_entry", "register", "__version__",
    "Shampoo", "Muon", "AdaFisher", "muon_param_groups", "Newton",
    "AdEMAMix", "ADOPT", "MARS",
    "AdamWScheduleFree", "SGDScheduleFree", "update_bn_at_x",
    "SOAP",
    "Prodigy",
]  # fmt: skip
