"""The state an optimizer keeps per parameter, as StateSpecs: read from a stochopt optimizer's own declared
layout, or from a table of torch.optim's state (checked against measured state by the tests)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from stochopt.engine import STEP, EngineOptimizer, StateSpec
from stochopt.registry import optimizer_entry

Layout = tuple[StateSpec, ...]


def _like(*names: str) -> Layout:
    return tuple(StateSpec(name, dtype="param") for name in names)  # torch keeps state in the param's dtype


_MU_PRODUCT = StateSpec("mu_product", shape="scalar", dtype="scalar")

# torch.optim's per-parameter state under given hyperparameters ("step" is a 0-d float32 tensor, as STEP)
TORCH_LAYOUTS: dict[str, Callable[[dict[str, Any]], Layout]] = {
    "SGD": lambda hp: _like("momentum_buffer") if hp.get("momentum", 0) else (),
    "Adam": lambda hp: (STEP, *_like("exp_avg", "exp_avg_sq"), *(_like("max_exp_avg_sq") if hp.get("amsgrad") else ())),
    "AdamW": lambda hp: TORCH_LAYOUTS["Adam"](hp),
    "Adagrad": lambda hp: (STEP, *_like("sum")),
    "RMSprop": lambda hp: (
        STEP, *_like("square_avg"), *(_like("momentum_buffer") if hp.get("momentum", 0) else ()),
        *(_like("grad_avg") if hp.get("centered") else ()),
    ),
    "Adadelta": lambda hp: (STEP, *_like("square_avg", "acc_delta")),
    "NAdam": lambda hp: (STEP, _MU_PRODUCT, *_like("exp_avg", "exp_avg_sq")),
    "RAdam": lambda hp: (STEP, *_like("exp_avg", "exp_avg_sq")),
    "Adamax": lambda hp: (STEP, *_like("exp_avg", "exp_inf")),
    "Adafactor": lambda hp: (
        STEP, StateSpec("row_var", shape="row", dtype="param", applies="matrix"),
        StateSpec("col_var", shape="col", dtype="param", applies="matrix"),
        StateSpec("variance", dtype="param", applies="vector"),
    ),
    "Muon": lambda hp: _like("momentum_buffer"),
}  # fmt: skip


def optimizer_layout(optimizer: str, **hyperparameters: Any) -> tuple[str, Layout, torch.dtype | None]:
    """(display name, layout, state_dtype) of a registered stochopt optimizer (``"adam"``) or of torch.optim's
    (``"torch.optim.Adam"`` or ``"torch:Adam"``) under ``hyperparameters``."""
    for prefix in ("torch.optim.", "torch:"):
        if optimizer.startswith(prefix):
            name = optimizer[len(prefix) :]
            if name not in TORCH_LAYOUTS:
                raise ValueError(
                    f"optimizer {optimizer!r}: the state of torch.optim.{name} is not in the table; known: "
                    f"{', '.join(TORCH_LAYOUTS)}"
                )
            return f"torch.optim.{name}", TORCH_LAYOUTS[name](hyperparameters), None
    entry = optimizer_entry(optimizer)
    if not issubclass(entry.cls, EngineOptimizer):
        raise ValueError(f"optimizer {optimizer!r} does not declare a state layout")
    # a throwaway instance: the layout may depend on the options (amsgrad, momentum, beta1 ...); the stored
    # layout also on the storage options (8-bit moments, a compensation buffer: engine/layout.py)
    probe = entry.cls([_probe_param(hyperparameters)], **hyperparameters)
    group = probe.param_groups[0]
    return entry.name, tuple(probe._stored_layout(group)), group.get("state_dtype")


def _probe_param(hyperparameters: dict[str, Any]) -> torch.Tensor:
    """A parameter the optimizer accepts under ``hyperparameters``: weight rounding is for bfloat16 ones."""
    dtype = torch.bfloat16 if hyperparameters.get("weight_rounding") not in (None, "nearest") else torch.float32
    return torch.zeros(2, 2, dtype=dtype, requires_grad=True)


def module_layouts(optimizer: str, model: torch.nn.Module, **hyperparameters: Any) -> list[Layout] | None:
    """One layout per parameter of ``model`` (in ``model.parameters()`` order) for a registered optimizer that
    builds its groups from the model (``params_from_module``: AdaFisher gives its Linear/Conv2d layers other
    state than the rest, Muon gives embeddings and the head AdamW's); None for every other optimizer, whose one
    layout serves all parameters."""
    if optimizer.startswith(("torch.optim.", "torch:")):
        return None
    entry = optimizer_entry(optimizer)
    hook = getattr(entry.cls, "params_from_module", None)
    if hook is None:
        return None
    probe = entry.cls(hook(model), **hyperparameters)
    if hasattr(probe, "remove_hooks"):
        probe.remove_hooks()  # the probe only reads the groups; the model must not keep AdaFisher's hooks
    by_param = {id(p): tuple(probe._stored_layout(group)) for group in probe.param_groups for p in group["params"]}
    return [by_param.get(id(p), ()) for p in model.parameters()]
