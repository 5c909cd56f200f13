"""Schedule-Free AdamW and SGD (Defazio et al., 2024): no learning-rate schedule, an online average instead.

The optimizers follow the authors' ``schedulefree`` package (v1.4.1): the same hyperparameters and defaults, the
same state (``z``, and AdamW's ``exp_avg_sq``), the same per-group scalars (``k``, ``lr_max``, ``weight_sum``,
``scheduled_lr``, ``train_mode``) and the same ``train()`` / ``eval()`` switch of the parameters between the
sequence the gradients are taken at (y) and the average that is evaluated (x).

The per-group scalars move once per step and group, like the package's (``_step_group``, before the engine's
buckets): Python floats in number mode (the package's float64 arithmetic), float64 tensors on the parameters'
device in tensor mode (``capturable=True``, or a step traced by ``torch.compile``), updated in place, so that the
step reads nothing on the host.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from stochopt.engine import EngineOptimizer, StateSpec, checks, scalar, scalars
from stochopt.engine.layout import compute_dtype_for
from stochopt.engine.scalars import maximum, minimum, where
from stochopt.optim.common import bias_correction, ema_square_, l2_penalty

#: the group entries that move with the step (the package's names), and their values before the first step
GROUP_STATE = {"k": 0, "lr_max": -1.0, "weight_sum": 0.0, "scheduled_lr": 0.0}

Z = StateSpec("z", init="param")


class _ScheduleFree(EngineOptimizer):
    """What both Schedule-Free optimizers share: the warmup, the weights of the average, the y/z/x step and the
    ``train()`` / ``eval()`` switch. Subclasses name the interpolation coefficient (``_beta``) and the direction
    ``u`` of the z step."""

    _rounding_supported = False  # train() / eval() move the weights between y and x themselves

    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        super().__init__(params, {**defaults, **GROUP_STATE, "train_mode": True})

    # ----- the hyperparameters -----------------------------------------------------------------------------
    #: the interpolation y = (1 - beta) z + beta x, read from a group: AdamW's betas[0], SGD's momentum
    _beta: Callable[[dict[str, Any]], Any]

    def _validate(self, group: dict[str, Any]) -> None:
        checks.nonnegative("lr", group["lr"])
        checks.nonnegative("weight_decay", group["weight_decay"])
        checks.count("warmup_steps", group["warmup_steps"], 0)
        checks.nonnegative("r", group["r"])
        checks.nonnegative("weight_lr_power", group["weight_lr_power"])
        checks.flag("train_mode", group["train_mode"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # a group added later takes the optimizer's mode (its params have no z yet: y = x for them), so that
        # step() and the next train()/eval() treat every group alike
        if self.param_groups:
            param_group.setdefault("train_mode", self.param_groups[0]["train_mode"])
        super().add_param_group(param_group)

    # ----- the per-group scalars -----------------------------------------------------------------------------
    def _step_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        fresh: set[int],
        amp: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        self._advance_group(group, params[0], amp)
        super()._step_group(group, params, grads, fresh, amp)

    def _advance_group(self, group: dict[str, Any], p: Tensor, amp: tuple[Tensor, Tensor] | None) -> None:
        """The package's bookkeeping of one step: k, the scheduled lr, its running max and the sum of weights."""
        if not self._tensor_mode(group, p):
            if amp is not None and bool(amp[1].item()):  # GradScaler's found_inf: the step is skipped
                return
            moved = _moved(group, int(scalar(group["k"])) + 1, scalar(group["lr_max"]), scalar(group["weight_sum"]))
            group.update(zip(GROUP_STATE, moved))
            return
        # tensor mode: float64 tensors on the device, written in place (static addresses for CUDA graphs)
        with scalars.tensor_mode():
            current = [_device_scalar(group, key, p.device) for key in GROUP_STATE]
            moved = _moved(group, current[0] + 1.0, current[1], current[2])
            if amp is not None:  # found_inf on the device: keep the old values where it is set
                skip = amp[1].to(p.device) > 0
                moved = [torch.where(skip, old, new) for old, new in zip(current, moved)]
            for old, new in zip(current, moved):
                old.copy_(new) if isinstance(new, Tensor) else old.fill_(new)

    # ----- the engine's hooks ------------------------------------------------------------------------------
    def _flags(self, group: dict[str, Any], step: Any, matrix: bool) -> dict[str, Any]:
        # first: on the step that created the state, z = y is written again in the compute dtype. z starts as a
        # copy of the parameter, exact in the default state dtype (the parameter's, or float32 for bfloat16 and
        # float16 parameters); a state_dtype below the parameter's (bfloat16 z of float32 parameters) rounds that
        # copy, and the first step, which reads z, would see the rounded y. Tensor mode cannot tell the first
        # step on the host: it lerps z to y with a weight of 1 or 0 on every step (one more operation in the
        # kernel, no more memory traffic).
        if group["state_dtype"] is None:
            first: bool | str = False
        else:
            first = "masked" if isinstance(step, Tensor) else step == 1
        return {"decay": group["weight_decay"] != 0, "first": first}

    def _coefficients(self, group: dict[str, Any], step: Any, states: list) -> dict[str, Any]:
        """The weights of this step from the group's scalars, which ``_step_group`` has moved already."""
        k = _read(group, "k")
        lr = scalar(group["lr"]) * _warmup(group, k)
        weight = _weight(group, k, _read(group, "lr_max"))
        weight_sum = _read(group, "weight_sum")
        if isinstance(weight_sum, Tensor):  # the package's ZeroDivisionError -> 0 (a group whose lr is 0)
            ckp1 = where(weight_sum > 0, weight / where(weight_sum > 0, weight_sum, 1.0), 0.0)
        else:
            ckp1 = weight / weight_sum if weight_sum != 0 else 0.0
        return {
            "ckp1": ckp1,
            "y_coef": lr * (scalar(self._beta(group)) * (1 - ckp1) - 1),
            "neg_lr": -lr,
            "first": where(step == 1, 1.0, 0.0),
            "weight_decay": scalar(group["weight_decay"]),
        }

    # ----- train / eval ------------------------------------------------------------------------------------
    @property
    def train_mode(self) -> bool:
        """True while the parameters hold y (the point gradients are taken at), False while they hold x."""
        return all(bool(group["train_mode"]) for group in self.param_groups)

    @torch.no_grad()
    def train(self) -> None:
        """Set the parameters to y, where the gradients are taken (call before training steps)."""
        self._switch(True)

    @torch.no_grad()
    def eval(self) -> None:
        """Set the parameters to x, the average (call before evaluating or saving a checkpoint)."""
        self._switch(False)

    def _switch(self, to_train: bool) -> None:
        """x = y + (1 - 1/beta)(z - y) and back, y = x + (1 - beta)(z - x), as the package computes them (lerp),
        for the parameters that have state, in the compute dtype of the engine's precision rule."""
        for group in self.param_groups:
            if bool(group["train_mode"]) == to_train:
                continue
            beta = scalar(self._beta(group))
            weight = 1 - beta if to_train else 1 - 1 / beta
            plain: tuple[list[Tensor], list[Tensor]] = ([], [])
            for p in group["params"]:
                z = self.state.get(p, {}).get("z")
                if z is None:
                    continue
                compute = compute_dtype_for(p, group["state_dtype"])
                if p.dtype == z.dtype == compute:
                    plain[0].append(p)
                    plain[1].append(z)
                else:
                    p.copy_(p.to(compute).lerp_(z.to(compute), weight))
            if plain[0]:
                torch._foreach_lerp_(plain[0], plain[1], weight)
            group["train_mode"] = to_train

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One step at y; ``closure`` re-evaluates the model and returns the loss. Refused in eval mode."""
        if not self.train_mode:
            raise RuntimeError(
                f"{type(self).__name__}.step() was called in eval mode (the parameters hold the average x): call "
                "optimizer.train() before training steps and optimizer.eval() before evaluating or saving"
            )
        return super().step(closure)


def _warmup(group: dict[str, Any], k: Any) -> Any:
    """The package's linear warmup factor at step k (1-based): k / warmup_steps, 1 once k >= warmup_steps."""
    warmup_steps = group["warmup_steps"]
    return minimum(k / warmup_steps, 1.0) if warmup_steps > 0 else 1.0


def _weight(group: dict[str, Any], k: Any, lr_max: Any) -> Any:
    """The weight of step k in the average: k^r * lr_max^weight_lr_power."""
    return (k ** scalar(group["r"])) * (lr_max ** scalar(group["weight_lr_power"]))


def _moved(group: dict[str, Any], k: Any, lr_max: Any, weight_sum: Any) -> list[Any]:
    """k, lr_max, weight_sum and scheduled_lr after step k, from the values before it."""
    lr = scalar(group["lr"]) * _warmup(group, k)
    lr_max = maximum(lr, lr_max)
    return [k, lr_max, weight_sum + _weight(group, k, lr_max), lr]


def _device_scalar(group: dict[str, Any], key: str, device: torch.device) -> Tensor:
    """The group entry ``key`` as a float64 tensor of one element on ``device``, made so once (then updated in
    place). Of shape (1,), not 0-d: a traced step (torch.compile, torch 2.13, CPU) drops its in-place updates of
    0-d float64 CPU tensors that are not graph outputs (measured with aot_eager and inductor: the update is
    lost, a (1,) tensor or a float32 one keeps it)."""
    value = group[key]
    if not (
        isinstance(value, Tensor) and value.dtype == torch.float64 and value.shape == (1,) and value.device == device
    ):
        value = torch.as_tensor(value, dtype=torch.float64).to(device).reshape(1).clone()
        group[key] = value
    return value


def _read(group: dict[str, Any], key: str) -> Any:
    """A per-group scalar as ``scalar()`` gives it (a float in number mode), a 0-d tensor in tensor mode."""
    value = scalar(group[key])
    return value.reshape(()) if isinstance(value, Tensor) else value


def _start(p: Any, z: Any, c: dict[str, Any], first: bool | str) -> None:
    """On the step that created the state, z = y (in the compute dtype: exact where z is stored rounded)."""
    if first == "masked":
        z.lerp_(p, c["first"])
    elif first:
        z.copy_(p)


def _y_z_step(y: Any, z: Any, u: Any, c: dict[str, Any]) -> None:
    """The package's step of y and z along the direction u, without x (x is implied by y and z):
    y <- (1 - c) y + c z + lr (beta (1 - c) - 1) u, then z <- z - lr u."""
    y.lerp_(z, c["ckp1"])
    y.add_(u, alpha=c["y_coef"])
    # z + (-lr) u, bit for bit the package's z - lr u; under torch.compile (torch 2.13, CPU) sub_ reads a tensor
    # alpha at float32 (measured: 1e-9 relative per step in float64), add_ at the tensor's dtype
    z.add_(u, alpha=c["neg_lr"])


class AdamWScheduleFree(_ScheduleFree):
    r"""Schedule-Free AdamW (Defazio et al., 2024, "The Road Less Scheduled", arXiv:2405.15682): no learning-rate
    schedule is needed; the point evaluated is an online average of the iterates, and the gradient is taken
    at an interpolation between that average and the base sequence.

    .. math::
        v_t &= \beta_2 v_{t-1} + (1-\beta_2)\, g_t^2, \qquad g_t = \nabla f(y_{t-1}) \\
        u_t &= \frac{g_t}{\sqrt{v_t / (1-\beta_2^t)} + \epsilon} + \lambda\, y_{t-1} \\
        z_t &= z_{t-1} - \gamma_t u_t, \qquad
        x_t = (1 - c_t)\, x_{t-1} + c_t z_t, \qquad y_t = (1-\beta_1)\, z_t + \beta_1 x_t \\
        \gamma_t &= \gamma \min(1, t/T), \qquad c_t = \frac{w_t}{\sum_{i \le t} w_i}, \qquad
        w_t = t^r \big(\max_{i \le t} \gamma_i\big)^{p}

    from :math:`x_0 = y_0 = z_0 = \theta_0`, with :math:`T` = ``warmup_steps``, :math:`p` = ``weight_lr_power``
    and :math:`\lambda` = ``weight_decay`` (taken at y and not preconditioned, as in the authors' package).
    Arguments, defaults, state (``z``, ``exp_avg_sq``) and group entries (``k``, ``lr_max``, ``weight_sum``,
    ``scheduled_lr``, ``train_mode``) follow the authors' ``schedulefree.AdamWScheduleFree``; x is not stored.

    The parameters hold y while training and x for evaluation: call ``optimizer.train()`` before training
    steps and ``optimizer.eval()`` before evaluating or saving a checkpoint (``step()`` in eval mode raises).
    The optimizer starts in train mode (the package starts in eval mode and needs ``train()`` first; before
    the first step x = y, so the two agree). Models with batch norm need their statistics recomputed at x:
    :func:`update_bn_at_x`. No scheduler is needed; one that scales ``lr`` (an external warmup) acts as the
    package's warmup does, through :math:`\gamma_t` and :math:`\max_i \gamma_i`.
    """

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 0.0025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
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
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, warmup_steps=warmup_steps, r=r,
            weight_lr_power=weight_lr_power,
            maximize=maximize, foreach=foreach, fused=fused, capturable=capturable, nonfinite=nonfinite,
            state_dtype=state_dtype, weight_rounding=weight_rounding, rounding_seed=rounding_seed,
        )  # fmt: skip
        super().__init__(params, defaults)

    @staticmethod
    def _beta(group: dict[str, Any]) -> Any:
        return group["betas"][0]

    def _validate(self, group: dict[str, Any]) -> None:
        super()._validate(group)
        checks.betas(group["betas"])
        checks.positive("betas[0]", group["betas"][0], "x = (y - (1 - beta1) z) / beta1 is recovered from y and z")
        checks.eps("eps", group["eps"])

    def _layout(self, group: dict[str, Any]) -> tuple[StateSpec, ...]:
        return (Z, StateSpec("exp_avg_sq"))

    def _coefficients(self, group: dict[str, Any], step: Any, states: list) -> dict[str, Any]:
        c = super()._coefficients(group, step, states)
        beta2 = scalar(group["betas"][1])
        c.update(
            beta2=beta2,
            one_minus_beta2=1 - beta2,
            bc2=bias_correction(beta2, _read(group, "k")),
            eps=scalar(group["eps"]),
        )
        return c

    @staticmethod
    def _update(p: Any, g: Any, state: dict, c: dict, *, decay: bool, first: bool | str) -> None:
        z, v = state["z"], state["exp_avg_sq"]
        _start(p, z, c, first)
        ema_square_(v, g, c["beta2"], c["one_minus_beta2"])
        u = g.div(v.div(c["bc2"]).sqrt_().add_(c["eps"]))
        if decay:
            u = l2_penalty(u, p, c["weight_decay"])  # at y, after the preconditioner (the package's order)
        _y_z_step(p, z, u, c)


class SGDScheduleFree(_ScheduleFree):
    r"""Schedule-Free SGD (Defazio et al., 2024, "The Road Less Scheduled", arXiv:2405.15682): momentum SGD
    whose momentum is the interpolation between an online average of the iterates and the base sequence.

    .. math::
        u_t &= \nabla f(y_{t-1}) + \lambda\, y_{t-1} \\
        z_t &= z_{t-1} - \gamma_t u_t, \qquad
        x_t = (1 - c_t)\, x_{t-1} + c_t z_t, \qquad y_t = (1-\beta)\, z_t + \beta x_t \\
        \gamma_t &= \gamma \min(1, t/T), \qquad c_t = \frac{w_t}{\sum_{i \le t} w_i}, \qquad
        w_t = t^r \big(\max_{i \le t} \gamma_i\big)^{p}

    from :math:`x_0 = y_0 = z_0 = \theta_0`, with :math:`\beta` = ``momentum``, :math:`T` = ``warmup_steps``,
    :math:`p` = ``weight_lr_power``. With :math:`r = 0` and no warmup, :math:`c_t = 1/t`: x is the plain
    average of the z iterates (Polyak-Ruppert averaging), and :math:`\beta = 0` would be plain SGD on z.
    Arguments, defaults (``lr=1.0``), state (``z``) and group entries follow the authors'
    ``schedulefree.SGDScheduleFree``; ``train()`` / ``eval()`` and :func:`update_bn_at_x` as for
    :class:`AdamWScheduleFree`.
    """

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
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
            lr=lr, momentum=momentum, weight_decay=weight_decay, warmup_steps=warmup_steps, r=r,
            weight_lr_power=weight_lr_power,
            maximize=maximize, foreach=foreach, fused=fused, capturable=capturable, nonfinite=nonfinite,
            state_dtype=state_dtype, weight_rounding=weight_rounding, rounding_seed=rounding_seed,
        )  # fmt: skip
        super().__init__(params, defaults)

    @staticmethod
    def _beta(group: dict[str, Any]) -> Any:
        return group["momentum"]

    def _validate(self, group: dict[str, Any]) -> None:
        super()._validate(group)
        # the package's rule, 0 < momentum < 1: x is recovered from y and z by dividing by it
        checks.positive("momentum", group["momentum"], "x = (y - (1 - momentum) z) / momentum")
        checks.in_unit_interval("momentum", group["momentum"])

    def _layout(self, group: dict[str, Any]) -> tuple[StateSpec, ...]:
        return (Z,)

    @staticmethod
    def _update(p: Any, g: Any, state: dict, c: dict, *, decay: bool, first: bool | str) -> None:
        z = state["z"]
        _start(p, z, c, first)
        u = l2_penalty(g, p, c["weight_decay"]) if decay else g
        _y_z_step(p, z, u, c)


def _bn_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def update_bn_at_x(
    loader: Iterable[Any], model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device | None = None
) -> None:
    """Recompute the batch-norm statistics of ``model`` at the average x (``torch.optim.swa_utils.update_bn``
    over ``loader``), as the authors advise for Schedule-Free: the running statistics collected while training
    are those of y, not of the x that is evaluated.

    The optimizer is put in eval mode (the parameters hold x) for the pass, and left in the mode it was found
    in: from train mode, the parameters are restored to their y bit for bit (a copy is kept for the pass rather
    than recomputed, which would round). Only the statistics (``running_mean``, ``running_var``,
    ``num_batches_tracked``) change; the model's own train/eval flag is restored by ``update_bn``."""
    if not _bn_modules(model):
        return
    groups = optimizer.param_groups
    was_training = [bool(group.get("train_mode", False)) for group in groups]
    saved = [
        [(p, p.detach().clone()) for p in group["params"] if "z" in optimizer.state.get(p, {})] if training else []
        for group, training in zip(groups, was_training)
    ]
    optimizer.eval()
    try:
        torch.optim.swa_utils.update_bn(loader, model, device)
    finally:
        with torch.no_grad():
            for group, training, copies in zip(groups, was_training, saved):
                if training:
                    for p, y in copies:
                        p.copy_(y)
                    group["train_mode"] = True
