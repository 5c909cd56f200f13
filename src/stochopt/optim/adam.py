"""Adam and the variants that keep Adam's two moments: AMSGrad, AdamW, QHAdam."""

from __future__ import annotations

from typing import Any

import torch

from stochopt.engine import STEP, EngineOptimizer, StateSpec, checks, scalar
from stochopt.optim.common import (
    adam_coefficients,
    cautious_direction,
    check_adam_group,
    ema_,
    ema_square_,
    running_max_,
    weight_decay,
)

#: Adam's moments: ``state_dtype="int8"`` stores the first with the signed map, the second with the unsigned one
ADAM_MOMENTS = (STEP, StateSpec("exp_avg", quantize="signed"), StateSpec("exp_avg_sq", quantize="unsigned"))
MAX_EXP_AVG_SQ = StateSpec("max_exp_avg_sq", quantize="unsigned")


class Adam(EngineOptimizer):
    r"""Adam (Kingma & Ba, 2015, "Adam: A Method for Stochastic Optimization"), with AMSGrad as an option.

    .. math::
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        \hat v_t &= \max(\hat v_{t-1}, v_t) \text{ (AMSGrad, Reddi et al., 2018) or } v_t \\
        \theta_t &= \theta_{t-1} - \frac{\eta}{1-\beta_1^t}\,
                    \frac{m_t}{\sqrt{\hat v_t}/\sqrt{1-\beta_2^t} + \epsilon}

    Weight decay is L2 (:math:`g_t \leftarrow g_t + \lambda\theta_{t-1}`), or decoupled
    (:math:`\theta \leftarrow (1-\eta\lambda)\theta`, Loshchilov & Hutter, 2019) with
    ``decoupled_weight_decay=True``. Arguments, defaults and state names follow ``torch.optim.Adam``.
    ``cautious=True`` masks :math:`m_t` where its sign disagrees with :math:`g_t`'s, rescaled by the fraction
    kept (Liang et al., 2024; :func:`stochopt.optim.common.cautious_direction`).
    """

    _cautious_supported = True

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        decouple_lr: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        fused: bool | None = None,
        capturable: bool = False,
        decoupled_weight_decay: bool = False,
        cautious: bool = False,
        nonfinite: str | None = None,
        state_dtype: torch.dtype | str | None = None,
        weight_rounding: str | None = None,
        rounding_seed: int = 0,
    ) -> None:
        defaults = dict(
            decouple_lr=decouple_lr,
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            decoupled_weight_decay=decoupled_weight_decay, cautious=cautious,
            maximize=maximize, foreach=foreach, fused=fused, capturable=capturable, nonfinite=nonfinite,
            state_dtype=state_dtype, weight_rounding=weight_rounding, rounding_seed=rounding_seed,
        )  # fmt: skip
        super().__init__(params, defaults)

    def _validate(self, group: dict[str, Any]) -> None:
        check_adam_group(group)
        checks.flag("amsgrad", group["amsgrad"])
        checks.flag("decoupled_weight_decay", group["decoupled_weight_decay"])

    def _layout(self, group: dict[str, Any]) -> tuple[StateSpec, ...]:
        return ADAM_MOMENTS + ((MAX_EXP_AVG_SQ,) if group["amsgrad"] else ())

    def _flags(self, group: dict[str, Any], step: int, matrix: bool) -> dict[str, Any]:
        return {
            "decay": group["weight_decay"] != 0,
            "decoupled": bool(group["decoupled_weight_decay"]),
            "amsgrad": bool(group["amsgrad"]),
        }

    def _coefficients(self, group: dict[str, Any], step: int, states: list) -> dict[str, float]:
        return adam_coefficients(group, step)

    @staticmethod
    def _update(
        p: Any, g: Any, state: dict, c: dict, *, decay: bool, decoupled: bool, amsgrad: bool, cautious: bool = False
    ) -> None:
        g = weight_decay(p, g, c, decay=decay, decoupled=decoupled)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        ema_(m, g, c["one_minus_beta1"])
        ema_square_(v, g, c["beta2"], c["one_minus_beta2"])
        if amsgrad:
            v = running_max_(state["max_exp_avg_sq"], v)
        denom = v.sqrt().div_(c["bc2_sqrt"]).add_(c["eps"])
        p.addcdiv_(cautious_direction(m, g, cautious), denom, value=c["neg_step_size"])

    def _native_fused(
        self, group: dict, ps: list, gs: list, states: list, flags: dict, step: Any, grad_scale: Any, found_inf: Any
    ) -> None:
        kernel = torch._fused_adamw_ if flags["decoupled"] else torch._fused_adam_
        beta1, beta2 = (scalar(b) for b in group["betas"])
        kernel(
            ps, gs, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            [s["max_exp_avg_sq"] for s in states] if flags["amsgrad"] else [], [s["step"] for s in states],
            lr=scalar(group["lr"]), beta1=beta1, beta2=beta2, weight_decay=scalar(group["weight_decay"]),
            eps=scalar(group["eps"]), amsgrad=flags["amsgrad"], maximize=group["maximize"],
            grad_scale=grad_scale, found_inf=found_inf,
        )  # fmt: skip


class AdamW(Adam):
    r"""Adam with decoupled weight decay (Loshchilov & Hutter, 2019, "Decoupled Weight Decay Regularization").

    .. math::
        \theta_t = (1-\eta\lambda)\theta_{t-1} - \frac{\eta}{1-\beta_1^t}\,
                   \frac{m_t}{\sqrt{\hat v_t}/\sqrt{1-\beta_2^t} + \epsilon}

    with :math:`m_t, \hat v_t` as in :class:`Adam`. Arguments and defaults follow ``torch.optim.AdamW``.
    """

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
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
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize, fused=fused,
            capturable=capturable, cautious=cautious, decouple_lr=decouple_lr,
            decoupled_weight_decay=True, nonfinite=nonfinite, state_dtype=state_dtype,
            weight_rounding=weight_rounding, rounding_seed=rounding_seed,
        )  # fmt: skip

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # AdamW is decoupled whatever a loaded state_dict says
            group["decoupled_weight_decay"] = True


class QHAdam(EngineOptimizer):
    r"""Quasi-hyperbolic Adam (Ma & Yarats, 2019, "Quasi-hyperbolic momentum and Adam for deep learning").

    .. math::
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        \theta_t &= \theta_{t-1} - \eta\,
            \frac{(1-\nu_1) g_t + \nu_1 m_t/(1-\beta_1^t)}{\sqrt{(1-\nu_2) g_t^2 + \nu_2 v_t/(1-\beta_2^t)} + \epsilon}

    ``nus = (1, 1)`` is Adam. Defaults are the paper's: ``betas = (0.995, 0.999)``, ``nus = (0.7, 1.0)``.
    """

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.995, 0.999),
        nus: tuple[float, float] = (0.7, 1.0),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        decouple_lr: bool = False,
        decoupled_weight_decay: bool = False,
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
            lr=lr, betas=betas, nus=nus, eps=eps, weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            maximize=maximize, foreach=foreach, fused=fused, capturable=capturable, nonfinite=nonfinite,
            state_dtype=state_dtype, weight_rounding=weight_rounding, rounding_seed=rounding_seed,
        )  # fmt: skip
        super().__init__(params, defaults)

    def _validate(self, group: dict[str, Any]) -> None:
        check_adam_group(group)
        nus = group["nus"]
        if not isinstance(nus, (tuple, list)) or len(nus) != 2:
            raise TypeError(f"nus must be a pair (nu1, nu2), got {nus!r}")
        checks.in_unit_interval("nus[0]", nus[0], closed_right=True)
        checks.in_unit_interval("nus[1]", nus[1], closed_right=True)
        checks.flag("decoupled_weight_decay", group["decoupled_weight_decay"])

    def _layout(self, group: dict[str, Any]) -> tuple[StateSpec, ...]:
        return ADAM_MOMENTS

    def _flags(self, group: dict[str, Any], step: int, matrix: bool) -> dict[str, Any]:
        return {"decay": group["weight_decay"] != 0, "decoupled": bool(group["decoupled_weight_decay"])}

    def _coefficients(self, group: dict[str, Any], step: int, states: list) -> dict[str, float]:
        c = adam_coefficients(group, step)
        nu1, nu2 = (scalar(n) for n in group["nus"])
        beta1, beta2 = (scalar(b) for b in group["betas"])
        c.update(
            grad_weight=1.0 - nu1,
            exp_avg_weight=nu1 / (1.0 - beta1**step),
            grad_sq_weight=1.0 - nu2,
            exp_avg_sq_weight=nu2 / (1.0 - beta2**step),
            neg_lr=-c["lr"],
        )
        return c

    @staticmethod
    def _update(p: Any, g: Any, state: dict, c: dict, *, decay: bool, decoupled: bool) -> None:
        g = weight_decay(p, g, c, decay=decay, decoupled=decoupled)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        ema_(m, g, c["one_minus_beta1"])
        ema_square_(v, g, c["beta2"], c["one_minus_beta2"])
        numerator = g.mul(c["grad_weight"]).add_(m, alpha=c["exp_avg_weight"])
        denom = (g * g).mul_(c["grad_sq_weight"]).add_(v, alpha=c["exp_avg_sq_weight"]).sqrt_().add_(c["eps"])
        p.addcdiv_(numerator, denom, value=c["neg_lr"])
