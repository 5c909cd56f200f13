"""Adam variants that change how the moments become a step: NAdam, RAdam, AdaBound."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from stochopt.engine import STEP, EngineOptimizer, StateSpec, checks, scalar
from stochopt.engine.scalars import maximum, sqrt, where
from stochopt.optim.adam import ADAM_MOMENTS, MAX_EXP_AVG_SQ
from stochopt.optim.common import (
    adam_coefficients,
    bias_correction,
    check_adam_group,
    ema_,
    ema_square_,
    l2_penalty,
    running_max_,
    weight_decay,
)


class NAdam(EngineOptimizer):
    r"""NAdam: Adam with Nesterov momentum (Dozat, 2016, "Incorporating Nesterov Momentum into Adam"), with
    torch's momentum-decay schedule.

    .. math::
        \mu_t &= \beta_1 \left(1 - \tfrac12\, 0.96^{t\psi}\right), \qquad
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        \theta_t &= \theta_{t-1} - \eta \left[\frac{(1-\mu_t)\, g_t}{1-\prod_{i\le t}\mu_i}
            + \frac{\mu_{t+1}\, m_t}{1-\prod_{i\le t+1}\mu_i}\right]
            \Big/ \left(\sqrt{v_t/(1-\beta_2^t)} + \epsilon\right)

    with :math:`\psi` = ``momentum_decay``. Weight decay is L2 or, with ``decoupled_weight_decay=True``,
    decoupled (NAdamW). Arguments, defaults and state names follow ``torch.optim.NAdam``.
    """

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum_decay: float = 4e-3,
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
        defaults = dict(
            decouple_lr=decouple_lr,
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum_decay=momentum_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            maximize=maximize, foreach=foreach, fused=fused, capturable=capturable, nonfinite=nonfinite,
            state_dtype=state_dtype, weight_rounding=weight_rounding, rounding_seed=rounding_seed,
        )  # fmt: skip
        super().__init__(params, defaults)

    def _validate(self, group: dict[str, Any]) -> None:
        check_adam_group(group)
        checks.nonnegative("momentum_decay", group["momentum_decay"])
        checks.flag("decoupled_weight_decay", group["decoupled_weight_decay"])

    def _layout(self, group: dict[str, Any]) -> tuple[StateSpec, ...]:
        return (STEP, StateSpec("mu_product", shape="scalar", dtype="scalar", init=1.0)) + ADAM_MOMENTS[1:]

    def _flags(self, group: dict[str, Any], step: int, matrix: bool) -> dict[str, Any]:
        return {"decay": group["weight_decay"] != 0, "decoupled": bool(group["decoupled_weight_decay"])}

    @staticmethod
    def _mu(group: dict[str, Any], step: Any) -> Any:
        """The momentum coefficient of ``step`` (Dozat's warming schedule with ``momentum_decay``): a float for
        an int step, one per parameter for a step tensor (tensor mode)."""
        return scalar(group["betas"][0]) * (1.0 - 0.5 * 0.96 ** (step * scalar(group["momentum_decay"])))

    def _advance(self, group: dict[str, Any], step: Any, states: list) -> None:
        # The running product is scalar state, kept in torch's scalar dtype like torch.optim.NAdam keeps it.
        products = [s["mu_product"] for s in states]
        mu = self._mu(group, step)
        if not isinstance(mu, Tensor):
            torch._foreach_mul_(products, mu)
            return
        # tensor mode: one mu per parameter, on the step's device; the product is taken in the state's dtype, as
        # _foreach_mul_ takes it (mu rounded to that dtype, then one multiplication), and written back in place
        stacked = torch.stack(products).to(mu.device)
        for product, value in zip(products, (stacked * mu.to(stacked.dtype)).unbind()):
            product.copy_(value)

    def _coefficients(self, group: dict[str, Any], step: Any, states: list) -> dict[str, Any]:
        c = adam_coefficients(group, step)
        mu, mu_next = self._mu(group, step), self._mu(group, step + 1)
        if isinstance(step, Tensor):  # tensor mode: each parameter's own product, read on the device
            mu_product = torch.stack([s["mu_product"] for s in states]).to(device=step.device, dtype=step.dtype)
        else:
            mu_product = states[0]["mu_product"].item()
        c.update(
            bc2=bias_correction(scalar(group["betas"][1]), step),
            grad_coef=-c["lr"] * (1.0 - mu) / (1.0 - mu_product),
            exp_avg_coef=-c["lr"] * mu_next / (1.0 - mu_product * mu_next),
        )
        return c

    @staticmethod
    def _update(p: Any, g: Any, state: dict, c: dict, *, decay: bool, decoupled: bool) -> None:
        g = weight_decay(p, g, c, decay=decay, decoupled=decoupled)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        ema_(m, g, c["one_minus_beta1"])
        ema_square_(v, g, c["beta2"], c["one_minus_beta2"])
        denom = v.div(c["bc2"]).sqrt_().add_(c["eps"])
        p.addcdiv_(g, denom, value=c["grad_coef"])
        p.addcdiv_(m, denom, value=c["exp_avg_coef"])


class RAdam(EngineOptimizer):
    r"""Rectified Adam (Liu et al., 2020, "On the Variance of the Adaptive Learning Rate and Beyond").

    .. math::
        \rho_\infty &= \frac{2}{1-\beta_2} - 1, \qquad
        \rho_t = \rho_\infty - \frac{2 t \beta_2^t}{1-\beta_2^t} \\
        \theta_t &= \theta_{t-1} - \frac{\eta}{1-\beta_1^t}\, m_t \cdot
        \begin{cases} r_t \dfrac{\sqrt{1-\beta_2^t}}{\sqrt{v_t} + \epsilon} & \rho_t > 5 \\ 1 & \text{otherwise}
        \end{cases}, \qquad
        r_t = \sqrt{\frac{(\rho_t-4)(\rho_t-2)\rho_\infty}{(\rho_\infty-4)(\rho_\infty-2)\rho_t}}

    While the variance of the adaptive rate is intractable (:math:`\rho_t \le 5`) the step is momentum SGD.
    Weight decay is L2 or decoupled. Arguments, defaults and state names follow ``torch.optim.RAdam``.
    """

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
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
        defaults = dict(
            decouple_lr=decouple_lr,
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay,
            maximize=maximize, foreach=foreach, fused=fused, capturable=capturable, nonfinite=nonfinite,
            state_dtype=state_dtype, weight_rounding=weight_rounding, rounding_seed=rounding_seed,
        )  # fmt: skip
        super().__init__(params, defaults)

    def _validate(self, group: dict[str, Any]) -> None:
        check_adam_group(group)
        checks.flag("decoupled_weight_decay", group["decoupled_weight_decay"])

    def _layout(self, group: dict[str, Any]) -> tuple[StateSpec, ...]:
        return ADAM_MOMENTS

    @staticmethod
    def _rho(beta2: Any, step: Any) -> tuple[Any, Any]:
        rho_inf = 2.0 / (1.0 - beta2) - 1.0
        return rho_inf, rho_inf - 2.0 * step * beta2**step / bias_correction(beta2, step)

    def _flags(self, group: dict[str, Any], step: int, matrix: bool) -> dict[str, Any]:
        return {"decay": group["weight_decay"] != 0, "decoupled": bool(group["decoupled_weight_decay"])}

    def _coefficients(self, group: dict[str, Any], step: int, states: list) -> dict[str, float]:
        c = adam_coefficients(group, step)
        beta2 = scalar(group["betas"][1])
        rho_inf, rho_t = self._rho(beta2, step)
        # Both branches of the method are one expression, scale = a / (sqrt(v) + eps') + b, with (a, b) =
        # (r_t sqrt(1 - beta2^t), 0) once rectified and (0, 1) before: the fused kernel compiles once, and
        # eps' = 1 before rectification keeps a zero denominator from turning 0 * inf into NaN.
        # In tensor mode both branches are computed: r_t's radicand, negative for some rho_t <= 5, is clamped at 0
        # (where rho_t > 5 it is positive, and the clamp changes nothing).
        rectified = rho_t > 5.0
        rect = sqrt(maximum((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t), 0.0))
        c.update(
            adaptive_weight=where(rectified, rect * c["bc2_sqrt"], 0.0),
            sgd_weight=where(rectified, 0.0, 1.0),
            eps=where(rectified, c["eps"], 1.0),
        )
        return c

    @staticmethod
    def _update(p: Any, g: Any, state: dict, c: dict, *, decay: bool, decoupled: bool) -> None:
        g = weight_decay(p, g, c, decay=decay, decoupled=decoupled)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        ema_(m, g, c["one_minus_beta1"])
        ema_square_(v, g, c["beta2"], c["one_minus_beta2"])
        scale = v.sqrt().add_(c["eps"]).reciprocal_().mul_(c["adaptive_weight"]).add_(c["sgd_weight"])
        p.addcmul_(m, scale, value=c["neg_step_size"])


class AdaBound(EngineOptimizer):
    r"""AdaBound (Luo et al., 2019, "Adaptive Gradient Methods with Dynamic Bound of Learning Rate"); AMSBound
    with ``amsbound=True``.

    .. math::
        \eta^*_t &= \eta^\text{final}\,\eta/\eta_0, \qquad
        l_t = \eta^*_t\Big(1 - \frac{1}{\gamma t + 1}\Big), \quad u_t = \eta^*_t\Big(1 + \frac{1}{\gamma t}\Big) \\
        \theta_t &= \theta_{t-1} - \mathrm{clip}\!\left(\frac{\eta\sqrt{1-\beta_2^t}}{(1-\beta_1^t)
            (\sqrt{\hat v_t} + \epsilon)},\, l_t,\, u_t\right) m_t

    with Adam's :math:`m_t` and :math:`\hat v_t` (the running max for AMSBound) and L2 weight decay, as in the
    authors' implementation. :math:`\eta_0` is the group's lr when it was created, so a scheduler moves the
    bounds with lr. ``gamma = inf`` collapses both bounds to ``final_lr``: the method is then SGD with EMA
    momentum at that rate.
    """

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        final_lr: float = 0.1,
        gamma: float = 1e-3,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsbound: bool = False,
        *,
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
            lr=lr, betas=betas, final_lr=final_lr, gamma=gamma, eps=eps, weight_decay=weight_decay,
            amsbound=amsbound,
            maximize=maximize, foreach=foreach, fused=fused, capturable=capturable, nonfinite=nonfinite,
            state_dtype=state_dtype, weight_rounding=weight_rounding, rounding_seed=rounding_seed,
        )  # fmt: skip
        super().__init__(params, defaults)

    def _validate(self, group: dict[str, Any]) -> None:
        check_adam_group(group)
        checks.nonnegative("final_lr", group["final_lr"])
        gamma = group["gamma"]
        if not (isinstance(gamma, (int, float)) and not isinstance(gamma, bool) and gamma > 0):
            raise ValueError(f"gamma must be a number > 0 (inf allowed), got {gamma!r}")
        checks.flag("amsbound", group["amsbound"])

    def _init_group(self, group: dict[str, Any]) -> None:
        group.setdefault("base_lr", scalar(group["lr"]))  # eta_0: the bounds follow lr / base_lr

    def _advance(self, group: dict[str, Any], step: Any, states: list) -> None:
        # a group built with lr=0 (a warmup from 0) takes its first positive lr as eta_0: otherwise its bounds
        # would stay 0 whatever lr becomes
        lr, base = scalar(group["lr"]), group["base_lr"]
        if not isinstance(lr, Tensor) and not isinstance(base, Tensor):
            if base == 0.0 and lr > 0.0:
                group["base_lr"] = lr
        elif isinstance(base, Tensor):  # tensor mode, eta_0 still to be taken on the device: in place
            base.copy_(torch.where((base == 0.0) & (lr > 0.0), lr, base))
        elif base == 0.0:  # tensor mode with a tensor lr: eta_0 becomes a tensor (lr if positive, else 0)
            group["base_lr"] = torch.where(lr > 0.0, lr, torch.zeros_like(lr))

    def _layout(self, group: dict[str, Any]) -> tuple[StateSpec, ...]:
        return ADAM_MOMENTS + ((MAX_EXP_AVG_SQ,) if group["amsbound"] else ())

    def _flags(self, group: dict[str, Any], step: int, matrix: bool) -> dict[str, Any]:
        return {"decay": group["weight_decay"] != 0, "amsbound": bool(group["amsbound"])}

    def _coefficients(self, group: dict[str, Any], step: Any, states: list) -> dict[str, Any]:
        c = adam_coefficients(group, step)
        beta1, beta2 = (scalar(b) for b in group["betas"])
        base_lr = scalar(group["base_lr"])  # a tensor in tensor mode where _advance took eta_0 from a tensor lr
        if isinstance(base_lr, Tensor):  # 0/0 where eta_0 is 0 is not chosen
            final_lr = where(base_lr != 0.0, scalar(group["final_lr"]) * c["lr"] / base_lr, 0.0)
        else:
            final_lr = scalar(group["final_lr"]) * c["lr"] / base_lr if base_lr else 0.0
        gamma = float(group["gamma"])
        c.update(
            step_size=c["lr"] * sqrt(bias_correction(beta2, step)) / bias_correction(beta1, step),
            lower=final_lr * (1.0 - 1.0 / (gamma * step + 1.0)),
            upper=final_lr * (1.0 + 1.0 / (gamma * step)),
        )
        return c

    @staticmethod
    def _update(p: Any, g: Any, state: dict, c: dict, *, decay: bool, amsbound: bool) -> None:
        if decay:
            g = l2_penalty(g, p, c["weight_decay"])
        m, v = state["exp_avg"], state["exp_avg_sq"]
        ema_(m, g, c["one_minus_beta1"])
        ema_square_(v, g, c["beta2"], c["one_minus_beta2"])
        if amsbound:
            v = running_max_(state["max_exp_avg_sq"], v)
        rate = v.sqrt().add_(c["eps"]).reciprocal().mul_(c["step_size"]).clamp_(c["lower"], c["upper"])
        p.sub_(rate.mul_(m))
