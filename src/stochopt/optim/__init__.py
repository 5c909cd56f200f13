"""stochopt's optimizers, one module per algorithm family.

Validation is stricter than torch.optim's where torch's accepted values can only give NaN or nonsense: an
``eps`` that guards a denominator must be > 0 (torch.optim accepts 0, which computes 0/0 on a coordinate whose
gradient has always been 0), and so must Adafactor's ``eps1`` and ``eps2``. Every refusal names the argument
and the value.
"""

from stochopt.optim.adafactor import Adafactor
from stochopt.optim.adafisher import AdaFisher
from stochopt.optim.adam import Adam, AdamW, QHAdam
from stochopt.optim.adam_variants import AdaBound, NAdam, RAdam
from stochopt.optim.adaptive import Adadelta, Adagrad, RMSprop
from stochopt.optim.ademamix import AdEMAMix
from stochopt.optim.adopt import ADOPT
from stochopt.optim.centralization import gradient_centralization
from stochopt.optim.layerwise import Lamb, Lars
from stochopt.optim.lazyadam import LazyAdam
from stochopt.optim.lion import Lion
from stochopt.optim.lookahead import Lookahead
from stochopt.optim.mars import MARS
from stochopt.optim.muon import Muon, muon_param_groups, newton_schulz
from stochopt.optim.newton import BaselineRun, Newton, lbfgs, newton
from stochopt.optim.prodigy import Prodigy
from stochopt.optim.ranger import Ranger
from stochopt.optim.schedulefree import AdamWScheduleFree, SGDScheduleFree, update_bn_at_x
from stochopt.optim.sgd import QHM, SGD
from stochopt.optim.shampoo import Shampoo
from stochopt.optim.soap import SOAP

__all__ = [
    "SGD", "QHM", "Adagrad", "RMSprop", "Adadelta", "Adam", "AdamW", "QHAdam", "NAdam", "RAdam", "AdaBound",
    "Lion", "LazyAdam", "Lamb", "Lars", "Adafactor", "Ranger", "Lookahead",
    "gradient_centralization",
    "Shampoo", "Muon", "AdaFisher", "muon_param_groups", "newton_schulz", "newton", "lbfgs", "BaselineRun",
    "Newton",
    "AdEMAMix", "ADOPT", "MARS",
    "AdamWScheduleFree", "SGDScheduleFree", "update_bn_at_x",
    "SOAP",
    "Prodigy",
]  # fmt: skip
