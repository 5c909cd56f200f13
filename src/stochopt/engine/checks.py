"""Validation with messages that name the argument and its value, raised before any kernel runs."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

from torch import Tensor

from stochopt.engine.layout import StateSpec, spec_shape


def checked_params(params: Any) -> list[Any]:
    """Accept what torch.optim accepts (tensors, named tensors, dicts) in a reproducible order."""
    if isinstance(params, Tensor):
        raise TypeError(
            "params must be an iterable of tensors or of param-group dicts, got a single Tensor; "
            "wrap it in a list: [tensor]"
        )
    if isinstance(params, (set, frozenset)):
        raise TypeError(
            "params must be an ordered iterable (a list or model.parameters()), got a set: its order changes "
            "between runs, so state_dict would attach saved state to the wrong parameters"
        )
    if not isinstance(params, Iterable):
        raise TypeError(f"params must be an iterable of tensors or dicts, got {type(params).__name__}")
    params = list(params)
    if not params:
        raise ValueError("params is empty: the optimizer got no parameters to optimize")
    return params


def _as_tensor(item: Any) -> Any:
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
        return item[1]  # (name, tensor) as from model.named_parameters()
    return item


def check_group_params(group: dict[str, Any], existing_groups: list[dict[str, Any]]) -> None:
    if not isinstance(group, dict):
        raise TypeError(f"a param group must be a dict, got {type(group).__name__}")
    params = group.get("params")
    if isinstance(params, (set, frozenset)):
        raise TypeError("a param group's 'params' must be ordered (a list), got a set")
    items = [params] if isinstance(params, Tensor) else list(params or [])
    seen: dict[int, int] = {}
    for index, item in enumerate(items):
        p = _as_tensor(item)
        label = f"params[{index}]" + (f" ({item[0]!r})" if p is not item else "")  # named: its name too
        if not isinstance(p, Tensor):
            raise TypeError(f"{label} must be a torch.Tensor, got {type(p).__name__}")
        if not p.is_leaf:
            raise ValueError(
                f"{label} (shape {tuple(p.shape)}) is not a leaf tensor (grad_fn={type(p.grad_fn).__name__}): "
                "optimize the tensor it was computed from, or .detach().requires_grad_() it"
            )
        if not p.dtype.is_floating_point and not p.dtype.is_complex:
            raise TypeError(f"{label} has dtype {p.dtype}; optimizers need floating-point parameters")
        if id(p) in seen:
            raise ValueError(f"{label} is the same tensor as params[{seen[id(p)]}]: each parameter may appear once")
        seen[id(p)] = index
    for g_index, other in enumerate(existing_groups):
        for q in other["params"]:
            if id(q) in seen:
                raise ValueError(
                    f"params[{seen[id(q)]}] of the new group is already in param group {g_index}: "
                    "each parameter may belong to one group only"
                )


def _fail(name: str, value: Any, requirement: str, why: str = "") -> None:
    raise ValueError(f"{name} must be {requirement}, got {value!r}" + (f": {why}" if why else ""))


def _number(name: str, value: Any) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{name} must be a number or a one-element tensor, got a tensor of shape {tuple(value.shape)}"
            )
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if math.isnan(value):
        _fail(name, value, "a number, not NaN")
    return float(value)


def nonnegative(name: str, value: Any) -> None:
    v = _number(name, value)
    if not v >= 0.0 or math.isinf(v):
        _fail(name, value, "a finite number >= 0")


def positive(name: str, value: Any, why: str = "") -> None:
    v = _number(name, value)
    if not v > 0.0 or math.isinf(v):
        _fail(name, value, "a finite number > 0", why)


def eps(name: str, value: Any) -> None:
    """A denominator's guard: > 0. torch.optim accepts 0; stochopt does not, because 0 can only give NaN."""
    positive(name, value, "with 0, a coordinate whose gradient has always been 0 computes 0/0 (NaN) or never moves")


def at_least(name: str, value: Any, minimum: float, *, at_most: float = math.inf) -> None:
    """minimum <= value (<= at_most); a number, not None or a string."""
    v = _number(name, value)
    if not minimum <= v <= at_most:
        _fail(name, value, f"a number >= {minimum:g}" if at_most == math.inf else f"in [{minimum:g}, {at_most:g}]")


def in_unit_interval(name: str, value: Any, *, closed_right: bool = False) -> None:
    """0 <= value < 1 (or <= 1 with closed_right)."""
    v = _number(name, value)
    ok = 0.0 <= v <= 1.0 if closed_right else 0.0 <= v < 1.0
    if not ok:
        _fail(name, value, "in [0, 1]" if closed_right else "in [0, 1)")


def count(name: str, value: Any, minimum: int) -> int:
    """An int >= ``minimum`` (bools refused), returned as int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def betas(value: Any, *, closed_right: bool = False, n: int = 2, name: str = "betas") -> None:
    """A tuple of ``n`` EMA factors, each in [0, 1) (or [0, 1] with closed_right)."""
    if not isinstance(value, (tuple, list)) or len(value) != n:
        members = ", ".join(f"beta{i + 1}" for i in range(n))
        raise TypeError(f"{name} must be a tuple ({members}), got {value!r}")
    for i, beta in enumerate(value):
        in_unit_interval(f"{name}[{i}]", beta, closed_right=closed_right)


def flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def check_loaded_state(opt_name: str, layout: tuple[StateSpec, ...], index: Any, param: Tensor, saved: dict) -> None:
    """A saved per-parameter state must hold the layout's tensors with the parameter's shape."""
    expected = {spec.name for spec in layout}
    keys = set(saved)
    unknown, missing = keys - expected, expected - keys - {"step"}
    if unknown or missing:
        raise ValueError(
            f"state_dict does not fit {opt_name}: saved state of parameter {index} holds {sorted(keys)}, "
            f"{opt_name} with these hyperparameters keeps {sorted(expected)}; was it saved by another optimizer "
            "or with other options (amsgrad, momentum, centered)?"
        )
    for spec in layout:
        value = saved.get(spec.name)
        if not isinstance(value, Tensor):
            if spec.name == "step" and (value is None or isinstance(value, (int, float))):
                continue  # torch.optim.SGD keeps no step; old torch versions kept it as a number
            raise ValueError(
                f"state_dict: state '{spec.name}' of parameter {index} is {type(value).__name__}, not a tensor"
            )
        want = spec_shape(spec, param)
        if value.shape != want:
            raise ValueError(
                f"state_dict: state '{spec.name}' of parameter {index} has shape {tuple(value.shape)}, but the "
                f"parameter it loads into needs {tuple(want)} (param shape {tuple(param.shape)})"
            )
