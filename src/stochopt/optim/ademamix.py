"""AdEMAMix: Adam with a second, slow EMA of the gradients mixed into the numerator."""

from __future__ import annotations

import math
from typing import Any

import torch

from stochopt.engine import STEP, EngineOptimizer, StateSpec, checks, scalar
from stochopt.engine.scalars import log, where
from stochopt.optim.common import bias_correction, cautious_direction, decay_factor, decoupled_decay_, ema_, ema_square_


def alpha_warmup(step: Any, alpha: Any, warmup: int | None) -> Any:
    """The paper's linear warm-up of ``alpha`` from 0: ``alpha * min(t / T_alpha, 1)``."""
    if warmup is None:
        return alpha
    return where(step < warmup, step / warmup * alpha, alpha)


def _half_life(beta: Any) -> Any:
    # the number of steps after which an EMA with this beta has halved a contribution, minus one; the 1e-8 of
    # the authors' code keeps beta = 0 (beta1 = 0, no fast EMA) finite
    return math.log(0.5) / log(beta + 1e-8) - 1.0


def beta3_warmup(step: Any, beta1: Any, beta3: Any, warmup: int | None) -> Any:
    """The paper's warm-up of ``beta3`` from ``beta1``, linear in the EMA's half-life (a linear schedule on beta
    itself would spend almost all of it at short memories): ``f^{-1}((1 - a) f(beta1) + a f(beta3))`` with
    ``a = t / T_beta3`` and ``f(beta) = ln 0.5 / ln beta - 1``, ``f^{-1}(h) = 0.5^{1 / (h + 1)}``."""
    if warmup is None:
        return beta3
    a = step / warmup
    mixed = (1.0 - a) * _half_life(beta1) + a * _half_life(beta3)
    return where(step < warmup, 0.5 ** (1.0 / (mixed + 1.0)), beta3)


class AdEMAMix(EngineOptimizer):
    r"""AdEMAMix (Pagliardini, Ablin & Grangier, 2024, "The AdEMAMix Optimizer: Better, Faster, Older",
    arXiv:2409.03137), Algorithm 1.

    .. math::
        m^{(1)}_t &= \beta_1 m^{(1)}_{t-1} + (1-\beta_1) g_t, \qquad
        m^{(2)}_t = \beta_3(t)\, m^{(2)}_{t-1} + (1-\beta_3(t))\, g_t, \qquad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        \theta_t &= (1-\eta\lambda)\theta_{t-1} - \eta\,
            \frac{m^{(1)}_t/(1-\beta_1^t) + \alpha(t)\, m^{(2)}_t}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon}

    The slow EMA (:math:`\beta_3` near 1) is not bias-corrected: its weight grows in with :math:`\alpha(t)`.
    ``alpha_warmup`` / ``beta3_warmup`` (steps, None: off) are the paper's schedulers: :math:`\alpha(t) =
    \alpha \min(t/T_\alpha, 1)` and :math:`\beta_3(t)` from :math:`\beta_1` to :math:`\beta_3` linearly in the
    half-life (:func:`beta3_warmup`); the paper sets both to the length of training for long runs. Weight decay
    is decoupled and scaled by lr (AdamW's). ``betas[0] = 0`` drops the fast EMA (the paper's memory-lean
    variant: :math:`m^{(1)}_t = g_t`, two state tensors as Adam). ``cautious=True`` masks the numerator where its
    sign disagrees with :math:`g_t`'s (Liang et al., 2024). Names and defaults are the authors' code's.
    """

    _decoupled_decay = True  # decay_factor on the weights: decouple_lr applies

    _cautious_supported = True

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
        alpha: float = 2.0,
        beta3_warmup: int | None = None,
        alpha_warmup: int | None = None,
        eps: float = 1e-8,
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
            lr=lr, betas=betas, alpha=alpha, beta3_warmup=beta3_warmup, alpha_warmup=alpha_warmup, eps=eps,
            weight_decay=weight_decay, cautious=cautious,
            maximize=maximize, foreach=foreach, fused=fused, capturable=capturable, nonfinite=nonfinite,
            state_dtype=state_dtype, weight_rounding=weight_rounding, rounding_seed=rounding_seed,
        )  # fmt: skip
        super().__init__(params, defaults)

    def _validate(self, group: dict[str, Any]) -> None:
        checks.nonnegative("lr", group["lr"])
        checks.betas(group["betas"], n=3)
        checks.nonnegative("alpha", group["alpha"])
        for name in ("beta3_warmup", "alpha_warmup"):
            if group[name] is not None:
                checks.count(name, group[name], 1)
        checks.eps("eps", group["eps"])
        checks.nonnegative("weight_decay", group["weight_decay"])

    def _layout(self, group: dict[str, Any]) -> tuple[StateSpec, ...]:
        fast = (StateSpec("exp_avg_fast", quantize="signed"),) if group["betas"][0] != 0 else ()
        slow = StateSpec("exp_avg_slow", quantize="signed")
        return (STEP, *fast, slow, StateSpec("exp_avg_sq", quantize="unsigned"))

    def _flags(self, group: dict[str, Any], step: int, matrix: bool) -> dict[str, Any]:
        return {"fast": group["betas"][0] != 0, "decay": group["weight_decay"] != 0}

    def _coefficients(self, group: dict[str, Any], step: Any, states: list) -> dict[str, Any]:
        lr = scalar(group["lr"])
        beta1, beta2, beta3 = (scalar(b) for b in group["betas"])
        beta3_t = beta3_warmup(step, beta1, beta3, group["beta3_warmup"])
        return {
            "one_minus_beta1": 1.0 - beta1,
            "beta2": beta2,
            "one_minus_beta2": 1.0 - beta2,
            "one_minus_beta3": 1.0 - beta3_t,
            "inv_bc1": 1.0 / bias_correction(beta1, step),
            "alpha": alpha_warmup(step, scalar(group["alpha"]), group["alpha_warmup"]),
            "bc2_sqrt": bias_correction(beta2, step) ** 0.5,
            "eps": scalar(group["eps"]),
            "neg_lr": -lr,
            "decay_factor": decay_factor(group, lr),
        }

    @staticmethod
    def _update(p: Any, g: Any, state: dict, c: dict, *, fast: bool, decay: bool, cautious: bool = False) -> None:
        if decay:
            decoupled_decay_(p, c["decay_factor"])
        slow, v = state["exp_avg_slow"], state["exp_avg_sq"]
        if fast:
            m = state["exp_avg_fast"]
            ema_(m, g, c["one_minus_beta1"])
            numerator = m.mul(c["inv_bc1"])
        else:
            numerator = g.mul(1.0)  # a fresh tensor: it is added to below
        ema_(slow, g, c["one_minus_beta3"])
        ema_square_(v, g, c["beta2"], c["one_minus_beta2"])
        numerator.add_(slow.mul(c["alpha"]))
        denom = v.sqrt().div_(c["bc2_sqrt"]).add_(c["eps"])
        p.addcdiv_(cautious_direction(numerator, g, cautious), denom, value=c["neg_lr"])
