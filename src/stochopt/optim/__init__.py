"""stochopt's optimizers, one module per algorithm family."""

from stochopt.optim.adafactor import Adafactor
from stochopt.optim.adafisher import AdaFisher
from stochopt.optim.adam import Adam, AdamW, QHAdam
from stochopt.optim.adam_variants import AdaBound, NAdam, RAdam
from stochopt.optim.adaptive import Adadelta, Adagrad, RMSprop
from stochopt.optim.centralization import gradient_centralization
from stochopt.optim.layerwise import Lamb, Lars
from stochopt.optim.lazyadam import LazyAdam
from stochopt.optim.lion import Lion
from stochopt.optim.lookahead import Lookahead
from stochopt.optim.muon import Muon, muon_param_groups, newton_schulz
from stochopt.optim.newton import BaselineRun, Newton, lbfgs, newton
from stochopt.optim.ranger import Ranger
from stochopt.optim.sgd import QHM, SGD
from stochopt.optim.shampoo import Shampoo

__all__ = [
    "SGD", "QHM", "Adagrad", "RMSprop", "Adadelta", "Adam", "AdamW", "QHAdam", "NAdam", "RAdam", "AdaBound",
    "Lion", "LazyAdam", "Lamb", "Lars", "Adafactor", "Ranger", "Lookahead",
    "gradient_centralization",
    "Shampoo", "Muon", "AdaFisher", "muon_param_groups", "newton_schulz", "newton", "lbfgs", "BaselineRun",
    "Newton",
]  # fmt: skip
