"""Prodigy (Mishchenko & Defazio, 2024): Adam whose step size d is estimated as it trains, learning-rate free.

The optimizer follows the authors' ``prodigyopt`` package (v1.1.2): the same arguments and defaults, the same
state (``s``, ``p0``, ``exp_avg``, ``exp_avg_sq``, ``step``) and the same entries in every param group (``d``,
``d_max``, ``d_numerator``, ``d_denom``, ``d_hat``, ``k``), which users read to log the step size (``d * lr``).

A step has two parts. The estimate of d is one for the whole optimizer: its sums run over every parameter of
every group (an inner product with the distance travelled and the L1 norm of ``s``), read on the host once per
step (the package reads them twice per tensor), and decide the new d in Python floats, as the package's do. This
runs before any group is updated (``_step_group``, on its first call of the step). The elementwise part, Adam's
moments and the step of the parameters, is ``_update``, which runs as the loop, foreach and fused paths.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from stochopt.engine import STEP, EngineOptimizer, StateSpec, centralize, checks, scalar, sharded
from stochopt.engine.layout import compute_dtype_for
from stochopt.optim.common import bias_correction, ema_square_, heavy_ball_, l2_penalty

#: options of the one d estimate: every param group must hold the first group's values (the package reads them
#: from the first group and ignores the others')
SHARED = ("betas", "beta3", "d0", "d_coef", "growth_rate", "use_bias_correction", "decouple", "fsdp_in_use")
#: the group entries of the d estimate (the package's names), with their values before the first step
GROUP_STATE = ("d", "d_max", "d_numerator", "k")


@dataclass(frozen=True)
class SlicedShape:
    """Shape rule of ``s`` and ``p0``: every ``slice_p``-th entry of the flattened parameter."""

    slice_p: int

    def __call__(self, shape: torch.Size) -> tuple[int, ...]:
        return (-(-math.prod(shape) // self.slice_p),)


@dataclass(frozen=True)
class _Plan:
    """One step's scalars, decided before the elementwise updates: d before (``d``) and after (``d_new``) this
    step's estimate, the step size ``dlr`` = d lr (bias correction), and whether the parameters move (False while
    no gradient has reached the estimate: the package returns before its parameter loop then)."""

    d: float
    d_new: float
    dlr: float
    moves: bool


def _number(value: Any) -> float:
    """A hyperparameter as a Python float, read on the host (the d estimate decides there)."""
    return float(value.item()) if isinstance(value, Tensor) else float(value)


class Prodigy(EngineOptimizer):
    r"""Prodigy (Mishchenko & Defazio, 2024, "Prodigy: An Expeditiously Adaptive Parameter-Free Learner",
    arXiv:2306.06101): Adam with the step size :math:`d_k` estimated from the distance travelled, as the
    authors' ``prodigyopt`` package computes it. Leave ``lr = 1`` (the estimate is the step size; ``lr`` scales
    it, and a schedule on ``lr`` is a schedule on the step).

    With the gradient :math:`g_k` at step :math:`k` (plus :math:`\lambda x_k` for ``decouple=False``),
    :math:`\beta_3 = \sqrt{\beta_2}` unless given, :math:`\rho_k = \sqrt{1-\beta_2^{k+1}}/(1-\beta_1^{k+1})`
    with ``use_bias_correction`` (else 1) and the step size :math:`\eta_k = d_k\,\mathrm{lr}\,\rho_k`:

    .. math::
        m_{k+1} &= \beta_1 m_k + (1-\beta_1)\, d_k g_k, \qquad
        v_{k+1} = \beta_2 v_k + (1-\beta_2)\, d_k^2 g_k^2 \\
        r_{k+1} &= \beta_3 r_k + \tfrac{d_k}{d_0}\,\eta_k \langle g_k, x_0 - x_k \rangle, \qquad
        s_{k+1} = \beta_3 s_k + \tfrac{d_k}{d_0}\, w_k\, g_k,
        \quad w_k = d_k \text{ (safeguard\_warmup) or } \eta_k \\
        \hat d_{k+1} &= c_d\, \frac{r_{k+1}}{\|s_{k+1}\|_1}, \qquad
        d^\text{max}_{k+1} = \max(d^\text{max}_k, \hat d_{k+1}), \qquad
        d_{k+1} = \min(d^\text{max}_{k+1},\, \gamma\, d_k') \\
        x_{k+1} &= x_k - \eta_k \frac{m_{k+1}}{\sqrt{v_{k+1}} + d_{k+1}\epsilon}
            \;\big[-\,\eta_k \lambda x_k \text{ with decoupled weight decay}\big]

    where :math:`d_k' = \max(d_k, \hat d_{k+1})` while :math:`d_k = d_0` (the first estimate may jump past the
    growth limit :math:`\gamma` = ``growth_rate``) and :math:`d_k` after, :math:`c_d` = ``d_coef``, and
    :math:`\beta_1 = 0` steps along :math:`d_{k+1} g_k` instead of :math:`m_{k+1}`. This is the paper's Adam
    version with the package's additions: the :math:`d_k/d_0` scale of :math:`r` and :math:`s` (their
    ratio is unchanged), ``d_coef``, ``growth_rate``, the running maximum ``d_max`` and ``safeguard_warmup``.
    With ``slice_p`` > 1, :math:`s`, :math:`x_0` and the inner product take every ``slice_p``-th entry of each
    flattened tensor (an approximation that saves memory; the package's option).

    The estimate is one for the optimizer, over every param group (as the package's): ``betas``, ``beta3``,
    ``d0``, ``d_coef``, ``growth_rate``, ``use_bias_correction``, ``decouple`` and ``fsdp_in_use`` must be the
    same in every group (a ValueError names the one that differs; the package takes the first group's silently),
    and a group's ``lr`` is the others' or 0. ``weight_decay``, ``eps``, ``safeguard_warmup`` and ``slice_p`` are
    per group. Every group holds the estimate's state: ``group["d"]``, ``d_max``, ``d_numerator``, ``d_denom``,
    ``d_hat`` and the step count ``k``; the step size taken is ``d * lr`` (times the bias correction).
    ``fsdp_in_use=True`` (set by itself where a parameter is FSDP's flattened one) sums the estimate's two sums
    over the processes of the default ``torch.distributed`` group, in float64: set it wherever each process steps
    its own share of the parameters (FSDP, ``ZeroRedundancyOptimizer``); a process without gradients joins the sum.

    Differences from ``prodigyopt`` 1.1.2, each where the package's behaviour is a side effect rather than the
    method: a group with ``lr = 0`` does not move (the package still applies decoupled weight decay to it and, for
    :math:`\beta_1 = 0`, the gradient step); ``p.grad`` is not changed (the package adds the L2 term to it in
    place); ``p0`` is kept for all-zero parameters too (the package keeps a 0-d zero, the same numbers); with
    ``fsdp_in_use`` the sums are reduced in float64 (the package's float32), and a step whose sums are 0 on every
    process is skipped as in one process; low-precision parameters compute the estimate in float32 (the engine's
    precision rule; the package in their dtype). ``state["step"]`` also counts a step that left the parameters in
    place because no gradient had reached the estimate yet.

    ``capturable=True`` is refused: the estimate decides on the host (the step is skipped while its denominator
    is 0, the first estimate's jump) and ``group["d"]`` is a Python float that users read. A device form would need
    ``d`` as a tensor in every group; the engine's paths (loop, foreach, fused) are the ones that run. Under
    ``torch.compile`` the step runs eagerly (``torch.compiler.disable``), and a compiled training step equals the
    eager one.
    """

    _group_statistics = ("d",)  # the step size it estimated

    _capturable = False  # the d estimate is read and decided on the host, once per step (see the docstring)
    _whole_tensor_update = True  # sharded: each owner's sums, reduced over the processes (see _reduces)

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        beta3: float | None = None,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decouple: bool = True,
        use_bias_correction: bool = False,
        safeguard_warmup: bool = False,
        d0: float = 1e-6,
        d_coef: float = 1.0,
        growth_rate: float = math.inf,
        fsdp_in_use: bool = False,
        slice_p: int = 1,
        *,
        decouple_lr: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        nonfinite: str | None = None,
        state_dtype: torch.dtype | str | None = None,
        weight_rounding: str | None = None,
        rounding_seed: int = 0,
    ) -> None:
        self._plan: _Plan | None = None
        self._fresh: set[int] = set()
        defaults = dict(
            lr=lr, betas=betas, beta3=beta3, eps=eps, weight_decay=weight_decay, decouple=decouple,
            decouple_lr=decouple_lr,
            use_bias_correction=use_bias_correction, safeguard_warmup=safeguard_warmup, d0=d0, d_coef=d_coef,
            growth_rate=growth_rate, fsdp_in_use=fsdp_in_use, slice_p=slice_p,
            maximize=maximize, foreach=foreach, fused=fused, capturable=capturable, nonfinite=nonfinite,
            state_dtype=state_dtype, weight_rounding=weight_rounding, rounding_seed=rounding_seed,
        )  # fmt: skip
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._plan, self._fresh = None, set()

    # ----- the hyperparameters -----------------------------------------------------------------------------------
    def _decouples_decay(self, group: dict[str, Any]) -> bool:
        return bool(group["decouple"])

    def _validate(self, group: dict[str, Any]) -> None:
        checks.nonnegative("lr", group["lr"])
        checks.betas(group["betas"])
        if group["beta3"] is not None:
            checks.in_unit_interval("beta3", group["beta3"], closed_right=True)
        checks.eps("eps", group["eps"])
        checks.nonnegative("weight_decay", group["weight_decay"])
        for name in ("decouple", "use_bias_correction", "safeguard_warmup", "fsdp_in_use"):
            checks.flag(name, group[name])
        checks.positive("d0", group["d0"])
        checks.positive("d_coef", group["d_coef"])
        checks.at_least("growth_rate", group["growth_rate"], 1.0)
        checks.count("slice_p", group["slice_p"], 1)
        if self.param_groups:
            _check_shared(group, self.param_groups[0])

    def _init_group(self, group: dict[str, Any]) -> None:
        # a group added later joins the optimizer's estimate as it stands
        first = self.param_groups[0] if self.param_groups else None
        initial = {"d": group["d0"], "d_max": group["d0"], "d_numerator": 0.0, "k": 0}
        for key in GROUP_STATE:
            group.setdefault(key, first[key] if first is not None else initial[key])
        for key in ("d_denom", "d_hat"):
            if first is not None and key in first:
                group.setdefault(key, first[key])

    def _layout(self, group: dict[str, Any]) -> tuple[StateSpec, ...]:
        sliced = SlicedShape(group["slice_p"])
        momentum = (StateSpec("exp_avg"),) if scalar(group["betas"][0]) > 0 else ()
        return (STEP, StateSpec("s", shape=sliced), StateSpec("p0", shape=sliced), *momentum, StateSpec("exp_avg_sq"))

    # ----- the step --------------------------------------------------------------------------------------------
    # Eager under torch.compile: the d estimate reads its sums on the host and decides there, and its Python floats
    # (d, the step size) change every step, which a traced step would guard on and recompile for. torch's lazy
    # form of torch.compiler.disable (what torch.optim uses): importing dynamo here costs every import a second.
    @torch._disable_dynamo
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One optimization step (see the class docstring); ``closure`` re-evaluates the model."""
        self._plan, self._fresh = None, set()
        try:
            return super().step(closure)
        finally:
            self._plan, self._fresh = None, set()

    def _finish_step(self) -> None:
        if self._plan is None and self._reduces():
            self._estimate()  # a process that stepped nothing (owns no shard's gradient) joins the reduction

    def _reduction_device(self) -> torch.device:
        """The params' device (NCCL reduces CUDA tensors); for a process without params, the backend's."""
        params = self._all_params()
        if params:
            return params[0].device
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _all_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _reduces(self) -> bool:
        """The estimate's sums are reduced over the processes (``fsdp_in_use``, or FSDP's flattened params)."""
        if not (dist.is_available() and dist.is_initialized()):
            return False
        params = self._all_params()
        shards = [sharded.is_sharded(p) for p in params]
        if any(shards) and not all(shards):
            raise ValueError(
                "Prodigy got sharded (DTensor) and plain parameters together: the estimate's sums are reduced over "
                "the processes, which would count a plain (replicated) parameter once per process; shard them all"
            )
        return (
            bool(self.param_groups[0]["fsdp_in_use"])
            or any(shards)
            or any(hasattr(p, "_fsdp_flattened") for p in params)
        )

    def _init_state(self, group: dict[str, Any], params: list[Tensor]) -> set[int]:
        fresh = super()._init_state(group, params)
        for p in params:
            if id(p) in fresh:  # x_0: the parameter where its first gradient is taken, sliced
                self.state[p]["p0"].copy_(p.detach().reshape(-1)[:: group["slice_p"]])
        self._fresh |= fresh
        return fresh

    def _step_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        fresh: set[int],
        amp: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        if self._plan is None:  # the first group of this step: the d estimate over all of them
            self._plan = self._estimate()
        if _number(group["lr"]) > 0:  # a group with lr 0 stays where it is
            super()._step_group(group, params, grads, fresh, amp)

    def _estimate(self) -> _Plan:
        """The package's first loop and its d update: ``s`` moves, the sums are read on the host once, and every
        group's entries take the new estimate. Runs once per step, before the elementwise updates."""
        first = self.param_groups[0]
        for group in self.param_groups[1:]:
            _check_shared(group, first)
        beta1, beta2 = (_number(b) for b in first["betas"])
        beta3 = math.sqrt(beta2) if first["beta3"] is None else _number(first["beta3"])
        d, d_max, d0, k = first["d"], first["d_max"], _number(first["d0"]), first["k"]
        lr = max(_number(group["lr"]) for group in self.param_groups)
        correction = bias_correction(beta2, k + 1) ** 0.5 / bias_correction(beta1, k + 1)
        dlr = d * lr * (correction if first["use_bias_correction"] else 1)
        weights, dots, norms = [], [], []
        for group in self.param_groups:
            group_lr = _number(group["lr"])
            if group_lr not in (lr, 0.0):
                raise ValueError(
                    f"lr must be the same in every param group, or 0 for a frozen group: Prodigy's step size is one "
                    f"estimate for all groups; got lr={group_lr!r} beside lr={lr!r}"
                )
            params, grads = self._collect(group)
            self._init_state(group, params)
            if group_lr == 0.0:
                continue
            scale = d / _number(group["d0"])
            s_weight = scale * (d if group["safeguard_warmup"] else dlr)
            for p, g in zip(params, grads):
                state = self.state[p]
                compute_dtype = compute_dtype_for(p, group["state_dtype"])
                g = self._seen_gradient(group, p, g, compute_dtype)
                p_sliced = p.reshape(-1)[:: group["slice_p"]].to(compute_dtype)
                g_sliced = g.reshape(-1)[:: group["slice_p"]]
                if id(p) not in self._fresh:  # at its first step x_0 - x_k = 0
                    weights.append(scale * dlr)
                    dots.append(torch.dot(g_sliced, state["p0"].to(compute_dtype) - p_sliced))
                s = state["s"].to(compute_dtype)
                heavy_ball_(s, g_sliced, beta3, s_weight)
                norms.append(s.abs().sum())
                if s is not state["s"]:
                    state["s"].copy_(s)
        values = _on_host(dots + norms)
        delta_numerator = 0.0
        for weight, value in zip(weights, values):
            delta_numerator += weight * value
        d_denom = 0.0
        for value in values[len(dots) :]:
            d_denom += value
        if self._reduces():  # the sums over every process's shard
            sums = torch.tensor([delta_numerator, d_denom], dtype=torch.float64, device=self._reduction_device())
            dist.all_reduce(sums)
            delta_numerator, d_denom = sums.tolist()
        if d_denom == 0:  # no gradient has reached the estimate: the moments move, d and the parameters do not
            return _Plan(d, d, dlr, moves=False)
        d_numerator = first["d_numerator"] * beta3 + delta_numerator
        d_hat = _number(first["d_coef"]) * d_numerator / d_denom
        d_new = max(d, d_hat) if d == d0 else d
        d_max = max(d_max, d_hat)
        d_new = min(d_max, d_new * _number(first["growth_rate"]))
        moved = {"d_numerator": d_numerator, "d_denom": d_denom, "d": d_new, "d_max": d_max, "d_hat": d_hat}
        for group in self.param_groups:
            group.update(moved, k=k + 1)
        return _Plan(d, d_new, dlr, moves=True)

    @staticmethod
    def _seen_gradient(group: dict[str, Any], p: Tensor, g: Tensor, compute_dtype: torch.dtype) -> Tensor:
        """The gradient ``_update`` sees, as the engine hands it over (centralized, negated for ``maximize``, in
        the compute dtype), with the L2 term of ``decouple=False``."""
        if group["centralize_gradients"] and p.dim() > 1:
            g = centralize(g.to(compute_dtype))
        if group["maximize"]:
            g = -g
        g = g.to(compute_dtype)
        if group["weight_decay"] != 0 and not group["decouple"]:
            g = l2_penalty(g, p.to(compute_dtype), scalar(group["weight_decay"]))
        return g

    def _flags(self, group: dict[str, Any], step: int, matrix: bool) -> dict[str, Any]:
        decay = group["weight_decay"] != 0
        return {
            "coupled": decay and not group["decouple"],
            "decoupled": decay and bool(group["decouple"]),
            "momentum": scalar(group["betas"][0]) > 0,
            "moves": self._plan is None or self._plan.moves,
        }

    def _coefficients(self, group: dict[str, Any], step: int, states: list) -> dict[str, Any]:
        """This step's scalars, from the estimate taken before the updates; outside a step, those of a step that
        leaves d as the group holds it."""
        plan = self._plan
        if plan is None:
            k = group["k"]
            correction = bias_correction(scalar(group["betas"][1]), k + 1) ** 0.5 / bias_correction(
                scalar(group["betas"][0]), k + 1
            )
            dlr = group["d"] * scalar(group["lr"]) * (correction if group["use_bias_correction"] else 1)
            plan = _Plan(group["d"], group["d"], dlr, moves=True)
        beta1, beta2 = (scalar(b) for b in group["betas"])
        decay = scalar(group["weight_decay"])
        return {
            "beta1": beta1,
            "beta2": beta2,
            "d_one_minus_beta1": plan.d * (1 - beta1),
            "d2_one_minus_beta2": plan.d * plan.d * (1 - beta2),
            "weight_decay": decay,
            "neg_decay_dlr": -decay * (1.0 if group["decouple_lr"] else plan.dlr),  # decouple_lr: wd alone
            "d_eps": plan.d_new * scalar(group["eps"]),
            "neg_dlr": -plan.dlr,
            "neg_dlr_d": -plan.dlr * plan.d_new,
        }

    @staticmethod
    def _update(
        p: Any, g: Any, state: dict, c: dict, *, coupled: bool, decoupled: bool, momentum: bool, moves: bool
    ) -> None:
        if coupled:
            g = l2_penalty(g, p, c["weight_decay"])
        v = state["exp_avg_sq"]
        if momentum:
            heavy_ball_(state["exp_avg"], g, c["beta1"], c["d_one_minus_beta1"])
        ema_square_(v, g, c["beta2"], c["d2_one_minus_beta2"])
        if not moves:
            return
        if decoupled:  # the package's p - (wd d lr) p, not common.decoupled_decay_'s p (1 - wd d lr): bit for bit
            p.add_(p, alpha=c["neg_decay_dlr"])
        denom = v.sqrt().add_(c["d_eps"])
        if momentum:
            p.addcdiv_(state["exp_avg"], denom, value=c["neg_dlr"])
        else:
            p.addcdiv_(g, denom, value=c["neg_dlr_d"])


def _check_shared(group: dict[str, Any], first: dict[str, Any]) -> None:
    for key in SHARED:
        mine, theirs = group[key], first[key]
        if key == "betas":
            mine, theirs = tuple(mine), tuple(theirs)
        if mine != theirs:
            raise ValueError(
                f"{key} must be the same in every param group: Prodigy's d estimate is one for all groups; "
                f"got {key}={mine!r} in a group and {key}={theirs!r} in the first"
            )


def _on_host(tensors: list[Tensor]) -> list[float]:
    """The values of 0-d tensors as Python floats, one transfer per device, in order."""
    by_device: dict[torch.device, list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        by_device[t.device].append(i)
    values = [0.0] * len(tensors)
    for indices in by_device.values():
        read = torch.stack([tensors[i].to(torch.float64) for i in indices]).tolist()
        for i, value in zip(indices, read):
            values[i] = value
    return values
