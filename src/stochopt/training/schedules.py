r"""Learning-rate schedules torch.optim.lr_scheduler lacks, as closed-form ``LRScheduler`` subclasses.

Each schedule is a factor :math:`f(t)` of the step count :math:`t` (``scheduler.last_epoch``, the number of
``scheduler.step()`` calls so far); group :math:`i`'s learning rate is ``base_lrs[i] * f(t) * multiplier(t)``.
``multiplier`` is an optional callable, for instance a batch-size ramp's ``lr_scale``, so that two rules
compose without one scheduler overwriting the other. Every warmup is linear from 0, as in AlgoPerf's baseline
(``optax.linear_schedule(0, lr, warmup_steps)``): the first step runs at lr 0 when ``warmup_steps > 0``.

The factors are plain functions (:func:`warmup_decay_factor` ...) so that they can also be used in a
``LambdaLR`` or plotted (``stochopt schedule NAME --png PATH``).
"""

from __future__ import annotations

import math
from abc import ABCMeta, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from stochopt.engine import checks
from stochopt.extras import require

DECAYS = ("cosine", "linear", "sqrt")


def _decay(kind: str, progress: float) -> float:
    """From 1 at progress 0 to 0 at progress 1: cosine, linear, or 1 - sqrt (Hägele et al., 2024's cooldown)."""
    progress = min(max(progress, 0.0), 1.0)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "linear":
        return 1.0 - progress
    return 1.0 - math.sqrt(progress)


def warmup_decay_factor(
    step: int, warmup_steps: int, total_steps: int, decay: str = "cosine", final_lr_ratio: float = 0.0
) -> float:
    r""":math:`t/W` for :math:`t < W`, then decay over :math:`T - W` steps to ``final_lr_ratio``, then flat."""
    if step < warmup_steps:
        return step / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return final_lr_ratio + (1.0 - final_lr_ratio) * _decay(decay, progress)


def warmup_stable_decay_factor(
    step: int, warmup_steps: int, total_steps: int, decay_steps: int, decay: str = "linear",
    final_lr_ratio: float = 0.0,
) -> float:  # fmt: skip
    r""":math:`t/W` for :math:`t < W`, 1 until :math:`T - D`, then decay over :math:`D` steps to the floor."""
    if step < warmup_steps:
        return step / warmup_steps
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return 1.0
    return final_lr_ratio + (1.0 - final_lr_ratio) * _decay(decay, (step - decay_start) / max(decay_steps, 1))


def inverse_sqrt_factor(step: int, warmup_steps: int, timescale: float) -> float:
    r""":math:`t/W` for :math:`t < W`, then :math:`\sqrt{\tau / (t - W + \tau)}`; with :math:`\tau = W`, that is
    :math:`\sqrt{W/t}` (Vaswani et al., 2017; fairseq's ``inverse_sqrt``)."""
    if step < warmup_steps:
        return step / warmup_steps
    return math.sqrt(timescale / (step - warmup_steps + timescale))


def _checked_decay(decay: Any) -> str:
    if decay not in DECAYS:
        raise ValueError(f"decay must be one of {', '.join(DECAYS)}; got {decay!r}")
    return decay


def _checked_ratio(final_lr_ratio: Any) -> float:
    checks.in_unit_interval("final_lr_ratio", final_lr_ratio, closed_right=True)
    return float(final_lr_ratio)


class _FactorSchedule(LRScheduler, metaclass=ABCMeta):
    """A closed form ``base_lr * factor(t) * multiplier(t)``; subclasses set their fields, then call this."""

    def __init__(self, optimizer: Optimizer, multiplier: Callable[[int], float] | None, last_epoch: int) -> None:
        if multiplier is not None and not callable(multiplier):
            raise TypeError(f"multiplier must be a callable step -> float, got {type(multiplier).__name__}")
        self.multiplier = multiplier
        super().__init__(optimizer, last_epoch)

    @abstractmethod
    def factor(self, step: int) -> float:
        """The multiple of each group's base lr at ``step``."""

    def get_lr(self) -> list[float]:
        t = self.last_epoch
        scale = self.factor(t) * (1.0 if self.multiplier is None else float(self.multiplier(t)))
        return [base_lr * scale for base_lr in self.base_lrs]

    _get_closed_form_lr = get_lr

    def state_dict(self) -> dict[str, Any]:
        # the multiplier is configuration (often a bound method or lambda that cannot be pickled), not state
        return {k: v for k, v in super().state_dict().items() if k != "multiplier"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        multiplier = self.multiplier
        super().load_state_dict(state_dict)
        self.multiplier = multiplier


class WarmupDecayLR(_FactorSchedule):
    r"""Linear warmup, then cosine or linear decay to a floor: AlgoPerf's baseline schedule (Dahl et al., 2023).

    .. math::
        f(t) = \begin{cases} t / W & t < W \\
        r + (1 - r)\, d\!\left(\frac{t - W}{T - W}\right) & t \ge W \end{cases}

    with :math:`d(x) = \tfrac12(1 + \cos \pi x)` (``decay="cosine"``), :math:`1 - x` (``"linear"``) or
    :math:`1 - \sqrt{x}` (``"sqrt"``), :math:`x` clipped to [0, 1], and :math:`r` = ``final_lr_ratio``.
    """

    def __init__(
        self, optimizer: Optimizer, warmup_steps: int, total_steps: int, decay: str = "cosine",
        final_lr_ratio: float = 0.0, multiplier: Callable[[int], float] | None = None, last_epoch: int = -1,
    ) -> None:  # fmt: skip
        self.warmup_steps = checks.count("warmup_steps", warmup_steps, 0)
        self.total_steps = checks.count("total_steps", total_steps, 1)
        if self.warmup_steps > self.total_steps:
            raise ValueError(f"warmup_steps ({warmup_steps}) must not exceed total_steps ({total_steps})")
        self.decay = _checked_decay(decay)
        self.final_lr_ratio = _checked_ratio(final_lr_ratio)
        super().__init__(optimizer, multiplier, last_epoch)

    def factor(self, step: int) -> float:
        return warmup_decay_factor(step, self.warmup_steps, self.total_steps, self.decay, self.final_lr_ratio)


class WarmupStableDecayLR(_FactorSchedule):
    r"""Warmup-stable-decay ("trapezoidal"; Hu et al., 2024, MiniCPM; Hägele et al., 2024): linear warmup over
    :math:`W` steps, the full rate until step :math:`T - D`, then a decay over the last :math:`D` steps to
    ``final_lr_ratio`` (linear by default; ``"sqrt"`` is the 1 - sqrt cooldown, ``"cosine"`` a cosine).
    Training can be extended before the decay starts by raising ``total_steps``."""

    def __init__(
        self, optimizer: Optimizer, warmup_steps: int, total_steps: int, decay_steps: int, decay: str = "linear",
        final_lr_ratio: float = 0.0, multiplier: Callable[[int], float] | None = None, last_epoch: int = -1,
    ) -> None:  # fmt: skip
        self.warmup_steps = checks.count("warmup_steps", warmup_steps, 0)
        self.total_steps = checks.count("total_steps", total_steps, 1)
        self.decay_steps = checks.count("decay_steps", decay_steps, 0)
        if self.warmup_steps + self.decay_steps > self.total_steps:
            raise ValueError(
                f"warmup_steps + decay_steps ({warmup_steps} + {decay_steps}) must not exceed total_steps "
                f"({total_steps})"
            )
        self.decay = _checked_decay(decay)
        self.final_lr_ratio = _checked_ratio(final_lr_ratio)
        super().__init__(optimizer, multiplier, last_epoch)

    def factor(self, step: int) -> float:
        return warmup_stable_decay_factor(
            step, self.warmup_steps, self.total_steps, self.decay_steps, self.decay, self.final_lr_ratio
        )


class InverseSqrtLR(_FactorSchedule):
    r"""Linear warmup, then inverse-square-root decay (Vaswani et al., 2017; Raffel et al., 2020):

    .. math:: f(t) = t / W \;(t < W), \qquad f(t) = \sqrt{\tau / (t - W + \tau)} \;(t \ge W)

    ``timescale`` :math:`\tau` defaults to :math:`W` (then :math:`f(t) = \sqrt{W / t}`), or 1 without warmup.
    """

    def __init__(
        self, optimizer: Optimizer, warmup_steps: int = 0, timescale: float | None = None,
        multiplier: Callable[[int], float] | None = None, last_epoch: int = -1,
    ) -> None:  # fmt: skip
        self.warmup_steps = checks.count("warmup_steps", warmup_steps, 0)
        if timescale is None:
            timescale = max(self.warmup_steps, 1)
        checks.positive("timescale", timescale)
        self.timescale = float(timescale)
        super().__init__(optimizer, multiplier, last_epoch)

    def factor(self, step: int) -> float:
        return inverse_sqrt_factor(step, self.warmup_steps, self.timescale)


def _onecycle(opt: Optimizer, warmup_steps: int, total_steps: int, **_: Any) -> LRScheduler:
    # torch's one-cycle (Smith & Topin, 2019, super-convergence), peak at lr after warmup_steps
    pct = warmup_steps / total_steps if warmup_steps else 0.3
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=opt.param_groups[0]["lr"], total_steps=total_steps,
                                               pct_start=pct)  # fmt: skip


def _cosine(opt: Optimizer, total_steps: int, final_lr_ratio: float, **_: Any) -> LRScheduler:
    lr = opt.param_groups[0]["lr"]
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps, eta_min=lr * final_lr_ratio)


#: the schedules ``stochopt schedule`` knows, by name; each takes (optimizer, warmup_steps, total_steps,
#: decay_steps, final_lr_ratio, timescale) by keyword and ignores what it does not use
SCHEDULES: dict[str, Callable[..., LRScheduler]] = {
    "warmup-cosine": lambda opt, warmup_steps, total_steps, final_lr_ratio, **_: WarmupDecayLR(
        opt, warmup_steps, total_steps, "cosine", final_lr_ratio),
    "warmup-linear": lambda opt, warmup_steps, total_steps, final_lr_ratio, **_: WarmupDecayLR(
        opt, warmup_steps, total_steps, "linear", final_lr_ratio),
    "wsd": lambda opt, warmup_steps, total_steps, decay_steps, final_lr_ratio, **_: WarmupStableDecayLR(
        opt, warmup_steps, total_steps, decay_steps if decay_steps is not None else total_steps // 5, "linear",
        final_lr_ratio),
    "inverse-sqrt": lambda opt, warmup_steps, timescale, **_: InverseSqrtLR(opt, warmup_steps, timescale),
    "onecycle": _onecycle,
    "cosine": _cosine,
}  # fmt: skip


def schedule_curve(
    name: str, *, lr: float = 1.0, total_steps: int = 1000, warmup_steps: int = 0, decay_steps: int | None = None,
    final_lr_ratio: float = 0.0, timescale: float | None = None,
) -> list[float]:  # fmt: skip
    """The learning rate of each of ``total_steps`` steps under schedule ``name`` (a key of :data:`SCHEDULES`),
    computed by stepping the real scheduler on a throwaway optimizer."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; known: {', '.join(SCHEDULES)}")
    checks.positive("lr", lr)
    total_steps = checks.count("total_steps", total_steps, 1)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    scheduler = SCHEDULES[name](opt, warmup_steps=warmup_steps, total_steps=total_steps, decay_steps=decay_steps,
                                final_lr_ratio=final_lr_ratio, timescale=timescale)  # fmt: skip
    lrs = []
    for _ in range(total_steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return lrs


def plot_schedules(curves: dict[str, list[float]], path: str, title: str = "learning-rate schedule") -> None:
    """Write a PNG of lr against step for each named curve."""
    require("matplotlib", feature="the schedule plot")
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend

    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    for label, lrs in curves.items():
        ax.plot(range(len(lrs)), lrs, label=label)
    ax.set(xlabel="step", ylabel="learning rate", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120)
