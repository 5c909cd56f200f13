"""Ranger: RAdam, Lookahead and gradient centralization in one optimizer and one kernel."""

from __future__ import annotations

from typing import Any

import torch

from stochopt.engine import StateSpec, checks, scalar
from stochopt.engine.scalars import where
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
        decouple_lr: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        fused: bool | None = None,
        capturable: bool = False,
        nonfinite: str | None = None,
        state_dtype: torch.dtype | str | None = None,
        weight_rounding: str | None = None,
        rounding_seed: int = 0,
    ) -> None:
        # RAdam's constructor builds the groups; Ranger's own defaults must be known by then
        self._ranger_defaults = {"k": k, "alpha": alpha, "centralize_gradients": centralize_gradients}
        super().__init__(
            params, lr, betas, eps, weight_decay, decoupled_weight_decay, foreach=foreach, maximize=maximize,
            decouple_lr=decouple_lr, fused=fused, capturable=capturable, nonfinite=nonfinite, state_dtype=state_dtype,
            weight_rounding=weight_rounding, rounding_seed=rounding_seed,
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

    def _flags(self, group: dict[str, Any], step: Any, matrix: bool) -> dict[str, Any]:
        # Tensor mode (capturable, or traced by torch.compile) cannot decide on the host which steps
        # synchronize: every step then runs the synchronization with a weight of 0 or 1 ("masked"), exact either
        # way (lerp with weight 0 leaves p, with weight 1 gives the slow weights), for one more read and write
        # of the slow weights on the steps that do not synchronize.
        sync = "masked" if isinstance(step, torch.Tensor) else step % group["k"] == 0
        return {**super()._flags(group, step, matrix), "sync": sync}

    def _coefficients(self, group: dict[str, Any], step: Any, states: list) -> dict[str, Any]:
        c = {**super()._coefficients(group, step, states), "lookahead_alpha": scalar(group["alpha"])}
        due = step % group["k"] == 0  # the masked form's weights (tensor mode; numbers, unused, in number mode)
        c.update(sync_alpha=where(due, c["lookahead_alpha"], 0.0), sync_weight=where(due, 1.0, 0.0))
        return c

    @staticmethod
    def _update(p: Any, g: Any, state: dict, c: dict, *, decay: bool, decoupled: bool, sync: bool | str) -> None:
        RAdam._update(p, g, state, c, decay=decay, decoupled=decoupled)
        slow = state["slow_param"]
        if sync == "masked":
            ema_(slow, p, c["sync_alpha"])
            p.lerp_(slow, c["sync_weight"])
        elif sync:
            ema_(slow, p, c["lookahead_alpha"])
            p.copy_(slow)
