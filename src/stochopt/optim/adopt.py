"""ADOPT: Adam with the current gradient left out of its own normalization."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from stochopt.engine import EngineOptimizer, StateSpec, checks, scalar
from stochopt.engine.scalars import where
from stochopt.optim.adam import ADAM_MOMENTS
from stochopt.optim.common import cautious_direction, decay_factor, decoupled_decay_, ema_, ema_square_, l2_penalty


def default_clip(step: Any) -> Any:
    """The authors' clipping schedule :math:`c(t) = t^{1/4}` (the value the convergence proof allows)."""
    return step**0.25


class ADOPT(EngineOptimizer):
    r"""ADOPT (Taniguchi et al., 2024, "ADOPT: Modified Adam Can Converge with Any :math:`\beta_2` with the
    Optimal Rate", NeurIPS, arXiv:2411.02853), with the clipping of the authors' later version.

    .. math::
        v_0 &= g_0^2 \quad \text{(the first step only initializes } v\text{)} \\
        m_t &= \beta_1 m_{t-1} + (1-\beta_1)\,
            \mathrm{clip}\!\left(\frac{g_t}{\max(\sqrt{v_{t-1}}, \epsilon)},\, c(t)\right) \\
        \theta_t &= \theta_{t-1} - \eta\, m_t, \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2

    The gradient is normalized by the second moment of the *previous* gradients, so that the two are
    independent (Adam's failure to converge for small :math:`\beta_2` comes from their correlation), and the
    momentum is taken after the normalization. ``clip_lambda(t)`` bounds the normalized gradient elementwise
    (None: no clipping, the paper's first version); ``t`` counts the updates, so the second call of ``step`` has
    ``t = 1``; with ``capturable=True`` it receives a tensor. Weight decay is L2, or decoupled
    (:math:`\theta \leftarrow (1-\eta\lambda)\theta`) with ``decouple=True``. Names and defaults are the authors'
    package's (``torch-adopt``). ``cautious=True`` masks :math:`m_t` where its sign disagrees with the
    gradient's (Liang et al., 2024).
    """

    _cautious_supported = True

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.9999),
        eps: float = 1e-6,
        clip_lambda: Callable[[Any], Any] | None = default_clip,
        weight_decay: float = 0.0,
        decouple: bool = False,
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
        if clip_lambda is not None and not callable(clip_lambda):
            raise TypeError(f"clip_lambda must be a function of the step or None, got {clip_lambda!r}")
        # kept on the optimizer, as the authors' package keeps it: a function does not belong in a state_dict
        self.clip_lambda = clip_lambda
        defaults = dict(
            decouple_lr=decouple_lr,
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decouple=decouple, cautious=cautious,
            maximize=maximize, foreach=foreach, fused=fused, capturable=capturable, nonfinite=nonfinite,
            state_dtype=state_dtype, weight_rounding=weight_rounding, rounding_seed=rounding_seed,
        )  # fmt: skip
        super().__init__(params, defaults)

    def _validate(self, group: dict[str, Any]) -> None:
        checks.nonnegative("lr", group["lr"])
        checks.betas(group["betas"])
        checks.eps("eps", group["eps"])
        checks.nonnegative("weight_decay", group["weight_decay"])
        checks.flag("decouple", group["decouple"])

    def _layout(self, group: dict[str, Any]) -> tuple[StateSpec, ...]:
        return ADAM_MOMENTS

    def _decouples_decay(self, group: dict[str, Any]) -> bool:
        return bool(group["decouple"])

    def _flags(self, group: dict[str, Any], step: int, matrix: bool) -> dict[str, Any]:
        decay = group["weight_decay"] != 0
        return {"decay": decay, "decoupled": bool(group["decouple"]), "clip": self.clip_lambda is not None}

    def _coefficients(self, group: dict[str, Any], step: Any, states: list) -> dict[str, Any]:
        lr = scalar(group["lr"])
        beta1, beta2 = (scalar(b) for b in group["betas"])
        wd = scalar(group["weight_decay"])
        first = step == 1  # the first step sets v = g^2 and moves nothing
        t = step - 1
        return {
            "weight_decay": wd,
            "grad_weight": where(first, 0.0, 1.0),
            "one_minus_beta1": where(first, 0.0, 1.0 - beta1),
            "beta2": where(first, 0.0, beta2),
            "one_minus_beta2": where(first, 1.0, 1.0 - beta2),
            "neg_lr": where(first, 0.0, -lr),
            "decay_factor": where(first, 1.0, decay_factor(group, lr)),
            "eps": scalar(group["eps"]),
            "clip": self.clip_lambda(t) if self.clip_lambda is not None else 0.0,
        }

    @staticmethod
    def _update(
        p: Any, g: Any, state: dict, c: dict, *, decay: bool, decoupled: bool, clip: bool, cautious: bool = False
    ) -> None:
        if decay and not decoupled:
            g = l2_penalty(g, p, c["weight_decay"])
        m, v = state["exp_avg"], state["exp_avg_sq"]
        # grad_weight is 0 on the first step: its g / eps (v is still 0) must not overflow into m's lerp
        normed = g.mul(c["grad_weight"]).div_(v.sqrt().clamp_(min=c["eps"]))
        if clip:
            normed = normed.clamp(min=-c["clip"], max=c["clip"])
        ema_(m, normed, c["one_minus_beta1"])
        if decay and decoupled:
            decoupled_decay_(p, c["decay_factor"])
        p.add_(cautious_direction(m, g, cautious), alpha=c["neg_lr"])
        ema_square_(v, g, c["beta2"], c["one_minus_beta2"])
