"""Lion: the sign of an interpolated momentum (Chen et al., 2023)."""

from __future__ import annotations

from typing import Any

import torch

from stochopt.engine import STEP, EngineOptimizer, StateSpec, checks, scalar
from stochopt.optim.common import cautious_direction, decay_factor, decoupled_decay_, ema_


class Lion(EngineOptimizer):
    r"""Lion, EvoLved Sign Momentum (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms").

    .. math::
        u_t &= \mathrm{sign}\big(\beta_1 m_{t-1} + (1-\beta_1) g_t\big) \\
        \theta_t &= (1-\eta\lambda)\,\theta_{t-1} - \eta\, u_t \\
        m_t &= \beta_2 m_{t-1} + (1-\beta_2) g_t

    One state tensor instead of Adam's two. The paper suggests an lr 3-10x smaller than AdamW's and a weight
    decay 3-10x larger. ``cautious=True`` masks :math:`u_t` where its sign disagrees with :math:`g_t`'s, rescaled
    by the fraction kept (Liang et al., 2024; :func:`stochopt.optim.common.cautious_direction`).
    """

    _decoupled_decay = True  # decay_factor on the weights: decouple_lr applies

    _cautious_supported = True

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        decouple_lr: bool = False,
        cautious: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        nonfinite: str | None = None,
        state_dtype: torch.dtype | str | None = None,
        weight_rounding: str | None = None,
        rounding_seed: int = 0,
    ) -> None:
        defaults = dict(
            decouple_lr=decouple_lr,
            lr=lr, betas=betas, weight_decay=weight_decay, cautious=cautious,
            maximize=maximize, foreach=foreach, fused=fused, capturable=capturable, nonfinite=nonfinite,
            state_dtype=state_dtype, weight_rounding=weight_rounding, rounding_seed=rounding_seed,
        )  # fmt: skip
        super().__init__(params, defaults)

    def _validate(self, group: dict[str, Any]) -> None:
        checks.nonnegative("lr", group["lr"])
        checks.betas(group["betas"], closed_right=True)
        checks.nonnegative("weight_decay", group["weight_decay"])

    def _layout(self, group: dict[str, Any]) -> tuple[StateSpec, ...]:
        return (STEP, StateSpec("exp_avg", quantize="signed"))

    def _flags(self, group: dict[str, Any], step: int, matrix: bool) -> dict[str, Any]:
        return {"decay": group["weight_decay"] != 0}

    def _coefficients(self, group: dict[str, Any], step: int, states: list) -> dict[str, float]:
        lr = scalar(group["lr"])
        beta1, beta2 = (scalar(b) for b in group["betas"])
        return {
            "neg_lr": -lr,
            "decay_factor": decay_factor(group, lr),
            "one_minus_beta1": 1.0 - beta1,
            "one_minus_beta2": 1.0 - beta2,
        }

    @staticmethod
    def _update(p: Any, g: Any, state: dict, c: dict, *, decay: bool, cautious: bool = False) -> None:
        if decay:
            decoupled_decay_(p, c["decay_factor"])
        m = state["exp_avg"]
        p.add_(cautious_direction(m.lerp(g, c["one_minus_beta1"]).sign_(), g, cautious), alpha=c["neg_lr"])
        ema_(m, g, c["one_minus_beta2"])
