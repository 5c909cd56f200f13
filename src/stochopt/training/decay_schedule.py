"""A schedule for weight decay beside the learning rate's: with ``decouple_lr=True`` the decay does not follow
the lr, so a schedule of its own gives it one (Loshchilov & Hutter, 2019, section 2: both are multiplied by the
schedule multiplier eta_t)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch.optim import Optimizer

from stochopt.engine import checks


class WeightDecaySchedule:
    """Each ``step()`` sets every group's ``weight_decay`` to its initial value times ``factor(t)``, ``t`` the
    number of ``step()`` calls so far (as an ``LRScheduler`` counts), the initial value kept in the group as
    ``initial_weight_decay`` (as ``initial_lr``). ``factor`` is any function of the step: an lr schedule's own
    (``functools.partial(warmup_decay_factor, warmup_steps=..., total_steps=...)``) makes the decay follow the
    lr's shape while its size stays its own. Call it where the lr scheduler is called, once per step; it
    checkpoints through ``state_dict``."""

    def __init__(self, optimizer: Optimizer, factor: Callable[[int], float]) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not callable(factor):
            raise TypeError(f"factor must be a function of the step, got {factor!r}")
        for group in optimizer.param_groups:
            if "weight_decay" not in group:
                raise ValueError(f"{type(optimizer).__name__}'s param groups have no weight_decay to schedule")
            group.setdefault("initial_weight_decay", group["weight_decay"])
        self.optimizer, self.factor, self.last_step = optimizer, factor, 0
        self._apply()

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def _apply(self) -> None:
        value = self.factor(self.last_step)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"factor({self.last_step}) must be a finite number >= 0, got {value!r}")
        for group in self.optimizer.param_groups:
            group["weight_decay"] = group["initial_weight_decay"] * float(value)

    def state_dict(self) -> dict[str, Any]:
        """The step reached (the factor is the caller's code, rebuilt with the schedule)."""
        return {"last_step": self.last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume at the saved step: the groups' ``weight_decay`` is set for it at once."""
        self.last_step = checks.count("state_dict['last_step']", state_dict.get("last_step"), 0)
        self._apply()
