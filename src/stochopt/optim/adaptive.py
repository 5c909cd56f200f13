"""Per-coordinate adaptive step sizes from accumulated squared gradients: Adagrad, RMSprop, Adadelta."""

from __future__ import annotations

from typing import Any

import torch

from stochopt.engine import STEP, EngineOptimizer, StateSpec, checks, scalar
from stochopt.optim.common import ema_, ema_square_, l2_penalty


def _common_checks(group: dict[str, Any]) -> None:
    checks.nonnegative("lr", group["lr"])
    checks.eps("eps", group["eps"])
    checks.nonnegative("weight_decay", group["weight_decay"])


class Adagrad(EngineOptimizer):
    r"""Adagrad (Duchi, Hazan & Singer, 2011, "Adaptive Subgradient Methods for Online Learning and Stochastic
    Optimization").

    .. math::
        g_t &\leftarrow g_t + \lambda\theta_{t-1}, \qquad \eta_t = \frac{\eta}{1 + (t-1)\,\text{lr\_decay}} \\
        s_t &= s_{t-1} + g_t^2 \quad (s_0 = \text{initial\_accumulator\_value}) \\
        \theta_t &= \theta_{t-1} - \eta_t\, \frac{g_t}{\sqrt{s_t} + \epsilon}

    Arguments, defaults and state names follow ``torch.optim.Adagrad``.
    """

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-2,
        lr_decay: float = 0.0,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        fused: bool | None = None,
        capturable: bool = False,
        nonfinite: str | None = None,
        state_dtype: torch.dtype | str | None = None,
        weight_rounding: str | None = None,
        rounding_seed: int = 0,
    ) -> None:
        defaults = dict(
            lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, initial_accumulator_value=initial_accumulator_value,
            eps=eps, maximize=maximize, foreach=foreach, fused=fused, capturable=capturable, nonfinite=nonfinite,
            state_dtype=state_dtype, weight_rounding=weight_rounding, rounding_seed=rounding_seed,
        )  # fmt: skip
        super().__init__(params, defaults)

    def _validate(self, group: dict[str, Any]) -> None:
        _common_checks(group)
        checks.nonnegative("lr_decay", group["lr_decay"])
        checks.nonnegative("initial_accumulator_value", group["initial_accumulator_value"])

    def _layout(self, group: dict[str, Any]) -> tuple[StateSpec, ...]:
        return (STEP, StateSpec("sum", init=float(group["initial_accumulator_value"]), quantize="unsigned"))

    def _flags(self, group: dict[str, Any], step: int, matrix: bool) -> dict[str, Any]:
        return {"decay": group["weight_decay"] != 0}

    def _coefficients(self, group: dict[str, Any], step: int, states: list) -> dict[str, float]:
        lr = scalar(group["lr"]) / (1.0 + (step - 1) * scalar(group["lr_decay"]))
        return {"neg_lr": -lr, "eps": scalar(group["eps"]), "weight_decay": scalar(group["weight_decay"])}

    @staticmethod
    def _update(p: Any, g: Any, state: dict, c: dict, *, decay: bool) -> None:
        if decay:
            g = l2_penalty(g, p, c["weight_decay"])
        s = state["sum"]
        s.addcmul_(g, g, value=1.0)
        p.addcdiv_(g, s.sqrt().add_(c["eps"]), value=c["neg_lr"])

    def _native_fused(
        self, group: dict, ps: list, gs: list, states: list, flags: dict, step: Any, grad_scale: Any, found_inf: Any
    ) -> None:
        torch._fused_adagrad_(
            ps, gs, [s["sum"] for s in states], [s["step"] for s in states], lr=scalar(group["lr"]),
            lr_decay=scalar(group["lr_decay"]), weight_decay=scalar(group["weight_decay"]), eps=scalar(group["eps"]),
            maximize=group["maximize"], grad_scale=grad_scale, found_inf=found_inf,
        )  # fmt: skip


class RMSprop(EngineOptimizer):
    r"""RMSprop (Tieleman & Hinton, 2012, Lecture 6.5 of "Neural Networks for Machine Learning"), with the
    centered form of Graves (2013) and momentum.

    .. math::
        v_t &= \alpha v_{t-1} + (1-\alpha) g_t^2, \qquad \bar g_t = \alpha \bar g_{t-1} + (1-\alpha) g_t \\
        \sigma_t &= \sqrt{v_t - \bar g_t^2} \text{ (centered) or } \sqrt{v_t} \\
        b_t &= \mu b_{t-1} + g_t / (\sigma_t + \epsilon), \qquad \theta_t = \theta_{t-1} - \eta\, b_t

    (without momentum, :math:`\theta_t = \theta_{t-1} - \eta g_t/(\sigma_t+\epsilon)`). Arguments, defaults and
    state names follow ``torch.optim.RMSprop``.
    """

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        centered: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        *,
        fused: bool | None = None,
        capturable: bool = False,
        nonfinite: str | None = None,
        state_dtype: torch.dtype | str | None = None,
        weight_rounding: str | None = None,
        rounding_seed: int = 0,
    ) -> None:
        defaults = dict(
            lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum, centered=centered,
            maximize=maximize, foreach=foreach, fused=fused, capturable=capturable, nonfinite=nonfinite,
            state_dtype=state_dtype, weight_rounding=weight_rounding, rounding_seed=rounding_seed,
        )  # fmt: skip
        super().__init__(params, defaults)

    def _validate(self, group: dict[str, Any]) -> None:
        _common_checks(group)
        checks.in_unit_interval("alpha", group["alpha"], closed_right=True)
        checks.nonnegative("momentum", group["momentum"])
        checks.flag("centered", group["centered"])

    def _layout(self, group: dict[str, Any]) -> tuple[StateSpec, ...]:
        layout = (STEP, StateSpec("square_avg", quantize="unsigned"))
        if group["momentum"] > 0:
            layout += (StateSpec("momentum_buffer", quantize="signed"),)
        if group["centered"]:
            layout += (StateSpec("grad_avg", quantize="signed"),)
        return layout

    def _flags(self, group: dict[str, Any], step: int, matrix: bool) -> dict[str, Any]:
        return {
            "decay": group["weight_decay"] != 0,
            "momentum": group["momentum"] > 0,
            "centered": bool(group["centered"]),
        }

    def _coefficients(self, group: dict[str, Any], step: int, states: list) -> dict[str, float]:
        alpha = scalar(group["alpha"])
        return {
            "alpha": alpha,
            "one_minus_alpha": 1.0 - alpha,
            "eps": scalar(group["eps"]),
            "momentum": scalar(group["momentum"]),
            "neg_lr": -scalar(group["lr"]),
            "weight_decay": scalar(group["weight_decay"]),
        }

    @staticmethod
    def _update(p: Any, g: Any, state: dict, c: dict, *, decay: bool, momentum: bool, centered: bool) -> None:
        if decay:
            g = l2_penalty(g, p, c["weight_decay"])
        v = state["square_avg"]
        ema_square_(v, g, c["alpha"], c["one_minus_alpha"])
        if centered:
            mean = state["grad_avg"]
            ema_(mean, g, c["one_minus_alpha"])
            avg = v.addcmul(mean, mean, value=-1.0).sqrt_()
        else:
            avg = v.sqrt()
        avg = avg.add_(c["eps"])
        if momentum:
            buf = state["momentum_buffer"]
            buf.mul_(c["momentum"]).addcdiv_(g, avg)
            p.add_(buf, alpha=c["neg_lr"])
        else:
            p.addcdiv_(g, avg, value=c["neg_lr"])


class Adadelta(EngineOptimizer):
    r"""Adadelta (Zeiler, 2012, "ADADELTA: An Adaptive Learning Rate Method").

    .. math::
        v_t &= \rho v_{t-1} + (1-\rho) g_t^2 \\
        \Delta_t &= \frac{\sqrt{u_{t-1} + \epsilon}}{\sqrt{v_t + \epsilon}}\, g_t \\
        u_t &= \rho u_{t-1} + (1-\rho) \Delta_t^2, \qquad \theta_t = \theta_{t-1} - \eta\, \Delta_t

    Arguments, defaults and state names follow ``torch.optim.Adadelta``.
    """

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1.0,
        rho: float = 0.9,
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        fused: bool | None = None,
        capturable: bool = False,
        nonfinite: str | None = None,
        state_dtype: torch.dtype | str | None = None,
        weight_rounding: str | None = None,
        rounding_seed: int = 0,
    ) -> None:
        defaults = dict(
            lr=lr, rho=rho, eps=eps, weight_decay=weight_decay,
            maximize=maximize, foreach=foreach, fused=fused, capturable=capturable, nonfinite=nonfinite,
            state_dtype=state_dtype, weight_rounding=weight_rounding, rounding_seed=rounding_seed,
        )  # fmt: skip
        super().__init__(params, defaults)

    def _validate(self, group: dict[str, Any]) -> None:
        _common_checks(group)
        checks.in_unit_interval("rho", group["rho"], closed_right=True)

    def _layout(self, group: dict[str, Any]) -> tuple[StateSpec, ...]:
        return (STEP, StateSpec("square_avg", quantize="unsigned"), StateSpec("acc_delta", quantize="unsigned"))

    def _flags(self, group: dict[str, Any], step: int, matrix: bool) -> dict[str, Any]:
        return {"decay": group["weight_decay"] != 0}

    def _coefficients(self, group: dict[str, Any], step: int, states: list) -> dict[str, float]:
        rho = scalar(group["rho"])
        return {
            "rho": rho,
            "one_minus_rho": 1.0 - rho,
            "eps": scalar(group["eps"]),
            "neg_lr": -scalar(group["lr"]),
            "weight_decay": scalar(group["weight_decay"]),
        }

    @staticmethod
    def _update(p: Any, g: Any, state: dict, c: dict, *, decay: bool) -> None:
        if decay:
            g = l2_penalty(g, p, c["weight_decay"])
        v, u = state["square_avg"], state["acc_delta"]
        ema_square_(v, g, c["rho"], c["one_minus_rho"])
        std = v.add(c["eps"]).sqrt_()
        delta = u.add(c["eps"]).sqrt_().div_(std).mul_(g)
        ema_square_(u, delta, c["rho"], c["one_minus_rho"])
        p.add_(delta, alpha=c["neg_lr"])
