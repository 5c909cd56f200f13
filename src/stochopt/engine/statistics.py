"""Per-step statistics of an engine optimizer, opt-in (``opt.track_statistics()``) and free when off.

On, each parameter keeps a float32 vector (the state entry ``statistics``) that the update itself fills, in
every execution path (the fused kernel included, in the same launch): the sums of squares of the update
(the weight's change this step), of the weight and of each state tensor, and the scalars the update reports
(LAMB's and LARS's trust ratio). ``opt.statistics`` turns them into norms after ``step()``, per parameter (by
name when the optimizer was given names) and per group, with the coefficients worth reading (Muon's adjusted
lr, Adafactor's relative step) and the group's own scalars (Prodigy's ``d``). Reading them synchronizes with
the device once.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from stochopt.engine import checks
from stochopt.engine.layout import measured_states, new_state_tensor
from stochopt.engine.scalars import scalar
from stochopt.engine.update import STATISTICS

if TYPE_CHECKING:
    from stochopt.engine.optimizer import EngineOptimizer


def track(opt: EngineOptimizer, enabled: bool) -> None:
    """Switch every group's ``statistics`` option, adding (or dropping) the vectors of parameters that already
    have state."""
    checks.flag("enabled", enabled)
    for group in opt.param_groups:  # every group checked first: a refusal leaves the optimizer as it was
        opt._validate_engine_options({**group, "statistics": enabled})
    for group in opt.param_groups:
        group["statistics"] = enabled
        spec = next((s for s in opt._stored_layout(group) if s.name == STATISTICS), None)
        for p in group["params"]:
            state = opt.state.get(p)
            if not state:
                continue  # created with the rest of its state at its first step
            if spec is None:
                state.pop(STATISTICS, None)
            elif STATISTICS not in state:
                state[STATISTICS] = new_state_tensor(spec, p, group["state_dtype"])
    if not enabled:
        opt.__dict__.pop("_reported", None)


def clear(opt: EngineOptimizer, group: dict[str, Any]) -> None:
    """Before a step: a parameter that gets no gradient this step reports nothing, not its last step."""
    for p in group["params"]:
        vector = opt.state.get(p, {}).get(STATISTICS)
        if vector is not None:
            vector.fill_(float("nan"))


def _root(x: float) -> float:
    return math.sqrt(x) if x >= 0 else float("nan")


def read(opt: EngineOptimizer) -> dict[str, Any]:
    """``{"params": {name: {...}}, "groups": [{...}]}`` of the last step (see the module docstring)."""
    params: dict[str, dict[str, float]] = {}
    groups: list[dict[str, float]] = []
    reported = opt.__dict__.get("_reported", {})
    for g_index, group in enumerate(opt.param_groups):
        if not group["statistics"]:
            continue
        layout = opt._stored_layout(group)
        names = group.get("param_names") or []
        update_sq = weight_sq = 0.0
        for index, p in enumerate(group["params"]):
            vector = opt.state.get(p, {}).get(STATISTICS)
            if vector is None:
                continue
            values = vector.tolist()
            if math.isnan(values[0]):
                continue  # not stepped in the last step
            measured = measured_states(layout, p)
            entry = {"update_norm": _root(values[0]), "weight_norm": _root(values[1])}
            entry["update_to_weight"] = entry["update_norm"] / entry["weight_norm"] if values[1] > 0 else math.inf
            for j, name in enumerate(measured):
                entry[f"{name}_norm"] = _root(values[2 + j])
            for j, name in enumerate(opt._update_statistics):
                value = values[2 + len(measured) + j]
                if not math.isnan(value):
                    entry[name] = value
            for name, value in reported.get(id(p), {}).items():
                entry[name] = float(value)
            params[names[index] if index < len(names) else f"group{g_index}.param{index}"] = entry
            update_sq, weight_sq = update_sq + values[0], weight_sq + values[1]
        summary = {"lr": float(scalar(group["lr"])), "update_norm": _root(update_sq), "weight_norm": _root(weight_sq)}
        if "weight_decay" in group:
            summary["weight_decay"] = float(scalar(group["weight_decay"]))
        summary["update_to_weight"] = summary["update_norm"] / summary["weight_norm"] if weight_sq > 0 else math.inf
        summary.update({name: float(scalar(group[name])) for name in opt._group_statistics if name in group})
        groups.append(summary)
    return {"params": params, "groups": groups}


def record_coefficients(opt: EngineOptimizer, p: torch.Tensor, c: dict[str, Any]) -> None:
    """Keep the coefficients the class reports (``_coefficient_statistics``) for ``p``'s entry."""
    if opt._coefficient_statistics:
        kept = {name: (c[coef], factor) for name, (coef, factor) in opt._coefficient_statistics.items() if coef in c}
        opt.__dict__.setdefault("_reported", {})[id(p)] = {
            name: (value.item() if isinstance(value, torch.Tensor) else value) * factor
            for name, (value, factor) in kept.items()
        }


def flat_statistics(stats: dict[str, Any], prefix: str = "optimizer") -> dict[str, float]:
    """``opt.statistics`` as one flat dict that any tracker takes (wandb.log, mlflow.log_metrics, a CSV row):
    ``"{prefix}/{parameter}/{quantity}"`` and ``"{prefix}/group{i}/{quantity}"``."""
    flat = {f"{prefix}/{name}/{key}": value for name, entry in stats["params"].items() for key, value in entry.items()}
    for index, entry in enumerate(stats["groups"]):
        flat.update({f"{prefix}/group{index}/{key}": value for key, value in entry.items()})
    return flat


def write_statistics(writer: Any, stats: dict[str, Any], step: int, prefix: str = "optimizer") -> None:
    """Each statistic as a scalar of a TensorBoard ``SummaryWriter`` (anything with
    ``add_scalar(tag, value, global_step)``), under the tags of :func:`flat_statistics`."""
    if not callable(getattr(writer, "add_scalar", None)):
        raise TypeError(f"writer must have add_scalar(tag, value, global_step), got {type(writer).__name__}")
    for tag, value in flat_statistics(stats, prefix).items():
        writer.add_scalar(tag, value, step)
