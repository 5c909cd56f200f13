"""Algorithms as data: an optimizer, its hyperparameters, its schedule, and a search space, read from one file.

A search-space file (TOML, or JSON with the same keys) describes one algorithm::

    description = "NAdamW, the AlgoPerf baseline"
    optimizer = "nadam"                  # a registered name, torch.optim.AdamW, or package.module:Class
    sparse_gradients = false             # ask the workload for sparse embedding gradients (LazyAdam)
    [fixed]                              # passed to the optimizer unchanged, never tuned
    decoupled_weight_decay = true
    [schedule]                           # stochopt.training.WarmupDecayLR: linear warmup, then decay
    decay = "cosine"                     # cosine | linear | sqrt | constant
    final_lr_ratio = 0.0
    [defaults]                           # self-tuning ruleset: these values; external tuning: untuned keys
    lr = 2e-3
    one_minus_beta1 = 0.1
    [search]                             # external tuning: quasirandom search over these ranges
    lr = { low = 1e-4, high = 3e-2, log = true }

Hyperparameter names are the optimizer's keyword arguments, with three conveniences: ``one_minus_X`` is tuned on
its own (log) scale and passed as ``X = 1 - value``; ``beta1``/``beta2`` become ``betas=(beta1, beta2)`` when the
optimizer takes ``betas`` (and ``beta3`` a third member, AdEMAMix's); ``X_steps_fraction`` is a step count
relative to the trial's step budget, passed as ``X = max(1, round(value * max_steps))`` (AdEMAMix's warm-ups,
which its paper sets to the length of training); and the runner's own knobs ``warmup_fraction``, ``batch_size``
and ``clip_norm`` (gradient-norm clipping, ``torch.nn.utils.clip_grad_norm_``) are not passed to the optimizer.
"""

from __future__ import annotations

import importlib
import importlib.resources
import inspect
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from torch.optim import Optimizer

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

#: the suffix of a step count given as a fraction of the trial's step budget
STEPS_FRACTION = "_steps_fraction"
#: hyperparameters the runner consumes itself rather than passing to the optimizer
RUNNER_KEYS = ("warmup_fraction", "batch_size", "clip_norm")
DECAYS = ("cosine", "linear", "sqrt", "constant")
#: the AlgoPerf baselines: targets are calibrated with these, speed-ups are reported against the first
BASELINES = ("nadamw", "adamw", "heavy_ball", "nesterov")
#: used for an optimizer given by import path without a search-space file
GENERIC_SEARCH = {"lr": {"low": 1e-4, "high": 1e-1, "log": True}}


@dataclass(frozen=True)
class Range:
    """One searched hyperparameter: uniform on [low, high], or log-uniform when ``log``; ``integer`` rounds."""

    low: float
    high: float
    log: bool = False
    integer: bool = False


@dataclass(frozen=True)
class Algorithm:
    """A training algorithm: optimizer class (by spec), fixed options, schedule, defaults and search space."""

    name: str
    optimizer: str
    description: str = ""
    fixed: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)
    search: dict[str, Range] = field(default_factory=dict)
    decay: str = "cosine"
    final_lr_ratio: float = 0.0
    sparse_gradients: bool = False
    source: str = ""

    def point(self, searched: dict[str, Any] | None = None) -> dict[str, Any]:
        """Defaults overridden by ``searched`` values: one full hyperparameter point."""
        return {**self.defaults, **(searched or {})}


def resolve_optimizer(spec: str) -> type[Optimizer]:
    """A registered name (``adamw``), a dotted path (``torch.optim.AdamW``) or ``package.module:Class``."""
    from stochopt.registry import list_optimizers, optimizer_entry

    if ":" not in spec and "." not in spec:
        if spec.lower() in list_optimizers():
            return optimizer_entry(spec).cls
        raise ValueError(
            f"unknown optimizer {spec!r}: not a registered name ({', '.join(list_optimizers())}) "
            "nor an import path such as torch.optim.AdamW or package.module:Class"
        )
    module_name, _, attr = spec.partition(":") if ":" in spec else spec.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import optimizer {spec!r}: {err}") from None
    if not (isinstance(obj, type) and issubclass(obj, Optimizer)):
        raise ValueError(f"optimizer {spec!r} is {obj!r}, not a torch.optim.Optimizer subclass")
    return obj


def optimizer_kwargs(
    cls: type[Optimizer], point: dict[str, Any], fixed: dict[str, Any], max_steps: int = 1000
) -> dict[str, Any]:
    """The keyword arguments for ``cls``: ``one_minus_X`` -> ``X``, ``beta1/beta2/beta3`` -> ``betas``,
    ``X_steps_fraction`` -> ``X`` steps of ``max_steps``, runner keys out."""
    kwargs: dict[str, Any] = dict(fixed)
    for key, value in point.items():
        if key in RUNNER_KEYS:
            continue
        if key.startswith("one_minus_"):
            kwargs[key.removeprefix("one_minus_")] = 1.0 - value
        elif key.endswith(STEPS_FRACTION):
            kwargs[key.removesuffix(STEPS_FRACTION)] = max(1, round(value * max_steps))
        else:
            kwargs[key] = value
    signature = inspect.signature(cls).parameters
    members = [f"beta{i}" for i in (1, 2, 3)]
    if "betas" in signature and any(m in kwargs for m in members):
        default = signature["betas"].default
        default = default if isinstance(default, tuple) else (0.9, 0.999)
        kwargs["betas"] = tuple(kwargs.pop(m, d) for m, d in zip(members, default))
    return kwargs


def build_optimizer(algorithm: Algorithm, model: nn.Module, point: dict[str, Any], max_steps: int = 1000) -> Optimizer:
    """The algorithm's optimizer over ``model``; biases, norm weights and embeddings get no weight decay when the
    optimizer has one (:func:`stochopt.training.param_groups`), or the class's own groups (Muon), exactly as the
    registry's ``create_optimizer`` builds them; ``max_steps``: the trial's step budget."""
    cls = resolve_optimizer(algorithm.optimizer)
    kwargs = optimizer_kwargs(cls, point, algorithm.fixed, max_steps)
    from stochopt.registry import params_for_module  # local, like resolve_optimizer's registry import

    params = params_for_module(cls, model)
    try:
        return cls(params, **kwargs)
    except TypeError as err:
        raise ValueError(f"algorithm {algorithm.name!r} ({algorithm.source}): {cls.__name__}: {err}") from None


def shipped_algorithms() -> list[str]:
    """Names of the search-space files that ship with stochopt (``stochopt/bench/spaces/*.toml``)."""
    folder = importlib.resources.files("stochopt.bench") / "spaces"
    return sorted(p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml"))


def load_algorithm(spec: str) -> Algorithm:
    """A shipped algorithm name (``nadamw``), a search-space file (``my_space.toml`` / ``.json``), or an optimizer
    (registered name or import path) with its own defaults and a generic log-uniform learning-rate range."""
    if spec.endswith((".toml", ".json")):
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"search-space file {spec!r} does not exist")
        return parse_space(path.read_text(), name=path.stem, source=str(path))
    if spec in shipped_algorithms():
        resource = importlib.resources.files("stochopt.bench") / "spaces" / f"{spec}.toml"
        return parse_space(resource.read_text(), name=spec, source=f"stochopt/bench/spaces/{spec}.toml")
    resolve_optimizer(spec)  # a clear error now rather than in the middle of a run
    return Algorithm(name=spec, optimizer=spec, description=f"{spec} with its own defaults",
                     search={k: Range(**v) for k, v in GENERIC_SEARCH.items()},
                     defaults={"warmup_fraction": 0.05}, source="generic search space")  # fmt: skip


def parse_space(text: str, name: str, source: str) -> Algorithm:
    """Parse one search-space file; any problem is one ValueError naming the file and the problem."""

    def fail(problem: str) -> ValueError:
        return ValueError(f"search space {source}: {problem}")

    try:
        data = json.loads(text) if source.endswith(".json") else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
        raise fail(f"does not parse: {err}") from None
    known = {"description", "optimizer", "sparse_gradients", "fixed", "schedule", "defaults", "search"}
    if unknown := set(data) - known:
        raise fail(f"unknown keys {sorted(unknown)}; known: {sorted(known)}")
    if not isinstance(data.get("optimizer"), str):
        raise fail("needs optimizer = NAME (a registered name or an import path)")
    for table in ("fixed", "schedule", "defaults", "search"):
        if not isinstance(data.get(table, {}), dict):
            raise fail(f"[{table}] must be a table")
    if not isinstance(data.get("description", ""), str):
        raise fail(f"description must be a string, got {data['description']!r}")
    if not isinstance(data.get("sparse_gradients", False), bool):
        raise fail(f"sparse_gradients must be true or false, got {data['sparse_gradients']!r}")
    schedule = data.get("schedule", {})
    if unknown := set(schedule) - {"decay", "final_lr_ratio"}:
        raise fail(f"[schedule] has unknown keys {sorted(unknown)}; known: decay, final_lr_ratio")
    decay = schedule.get("decay", "cosine")
    if decay not in DECAYS:
        raise fail(f"[schedule] decay = {decay!r}; known: {', '.join(DECAYS)}")
    ratio = schedule.get("final_lr_ratio", 0.0)
    if not _is_number(ratio) or not 0 <= ratio <= 1:
        raise fail(f"[schedule] final_lr_ratio must be a number in [0, 1], got {ratio!r}")
    search = {}
    for key, spec in data.get("search", {}).items():
        allowed = {"low", "high", "log", "integer"}
        if not isinstance(spec, dict) or not {"low", "high"} <= set(spec) or set(spec) - allowed:
            raise fail(f"[search] {key} must be {{low = ..., high = ..., log = true|false, integer = true|false}}")
        low, high = spec["low"], spec["high"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
            raise fail(f"[search] {key}: low and high must be numbers, got {low!r}, {high!r}")
        if not (_is_number(low) and _is_number(high)):
            raise fail(f"[search] {key}: low and high must be finite, got {low!r}, {high!r}")
        for flag in ("log", "integer"):
            if not isinstance(spec.get(flag, False), bool):
                raise fail(f"[search] {key}: {flag} must be true or false, got {spec[flag]!r}")
        log, integer = spec.get("log", False), spec.get("integer", False)
        if integer and not (float(low).is_integer() and float(high).is_integer()):
            raise fail(f"[search] {key}: an integer range needs integer bounds, got low = {low!r}, high = {high!r}")
        low, high = float(low), float(high)
        if not low < high:
            raise fail(f"[search] {key}: low ({low}) must be below high ({high})")
        if log and low <= 0:
            raise fail(f"[search] {key}: a log range needs low > 0, got {low}")
        search[key] = Range(low, high, log, integer)
    algorithm = Algorithm(
        name=name, optimizer=data["optimizer"], description=str(data.get("description", "")),
        fixed=dict(data.get("fixed", {})), defaults=dict(data.get("defaults", {})), search=search, decay=decay,
        final_lr_ratio=float(schedule.get("final_lr_ratio", 0.0)),
        sparse_gradients=bool(data.get("sparse_gradients", False)), source=source,
    )  # fmt: skip
    missing = set(search) - set(algorithm.defaults)
    if missing:
        raise fail(f"[defaults] lacks {sorted(missing)} (every searched key needs a default for self-tuning)")
    if problem := _value_problem(algorithm):
        raise fail(problem)
    try:
        cls = resolve_optimizer(algorithm.optimizer)
    except ValueError as err:
        raise fail(str(err)) from None
    accepted = inspect.signature(cls).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        kwargs = optimizer_kwargs(cls, algorithm.point(), algorithm.fixed)
        if unknown := set(kwargs) - set(accepted):
            raise fail(f"{cls.__name__} takes no {sorted(unknown)}")
    if problem := _optimizer_refusal(cls, algorithm):
        raise fail(problem)
    return algorithm


def _is_number(value: Any) -> bool:
    """An int or float of TOML/JSON (a bool is not one), finite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _runner_problem(key: str, value: float) -> str | None:
    """What is wrong with a value of one of the runner's own knobs (:data:`RUNNER_KEYS`), or None."""
    if key == "warmup_fraction" and not 0 <= value <= 1:
        return "must be in [0, 1]"
    if key == "batch_size" and not (float(value).is_integer() and value >= 1):
        return "must be a positive integer"
    if key == "clip_norm" and not value > 0:
        return "must be > 0"
    return None


def _value_problem(algorithm: Algorithm) -> str | None:
    """The first bad value among the defaults and the ranges that the optimizer cannot judge itself: numbers where
    the runner computes with them (searched keys, ``one_minus_*``, the runner's knobs) and the runner's ranges."""
    for key, value in algorithm.defaults.items():
        if (
            key in algorithm.search
            or key in RUNNER_KEYS
            or key.startswith("one_minus_")
            or key.endswith(STEPS_FRACTION)
        ):
            if not _is_number(value):
                return f"[defaults] {key} must be a number, got {value!r}"
            if key.endswith(STEPS_FRACTION) and not value > 0:
                return f"[defaults] {key} must be > 0 (a fraction of the step budget), got {value!r}"
            if key in algorithm.search and algorithm.search[key].integer and not float(value).is_integer():
                return f"[defaults] {key} must be an integer (its [search] range is integer), got {value!r}"
            if key in RUNNER_KEYS and (problem := _runner_problem(key, value)):
                return f"[defaults] {key} {problem}, got {value!r}"
    for key, r in algorithm.search.items():
        if key == "batch_size" and not r.integer:
            return "[search] batch_size must be an integer range (integer = true)"
        for end in ("low", "high"):
            if key in RUNNER_KEYS and (problem := _runner_problem(key, getattr(r, end))):
                return f"[search] {key}: {end} {problem}, got {getattr(r, end)!r}"
    return None


def _optimizer_refusal(cls: type[Optimizer], algorithm: Algorithm) -> str | None:
    """Build the optimizer (:func:`build_optimizer`, as a run does) on a tiny model at the defaults and at each
    searched key's two range ends (the others at their defaults): a value it refuses (a negative lr, a beta above
    1) fails when the file is loaded, not in the middle of a run. The ValueError or TypeError it raises, as text;
    None when every point builds."""
    import warnings

    points = [("[defaults]", {})]
    for key, r in algorithm.search.items():
        if key not in RUNNER_KEYS:
            for end in ("low", "high"):
                value = int(getattr(r, end)) if r.integer else getattr(r, end)
                points.append((f"[search] {key} = {value} (the {end} end of its range)", {key: value}))
    model = nn.Linear(2, 2)
    for where, searched in points:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                build_optimizer(algorithm, model, algorithm.point(searched))
        except (ValueError, TypeError) as err:
            return f"{cls.__name__} refuses {where}: {err}"
    return None
