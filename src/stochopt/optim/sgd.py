"""Stochastic gradient descent: plain, heavy-ball, Nesterov, and quasi-hyperbolic momentum."""

from __future__ import annotations

from typing import Any

import torch

from stochopt.engine import STEP, EngineOptimizer, StateSpec, checks, scalar
from stochopt.engine.scalars import where
from stochopt.optim.common import (
    cautious_direction,
    decay_factor,
    heavy_ball_,
    l2_penalty,
    nesterov_direction,
    weight_decay,
)

#: the heavy-ball buffer (signed 8-bit codes under ``state_dtype="int8"``)
MOMENTUM_BUFFER = StateSpec("momentum_buffer", quantize="signed")


class SGD(EngineOptimizer):
    r"""Stochastic gradient descent with optional momentum, Nesterov momentum and L2 weight decay.

    With gradient :math:`g_t`, momentum :math:`\mu`, dampening :math:`\tau`, weight decay :math:`\lambda`:

    .. math::
        g_t &\leftarrow g_t + \lambda\theta_{t-1} \\
        b_t &= \mu b_{t-1} + (1-\tau) g_t \quad (b_1 = g_1) \\
        d_t &= g_t + \mu b_t \text{ (Nesterov) or } b_t \\
        \theta_t &= \theta_{t-1} - \eta\, d_t

    ``dampening = momentum`` gives the exponential-moving-average form :math:`b_t = \mu b_{t-1} + (1-\mu) g_t`.
    Full-batch gradient descent is this class fed full batches. Semantics, argument names and defaults follow
    ``torch.optim.SGD`` (Robbins & Monro, 1951; Polyak, 1964; Sutskever et al., 2013, "On the importance of
    initialization and momentum in deep learning").

    ``decoupled_weight_decay=True``: SGDW (Loshchilov & Hutter, 2019, Algorithm 1), the decay
    :math:`\theta \leftarrow (1 - \eta\lambda)\theta` apart from the gradient (and from the momentum), and with
    ``decouple_lr=True`` :math:`(1 - \lambda)\theta`, not scaled by the lr.

    ``cautious=True`` (needs momentum): :math:`d_t` masked where its sign disagrees with :math:`g_t`'s, rescaled
    by the fraction kept (:func:`stochopt.optim.common.cautious_direction`; Liang et al., 2024).
    """

    _cautious_supported = True

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        decoupled_weight_decay: bool = False,
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
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
            cautious=cautious, decoupled_weight_decay=decoupled_weight_decay, decouple_lr=decouple_lr,
            maximize=maximize, foreach=foreach, fused=fused, capturable=capturable, nonfinite=nonfinite,
            state_dtype=state_dtype, weight_rounding=weight_rounding, rounding_seed=rounding_seed,
        )  # fmt: skip
        super().__init__(params, defaults)

    def _validate(self, group: dict[str, Any]) -> None:
        checks.nonnegative("lr", group["lr"])
        checks.nonnegative("momentum", group["momentum"])
        checks.nonnegative("dampening", group["dampening"])
        checks.nonnegative("weight_decay", group["weight_decay"])
        checks.flag("nesterov", group["nesterov"])
        checks.flag("decoupled_weight_decay", group["decoupled_weight_decay"])
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(
                "nesterov=True needs momentum > 0 and dampening = 0, got "
                f"momentum={group['momentum']!r}, dampening={group['dampening']!r}"
            )
        if group["cautious"] and group["momentum"] <= 0:
            raise ValueError(
                f"cautious=True masks the momentum direction: it needs momentum > 0, got {group['momentum']!r}"
            )

    def _layout(self, group: dict[str, Any]) -> tuple[StateSpec, ...]:
        # no step count, as in torch.optim.SGD: its state_dict holds the momentum buffer alone
        return (MOMENTUM_BUFFER,) if group["momentum"] != 0 else ()

    def _flags(self, group: dict[str, Any], step: int, matrix: bool) -> dict[str, Any]:
        return {
            "momentum": group["momentum"] != 0,
            "nesterov": bool(group["nesterov"]),
            "decay": group["weight_decay"] != 0,
            "decoupled": bool(group["decoupled_weight_decay"]),
        }

    def _coefficients(self, group: dict[str, Any], step: int, states: list) -> dict[str, float]:
        # torch.optim.SGD starts the buffer at b_1 = g_1 (no dampening on the first step)
        dampening_factor = where(step == 1, 1.0, 1.0 - scalar(group["dampening"]))
        return {
            "neg_lr": -scalar(group["lr"]),
            "momentum": scalar(group["momentum"]),
            "dampening_factor": dampening_factor,
            "weight_decay": scalar(group["weight_decay"]),
            "decay_factor": decay_factor(group, scalar(group["lr"])),
        }

    @staticmethod
    def _update(
        p: Any,
        g: Any,
        state: dict,
        c: dict,
        *,
        momentum: bool,
        nesterov: bool,
        decay: bool,
        decoupled: bool = False,
        cautious: bool = False,
    ) -> None:
        g = weight_decay(p, g, c, decay=decay, decoupled=decoupled)
        u = g
        if momentum:
            buf = state["momentum_buffer"]
            heavy_ball_(buf, g, c["momentum"], c["dampening_factor"])
            u = cautious_direction(nesterov_direction(g, buf, c["momentum"]) if nesterov else buf, g, cautious)
        p.add_(u, alpha=c["neg_lr"])

    def _native_fused(
        self, group: dict, ps: list, gs: list, states: list, flags: dict, step: Any, grad_scale: Any, found_inf: Any
    ) -> None:
        buffers = [s["momentum_buffer"] for s in states] if flags["momentum"] else []
        decay = scalar(group["weight_decay"])
        if flags["decoupled"] and flags["decay"]:  # torch's kernel has L2 decay only: SGDW's factor first
            factor = decay_factor(group, scalar(group["lr"]))
            if found_inf is None:
                torch._foreach_mul_(ps, factor)
            else:  # a step skipped for found_inf must leave the weights as they were
                torch._foreach_mul_(ps, torch.where(found_inf > 0, 1.0, factor).to(ps[0].dtype))
            decay = 0.0
        torch._fused_sgd_(
            ps, gs, buffers, weight_decay=decay, momentum=scalar(group["momentum"]),
            lr=scalar(group["lr"]), dampening=scalar(group["dampening"]), nesterov=flags["nesterov"],
            maximize=group["maximize"], is_first_step=step == 1, grad_scale=grad_scale, found_inf=found_inf,
        )  # fmt: skip


class QHM(EngineOptimizer):
    r"""Quasi-hyperbolic momentum (Ma & Yarats, 2019, "Quasi-hyperbolic momentum and Adam for deep learning").

    .. math::
        g_t &\leftarrow g_t + \lambda\theta_{t-1} \\
        b_t &= \beta b_{t-1} + (1-\beta) g_t \\
        \theta_t &= \theta_{t-1} - \eta\,[(1-\nu) g_t + \nu b_t]

    ``nu = 0`` is plain SGD, ``nu = 1`` is EMA momentum: SGD(lr=eta (1-beta), momentum=beta). The paper's
    recommended default is ``nu = 0.7, beta = 0.999``.
    """

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-3,
        momentum: float = 0.999,
        nu: float = 0.7,
        weight_decay: float = 0.0,
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
            lr=lr, momentum=momentum, nu=nu, weight_decay=weight_decay,
            maximize=maximize, foreach=foreach, fused=fused, capturable=capturable, nonfinite=nonfinite,
            state_dtype=state_dtype, weight_rounding=weight_rounding, rounding_seed=rounding_seed,
        )  # fmt: skip
        super().__init__(params, defaults)

    def _validate(self, group: dict[str, Any]) -> None:
        checks.nonnegative("lr", group["lr"])
        checks.in_unit_interval("momentum", group["momentum"])
        checks.in_unit_interval("nu", group["nu"], closed_right=True)
        checks.nonnegative("weight_decay", group["weight_decay"])

    def _layout(self, group: dict[str, Any]) -> tuple[StateSpec, ...]:
        return (STEP, MOMENTUM_BUFFER)

    def _flags(self, group: dict[str, Any], step: int, matrix: bool) -> dict[str, Any]:
        return {"decay": group["weight_decay"] != 0}

    def _coefficients(self, group: dict[str, Any], step: int, states: list) -> dict[str, float]:
        lr, nu, beta = scalar(group["lr"]), scalar(group["nu"]), scalar(group["momentum"])
        return {
            "one_minus_beta": 1.0 - beta,
            "neg_grad_weight": -lr * (1.0 - nu),
            "neg_buf_weight": -lr * nu,
            "weight_decay": scalar(group["weight_decay"]),
        }

    @staticmethod
    def _update(p: Any, g: Any, state: dict, c: dict, *, decay: bool) -> None:
        if decay:
            g = l2_penalty(g, p, c["weight_decay"])
        buf = state["momentum_buffer"]
        buf.lerp_(g, c["one_minus_beta"])
        p.add_(g, alpha=c["neg_grad_weight"]).add_(buf, alpha=c["neg_buf_weight"])
