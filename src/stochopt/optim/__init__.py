"""stochopt's optimizers, one module per algorithm family."""

from stochopt.optim.adam import Adam, AdamW, QHAdam
from stochopt.optim.adam_variants import AdaBound, NAdam, RAdam
from stochopt.optim.adaptive import Adadelta, Adagrad, RMSprop
from stochopt.optim.lazyadam import LazyAdam
from stochopt.optim.lion import Lion
from stochopt.optim.sgd import QHM, SGD

__all__ = [
    "SGD", "QHM", "Adagrad", "RMSprop", "Adadelta", "Adam", "AdamW", "QHAdam", "NAdam", "RAdam", "AdaBound",
    "Lion", "LazyAdam",
]  # fmt: skip
