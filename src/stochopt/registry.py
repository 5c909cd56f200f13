"""The registry of optimizers: names, one-line summaries and references, and construction by name."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.optim import Optimizer

from stochopt import optim
from stochopt.training.param_groups import param_groups


@dataclass(frozen=True)
class OptimizerEntry:
    name: str
    cls: type[Optimizer]
    summary: str
    reference: str


_REGISTRY: dict[str, OptimizerEntry] = {}


def register(name: str, cls: type[Optimizer], summary: str, reference: str) -> None:
    """Add an optimizer under ``name`` (lower case); later issues' optimizers register here too."""
    key = name.lower()
    if key in _REGISTRY:
        raise ValueError(f"an optimizer named {name!r} is already registered ({_REGISTRY[key].cls.__qualname__})")
    _REGISTRY[key] = OptimizerEntry(key, cls, summary, reference)


def list_optimizers() -> list[str]:
    """Names of every registered optimizer, in registration order."""
    return list(_REGISTRY)


def optimizer_entry(name: str) -> OptimizerEntry:
    try:
        return _REGISTRY[name.lower()]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(_REGISTRY)}") from None


def params_for_module(cls: type[Optimizer], model: nn.Module) -> Any:
    """What ``cls`` is built with when it is given a model: the class's own ``params_from_module(model)``
    where it defines that hook (Muon: :func:`stochopt.muon_param_groups`, so that embeddings and the output head
    go to AdamW; AdaFisher: the model itself, for its layer hooks); else :func:`stochopt.training.param_groups`
    for optimizers with a ``weight_decay`` (no decay for biases, norm weights and embeddings); else the
    model's parameters."""
    hook = getattr(cls, "params_from_module", None)
    if hook is not None:
        return hook(model)
    return param_groups(model) if "weight_decay" in inspect.signature(cls).parameters else model.parameters()


def create_optimizer(name: str, params: Any, **hyperparameters: Any) -> Optimizer:
    """``create_optimizer("adamw", model.parameters(), lr=3e-4)``: the registered class, built with these.

    ``params`` may be the model itself: see :func:`params_for_module`."""
    entry = optimizer_entry(name)
    if isinstance(params, nn.Module):
        params = params_for_module(entry.cls, params)
    try:
        return entry.cls(params, **hyperparameters)
    except TypeError as err:
        if "unexpected keyword argument" in str(err):
            raise TypeError(f"{entry.cls.__name__}: {err}") from None
        raise


for _name, _cls, _summary, _reference in [
    ("sgd", optim.SGD, "SGD with heavy-ball or Nesterov momentum and L2 weight decay",
     "Robbins & Monro 1951; Polyak 1964; Sutskever et al. 2013"),
    ("qhm", optim.QHM, "quasi-hyperbolic momentum: a weighted mix of the gradient and its EMA",
     "Ma & Yarats 2019, arXiv:1810.06801"),
    ("adagrad", optim.Adagrad, "per-coordinate rates from the sum of squared gradients",
     "Duchi, Hazan & Singer 2011, JMLR 12"),
    ("rmsprop", optim.RMSprop, "rates from an EMA of squared gradients; centered and momentum forms",
     "Tieleman & Hinton 2012; Graves 2013, arXiv:1308.0850"),
    ("adadelta", optim.Adadelta, "unit-corrected rates from EMAs of squared gradients and updates",
     "Zeiler 2012, arXiv:1212.5701"),
    ("adam", optim.Adam, "bias-corrected first and second moments; AMSGrad option",
     "Kingma & Ba 2015, arXiv:1412.6980; Reddi et al. 2018"),
    ("adamw", optim.AdamW, "Adam with decoupled weight decay", "Loshchilov & Hutter 2019, arXiv:1711.05101"),
    ("qhadam", optim.QHAdam, "quasi-hyperbolic Adam: gradient/moment mixes in both moments",
     "Ma & Yarats 2019, arXiv:1810.06801"),
    ("nadam", optim.NAdam, "Adam with Nesterov momentum and momentum decay", "Dozat 2016, ICLR workshop"),
    ("radam", optim.RAdam, "Adam with variance rectification of the adaptive rate",
     "Liu et al. 2020, arXiv:1908.03265"),
    ("adabound", optim.AdaBound, "Adam with rates clipped to bounds converging to SGD's; AMSBound option",
     "Luo et al. 2019, arXiv:1902.09843"),
    ("lion", optim.Lion, "sign of an interpolated momentum; one state tensor",
     "Chen et al. 2023, arXiv:2302.06675"),
    ("lazyadam", optim.LazyAdam, "Adam that updates only the rows of a sparse gradient",
     "Kingma & Ba 2015; torch.optim.SparseAdam; TF Addons LazyAdam"),
    ("lamb", optim.Lamb, "Adam direction scaled per tensor by the trust ratio ||p|| / ||u||",
     "You et al. 2019, arXiv:1904.00962"),
    ("lars", optim.Lars, "momentum SGD with a per-layer rate from ||p|| / ||g||", "You et al. 2017, arXiv:1708.03888"),
    ("adafactor", optim.Adafactor, "factored second moment (O(n+m) state), relative steps, update clipping",
     "Shazeer & Stern 2018, arXiv:1804.04235"),
    ("ranger", optim.Ranger, "RAdam inside Lookahead on centralized gradients, one kernel",
     "Wright 2019; Liu et al. 2020; Zhang et al. 2019; Yong et al. 2020"),
    ("shampoo", optim.Shampoo, "Kronecker-factored L^-1/4 G R^-1/4 per matrix block, grafted to a diagonal step's norm",
     "Gupta, Koren & Singer 2018, arXiv:1802.09568; Anil et al. 2020, arXiv:2002.09018"),
    ("muon", optim.Muon, "Nesterov momentum orthogonalized by Newton-Schulz for matrices; AdamW for the rest",
     "Jordan et al. 2024, kellerjordan.github.io/posts/muon; Liu et al. 2025, arXiv:2502.16982"),
    ("adafisher", optim.AdaFisher, "momentum over the diagonal of a Kronecker-factored Fisher (Linear, Conv2d)",
     "Gomes et al. 2025, ICLR, arXiv:2405.16397"),
    ("ademamix", optim.AdEMAMix, "Adam with a slow EMA mixed into the numerator; alpha and beta3 warm-ups",
     "Pagliardini, Ablin & Grangier 2024, arXiv:2409.03137"),
    ("adopt", optim.ADOPT, "momentum of the gradient normalized by the previous second moment, clipped",
     "Taniguchi et al. 2024, NeurIPS, arXiv:2411.02853"),
    ("mars", optim.MARS, "AdamW on a variance-reduced, norm-clipped gradient g + gamma b/(1-b) (g - g_prev)",
     "Yuan et al. 2024, arXiv:2411.10438"),
    ("adamw_schedulefree", optim.AdamWScheduleFree, "AdamW, no schedule: gradients at y, evaluation at the average x",
     "Defazio et al. 2024, arXiv:2405.15682"),
    ("sgd_schedulefree", optim.SGDScheduleFree, "momentum SGD without a schedule: y interpolates z and its average x",
     "Defazio et al. 2024, arXiv:2405.15682"),
    ("soap", optim.SOAP, "Adam in the eigenbasis of Shampoo's Kronecker factors, refreshed by power iteration + QR",
     "Vyas et al. 2024, arXiv:2409.11321"),
    ("prodigy", optim.Prodigy, "Adam with its step size d estimated as it trains (learning-rate free)",
     "Mishchenko & Defazio 2024, arXiv:2306.06101"),
]:  # fmt: skip
    register(_name, _cls, _summary, _reference)
