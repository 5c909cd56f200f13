"""Ranger: RAdam, Lookahead and gradient centralization in one optimizer and one kernel."""

from __future__ import annotations

from typing import Any

import torch

from stochopt.engine import StateSpec, checks, scalar
from stochopt.optim.adam_variants import RAdam
from stochopt.optim.common import ema_


class Ranger(RAdam):
    r"""Ranger (Wright, 2019; with gradient centralization, 2020): RAdam (Liu et al., 2020) inside Lookahead
    (Zhang et al., 2019), on centralized gradients (Yong et al., 2020).

    .. math::
        g_t &\leftarrow g_t - \mathrm{mean}_{\text{dims}>0}(g_t) \quad (\text{params of 2+ dimensions}) \\
        \theta_t &= \mathrm{RAdam}(\theta_{t-1}, g_t) \\
        \text{every } k \text{ steps:}\quad \phi &\leftarrow \phi + \alpha(\theta_t - \phi), \qquad
        \theta_t \leftarrow \phi

    with slow weights :math:`\phi` starting at the initial parameters. The same as
    ``Lookahead(RAdam(...), k, alpha)`` with ``gradient_centralization`` switched on (tested), but the slow
    weights live in this optimizer's state and the synchronization runs inside the RAdam kernel on the steps
    it is due. Defaults are Ranger's: ``betas=(0.95, 0.999)``, ``eps=1e-5``, ``k=6``, ``alpha=0.5``.
    """

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.95, 0.999),
        eps: float = 1e-5,
        weight_decay: float = 0.0,
        k: int = 6,
        alpha: float = 0.5,
        centralize_gradients: bool = True,
        decoupled_weight_decay: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        fused: bool | None = None,
        nonfinite: str | None = None,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        # RAdam's constructor builds the groups; Ranger's own defaults must be known by then
        self._ranger_defaults = {"k": k, "alpha": alpha, "centralize_gradients": centralize_gradients}
        super().__init__(
            params, lr, betas, eps, weight_decay, decoupled_weight_decay, foreach=foreach, maximize=maximize,
            fused=fused, nonfinite=nonfinite, state_dtype=state_dtype,
        )  # fmt: skip
        self.defaults.update(self._ranger_defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for key, value in self._ranger_defaults.items():
            param_group.setdefault(key, value)
        super().add_param_group(param_group)

    def _validate(self, group: dict[str, Any]) -> None:
        super()._validate(group)
        checks.count("k", group["k"], 1)
        checks.in_unit_interval("alpha", group["alpha"], closed_right=True)

    def _layout(self, group: dict[str, Any]) -> tuple[StateSpec, ...]:
        return super()._layout(group) + (StateSpec("slow_param", init="param"),)

    def _flags(self, group: dict[str, Any], step: int, matrix: bool) -> dict[str, Any]:
        return {**super()._flags(group, step, matrix), "sync": step % group["k"] == 0}

    def _coefficients(self, group: dict[str, Any], step: int, states: list) -> dict[str, float]:
        return {**super()._coefficients(group, step, states), "lookahead_alpha": scalar(group["alpha"])}

    @staticmethod
    def _update(p: Any, g: Any, state: dict, c: dict, *, decay: bool, decoupled: bool, sync: bool) -> None:
        RAdam._update(p, g, state, c, decay=decay, decoupled=decoupled)
        if sync:
            slow = state["slow_param"]
            ema_(slow, p, c["lookahead_alpha"])
            p.copy_(slow)
