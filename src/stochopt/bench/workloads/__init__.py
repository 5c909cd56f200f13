"""The benchmark's workloads: a registry of the built-in ones and loading of a user's by import path.

``load_workload("digits_mlp")`` builds a registered workload; ``load_workload("mypkg.module:MyWorkload")`` imports a
user's :class:`Workload` subclass. Keyword options go to the workload's constructor (``data_dir=`` for real MNIST).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from stochopt.bench.workloads.base import Batch, Workload
from stochopt.bench.workloads.char_gpt import CharGPTWorkload
from stochopt.bench.workloads.common import load_targets
from stochopt.bench.workloads.convex import LeastSquares, Logistic
from stochopt.bench.workloads.ctr import CTR
from stochopt.bench.workloads.online import OnlineConvex
from stochopt.bench.workloads.vision import Autoencoder, DigitsCNN, DigitsMLP

WORKLOADS: dict[str, type[Workload]] = {
    cls.name: cls
    for cls in (
        LeastSquares,
        Logistic,
        DigitsMLP,
        DigitsCNN,
        Autoencoder,
        CharGPTWorkload,
        CTR,
        OnlineConvex,
    )
}

#: the class attributes a workload must set (see :class:`Workload`)
REQUIRED_ATTRIBUTES = ("name", "metric", "target", "max_steps", "eval_every", "batch_size")


def workload_class(spec: str) -> type[Workload]:
    """The class a spec names: a registered name, or an import path ``package.module:ClassName``."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"workload must be a registered name or 'package.module:ClassName', got {spec!r}")
    if ":" not in spec:
        if spec not in WORKLOADS:
            raise ValueError(
                f"unknown workload {spec!r}; known: {', '.join(sorted(WORKLOADS))} "
                "(or give an import path 'package.module:ClassName')"
            )
        return WORKLOADS[spec]
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"workload import path {spec!r} must have the form 'package.module:ClassName'")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # any failure while importing the user's module is the user's spec failing
        reason = f"{type(err).__name__}: {err}"
        raise ValueError(f"workload {spec!r}: cannot import module {module_name!r}: {reason}") from err
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"workload {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not (inspect.isclass(obj) and issubclass(obj, Workload)):
        raise ValueError(f"workload {spec!r} is not a subclass of stochopt.bench.workloads.Workload: {obj!r}")
    if inspect.isabstract(obj):
        missing = ", ".join(sorted(obj.__abstractmethods__))
        raise ValueError(f"workload {spec!r} is abstract: it does not implement {missing}")
    missing_attrs = [a for a in REQUIRED_ATTRIBUTES if not hasattr(obj, a)]
    if missing_attrs:
        raise ValueError(f"workload {spec!r} does not set the class attributes {', '.join(missing_attrs)}")
    return obj


def load_workload(spec: str, **options: Any) -> Workload:
    """An instance of the workload ``spec`` names (see :func:`workload_class`), built with ``options``; ``setup`` is
    left to the caller (the runner calls it once). Bad options give a ValueError naming the workload."""
    cls = workload_class(spec)
    try:
        inspect.signature(cls).bind(**options)
    except TypeError as err:
        raise ValueError(f"workload {spec!r} does not take the options {sorted(options)}: {err}") from err
    return cls(**options)


__all__ = ["WORKLOADS", "Batch", "Workload", "load_targets", "load_workload", "workload_class"]
