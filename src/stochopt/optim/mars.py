"""MARS: AdamW on a variance-reduced gradient estimate (the difference of consecutive gradients)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from stochopt.engine import EngineOptimizer, StateSpec, checks, scalar
from stochopt.optim.adam import ADAM_MOMENTS
from stochopt.optim.common import (
    adam_coefficients,
    cautious_direction,
    decoupled_decay_,
    ema_,
    ema_square_,
    norm,
)


class MARS(EngineOptimizer):
    r"""MARS-AdamW (Yuan et al., 2024, "MARS: Unleashing the Power of Variance Reduction for Training Large
    Models", arXiv:2411.10438), the approximate form of its Algorithm 2 (the gradient of the previous step
    stands in for the gradient at the previous iterate on the current batch).

    .. math::
        c_t &= g_t + \gamma\,\frac{\beta_1}{1-\beta_1}\,(g_t - g_{t-1}), \qquad
        \tilde c_t = c_t / \max(1, \|c_t\|_2) \quad (g_0 = 0) \\
        m_t &= \beta_1 m_{t-1} + (1-\beta_1)\tilde c_t, \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2)\tilde c_t^2 \\
        \theta_t &= (1-\eta\lambda)\theta_{t-1} - \frac{\eta}{1-\beta_1^t}\,
            \frac{m_t}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon}

    :math:`\gamma` scales the correction (``gamma``; 0 is AdamW on norm-clipped gradients); the norm clipping
    is per tensor. Tensors of one dimension (biases, norms) take plain AdamW with ``betas_1d``,
    ``weight_decay_1d`` and the rate ``lr * lr_1d / lr_0``, the ratio fixed when the group is added (so that a
    scheduler moves both; a group added with lr = 0 takes the ratio to the constructor's lr), unless
    ``optimize_1d=True``, as in the authors' code, whose names and defaults these are. Deviation: the authors'
    code gives MARS to exactly-2-D tensors only (a convolution kernel takes its AdamW branch); here every tensor
    of two or more dimensions is a matrix. ``cautious=True`` masks :math:`m_t` where its sign disagrees with the
    gradient's (Liang et al., 2024).
    """

    _decoupled_decay = True  # decay_factor on the weights: decouple_lr applies

    _cautious_supported = True

    def _whole_tensor(self, group: dict[str, Any], p: Tensor) -> bool:
        return p.dim() > 1 or super()._whole_tensor(group, p)  # matrices clip the corrected gradient by its norm

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 3e-3,
        betas: tuple[float, float] = (0.95, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        gamma: float = 0.025,
        optimize_1d: bool = False,
        lr_1d: float = 3e-3,
        betas_1d: tuple[float, float] = (0.9, 0.95),
        weight_decay_1d: float = 0.1,
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
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, gamma=gamma, optimize_1d=optimize_1d,
            lr_1d=lr_1d, betas_1d=betas_1d, weight_decay_1d=weight_decay_1d, cautious=cautious,
            maximize=maximize, foreach=foreach, fused=fused, capturable=capturable, nonfinite=nonfinite,
            state_dtype=state_dtype, weight_rounding=weight_rounding, rounding_seed=rounding_seed,
        )  # fmt: skip
        super().__init__(params, defaults)

    def _validate(self, group: dict[str, Any]) -> None:
        checks.nonnegative("lr", group["lr"])
        checks.betas(group["betas"])
        checks.eps("eps", group["eps"])
        checks.nonnegative("weight_decay", group["weight_decay"])
        checks.nonnegative("gamma", group["gamma"])
        checks.flag("optimize_1d", group["optimize_1d"])
        checks.nonnegative("lr_1d", group["lr_1d"])
        checks.betas(group["betas_1d"], name="betas_1d")
        checks.nonnegative("weight_decay_1d", group["weight_decay_1d"])

    def _init_group(self, group: dict[str, Any]) -> None:
        if not group["optimize_1d"]:
            # the authors' ratio lr_1d / lr, fixed here; a group added with lr = 0 takes the constructor's lr
            lr = scalar(group["lr"]) or scalar(self.defaults["lr"])
            group.setdefault("lr_1d_factor", scalar(group["lr_1d"]) / lr if lr else 1.0)

    def _layout(self, group: dict[str, Any]) -> tuple[StateSpec, ...]:
        applies = "all" if group["optimize_1d"] else "matrix"
        return (*ADAM_MOMENTS, StateSpec("last_grad", applies=applies))

    def _flags(self, group: dict[str, Any], step: int, matrix: bool) -> dict[str, Any]:
        mars = matrix or bool(group["optimize_1d"])
        return {"mars": mars, "decay": group["weight_decay" if mars else "weight_decay_1d"] != 0}

    def _coefficients(self, group: dict[str, Any], step: Any, states: list) -> dict[str, Any]:
        c = adam_coefficients(group, step)
        beta1 = scalar(group["betas"][0])
        c["correction"] = scalar(group["gamma"]) * beta1 / (1.0 - beta1)
        if group["optimize_1d"]:
            return c
        vector_group = {
            "lr": c["lr"] * group["lr_1d_factor"], "betas": group["betas_1d"], "eps": group["eps"],
            "weight_decay": group["weight_decay_1d"], "decouple_lr": group["decouple_lr"],
        }  # fmt: skip
        c.update({f"{k}_1d": v for k, v in adam_coefficients(vector_group, step).items()})
        return c

    @staticmethod
    def _update(p: Any, g: Any, state: dict, c: dict, *, mars: bool, decay: bool, cautious: bool = False) -> None:
        m, v = state["exp_avg"], state["exp_avg_sq"]
        suffix = "" if mars else "_1d"
        if mars:
            last = state["last_grad"]
            x = last.sub(g).mul_(-c["correction"]).add_(g)  # g + correction (g - last)
            last.copy_(g)
            clip = norm(x).clamp(min=1.0)
            x = x.div_(clip)
        else:
            x = g
        ema_(m, x, c["one_minus_beta1" + suffix])
        ema_square_(v, x, c["beta2" + suffix], c["one_minus_beta2" + suffix])
        if decay:
            decoupled_decay_(p, c["decay_factor" + suffix])
        denom = v.sqrt().div_(c["bc2_sqrt" + suffix]).add_(c["eps" + suffix])
        p.addcdiv_(cautious_direction(m, g, cautious), denom, value=c["neg_step_size" + suffix])
