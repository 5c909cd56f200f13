"""Layer-wise adaptive rates for large batches: LAMB and LARS scale each tensor's step by a trust ratio."""

from __future__ import annotations

from typing import Any

import torch

from stochopt.engine import STEP, EngineOptimizer, StateSpec, checks, scalar
from stochopt.engine.fused import ELEMENTWISE_OPTIONS
from stochopt.optim.adam import ADAM_MOMENTS
from stochopt.optim.common import (
    adam_coefficients,
    bias_correction,
    check_adam_group,
    ema_,
    ema_square_,
    l2_penalty,
    norm,
    trust_ratio,
)


class Lamb(EngineOptimizer):
    r"""LAMB (You et al., 2019, "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes").

    Per tensor:

    .. math::
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        u_t &= \frac{m_t/(1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon} + \lambda\theta_{t-1} \\
        r_t &= \min\!\Big(\frac{\|\theta_{t-1}\|}{\|u_t\|},\, r_\text{max}\Big) \text{ (1 when either norm is 0)},
        \qquad \theta_t = \theta_{t-1} - \eta\, r_t\, u_t

    A param group with ``trust_ratio=False`` takes the plain AdamW-like step :math:`r_t = 1`, and one with
    ``weight_decay=0`` no decay: put biases and norm weights in such a group, as the paper does.
    ``max_trust_ratio=None`` leaves the ratio unclamped.
    """

    # Inductor stores a pointwise expression that reads more tensors than realize_reads_threshold (4) in a
    # buffer of its own: the update u (read from m, v, p) became a tensor-sized temporary, written by the loop
    # that sums its norm and read back by the one that writes p, allocated afresh every step (on Linux a
    # fresh mapping, faulted in page by page). At 100 u is recomputed from m, v and p in the second loop: 10
    # passes over memory instead of 11 plus the temporary (measured on the 30M set: 97.5 -> 74.7 ms a step;
    # docs/speed.md). (realize_opcount_threshold=4, the earlier choice, kept the trust ratio out of the
    # update loop but also stored u: 92.4-96.6 ms.)
    _compile_options = {**ELEMENTWISE_OPTIONS, "realize_reads_threshold": 100}
    _whole_tensor_update = True  # the trust ratio's norms
    _update_statistics = ("trust_ratio",)

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        trust_ratio: bool = True,
        max_trust_ratio: float | None = None,
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
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, trust_ratio=trust_ratio,
            max_trust_ratio=max_trust_ratio,
            maximize=maximize, foreach=foreach, fused=fused, capturable=capturable, nonfinite=nonfinite,
            state_dtype=state_dtype, weight_rounding=weight_rounding, rounding_seed=rounding_seed,
        )  # fmt: skip
        super().__init__(params, defaults)

    def _validate(self, group: dict[str, Any]) -> None:
        check_adam_group(group)
        checks.flag("trust_ratio", group["trust_ratio"])
        if group["max_trust_ratio"] is not None:
            checks.positive("max_trust_ratio", group["max_trust_ratio"])

    def _layout(self, group: dict[str, Any]) -> tuple[StateSpec, ...]:
        return ADAM_MOMENTS

    def _flags(self, group: dict[str, Any], step: int, matrix: bool) -> dict[str, Any]:
        return {
            "decay": group["weight_decay"] != 0,
            "adapt": bool(group["trust_ratio"]),
            "clamp": group["max_trust_ratio"] is not None,
        }

    def _coefficients(self, group: dict[str, Any], step: int, states: list) -> dict[str, float]:
        c = adam_coefficients(group, step)
        c.update(
            inv_bc1=1.0 / bias_correction(scalar(group["betas"][0]), step),
            inv_bc2_sqrt=1.0 / c["bc2_sqrt"],
            neg_lr=-c["lr"],
            max_trust_ratio=scalar(group["max_trust_ratio"]) if group["max_trust_ratio"] is not None else 0.0,
        )
        return c

    @staticmethod
    def _update(p: Any, g: Any, state: dict, c: dict, *, decay: bool, adapt: bool, clamp: bool) -> None:
        m, v = state["exp_avg"], state["exp_avg_sq"]
        ema_(m, g, c["one_minus_beta1"])
        ema_square_(v, g, c["beta2"], c["one_minus_beta2"])
        u = m.mul(c["inv_bc1"]).div_(v.sqrt().mul_(c["inv_bc2_sqrt"]).add_(c["eps"]))
        if decay:
            u.add_(p, alpha=c["weight_decay"])
        if adapt:
            ratio = trust_ratio(norm(p), norm(u), c["max_trust_ratio"] if clamp else None)
            state["stat_trust_ratio"] = ratio  # for the statistics (engine/statistics.py); the update ignores it
            u.mul_(ratio)
        p.add_(u, alpha=c["neg_lr"])


class Lars(EngineOptimizer):
    r"""LARS (You, Gitman & Ginsburg, 2017, "Large Batch Training of Convolutional Networks").

    Per tensor, with trust coefficient :math:`\eta_{tc}`:

    .. math::
        \lambda_t &= \eta_{tc}\, \frac{\|\theta_{t-1}\|}{\|g_t\| + \beta \|\theta_{t-1}\| + \epsilon}
            \text{ (1 when either norm is 0)} \\
        b_t &= \mu b_{t-1} + \eta\, \lambda_t\, (g_t + \beta\theta_{t-1}), \qquad \theta_t = \theta_{t-1} - b_t

    with weight decay :math:`\beta` and momentum :math:`\mu` (the paper's Algorithm 1). Parameters of one
    dimension (biases, norm weights) are excluded by default (``exclude_1d=True``): they take the plain momentum
    step :math:`\lambda_t = 1` without weight decay.
    """

    _whole_tensor_update = True  # the trust ratio's norms
    _update_statistics = ("trust_ratio",)

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 1e-3,
        eps: float = 1e-8,
        exclude_1d: bool = True,
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
            lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient, eps=eps,
            exclude_1d=exclude_1d,
            maximize=maximize, foreach=foreach, fused=fused, capturable=capturable, nonfinite=nonfinite,
            state_dtype=state_dtype, weight_rounding=weight_rounding, rounding_seed=rounding_seed,
        )  # fmt: skip
        super().__init__(params, defaults)

    def _validate(self, group: dict[str, Any]) -> None:
        checks.nonnegative("lr", group["lr"])
        checks.in_unit_interval("momentum", group["momentum"])
        checks.nonnegative("weight_decay", group["weight_decay"])
        checks.positive("trust_coefficient", group["trust_coefficient"])
        checks.nonnegative("eps", group["eps"])
        checks.flag("exclude_1d", group["exclude_1d"])

    def _layout(self, group: dict[str, Any]) -> tuple[StateSpec, ...]:
        return (STEP, StateSpec("momentum_buffer", quantize="signed"))

    def _flags(self, group: dict[str, Any], step: int, matrix: bool) -> dict[str, Any]:
        adapt = matrix or not group["exclude_1d"]
        return {"adapt": adapt, "decay": adapt and group["weight_decay"] != 0}

    def _coefficients(self, group: dict[str, Any], step: int, states: list) -> dict[str, float]:
        return {
            "lr": scalar(group["lr"]),
            "momentum": scalar(group["momentum"]),
            "weight_decay": scalar(group["weight_decay"]),
            "trust_coefficient": scalar(group["trust_coefficient"]),
            "eps": scalar(group["eps"]),
        }

    @staticmethod
    def _update(p: Any, g: Any, state: dict, c: dict, *, adapt: bool, decay: bool) -> None:
        buf = state["momentum_buffer"]
        if adapt:
            p_norm, g_norm = norm(p), norm(g)
            denominator = g_norm.add(p_norm.mul(c["weight_decay"])).add(c["eps"])
            local_lr = trust_ratio(p_norm.mul(c["trust_coefficient"]), denominator, guard=g_norm)
            state["stat_trust_ratio"] = local_lr  # for the statistics (engine/statistics.py)
        if decay:
            g = l2_penalty(g, p, c["weight_decay"])
        buf.mul_(c["momentum"])
        if adapt:
            buf.add_(g.mul(local_lr.mul(c["lr"])))
        else:
            buf.add_(g, alpha=c["lr"])
        p.sub_(buf)
