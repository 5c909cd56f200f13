"""Lookahead: k steps forward with any optimizer, one step back (Zhang et al., 2019)."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from stochopt.engine import checks
from stochopt.optim.common import ema_
from stochopt.optim.wrapper import OptimizerWrapper, indexed_tensors


def _checked_alpha(alpha: Any) -> float:
    checks.in_unit_interval("alpha", alpha, closed_right=True)
    return float(alpha)


class Lookahead(OptimizerWrapper):
    r"""Lookahead (Zhang, Lucas, Hinton & Ba, 2019, "Lookahead Optimizer: k steps forward, 1 step back").

    The inner optimizer moves the fast weights :math:`\theta`; the slow weights :math:`\phi` start as a copy of
    each parameter taken before its first step, and every :math:`k` inner steps

    .. math::
        \phi &\leftarrow \phi + \alpha\,(\theta - \phi) \\
        \theta &\leftarrow \phi

    Wraps any ``torch.optim.Optimizer`` instance and keeps its state (momentum) across synchronizations.
    ``param_groups``, ``defaults`` and ``state`` are the inner optimizer's own objects, so an lr scheduler
    built on the wrapper changes the inner lr. The slow weights travel in :meth:`state_dict` in each parameter's
    state (``lookahead_slow_weights``), the step count, ``k`` and ``alpha`` in every param group
    (``lookahead_step``, ``lookahead_k``, ``lookahead_alpha``), so that torch.distributed.checkpoint and the
    trainers' checkpointing handle it as any optimizer. ``alpha = 1`` is the inner optimizer alone. A step that
    stochopt's ``nonfinite="skip"`` skipped does not count towards ``k``.
    """

    _PARAM_KEYS = ("lookahead_slow_weights",)
    _GROUP_KEYS = ("lookahead_step", "lookahead_k", "lookahead_alpha")
    _NESTED_KEYS = ("slow_weights", "step", "k", "alpha")

    def __init__(self, optimizer: Optimizer, k: int = 5, alpha: float = 0.5) -> None:
        super().__init__(optimizer)
        self.k = checks.count("k", k, 1)
        self.alpha = _checked_alpha(alpha)
        self._step = 0
        self._slow: dict[Tensor, Tensor] = {}

    def __repr__(self) -> str:
        return f"Lookahead(k={self.k}, alpha={self.alpha}, optimizer={self.optimizer!r})"

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One inner step (``closure`` goes to the inner optimizer); every ``k`` steps, the slow-weight update."""
        for p in self._params():
            if p not in self._slow:  # first step, or params added with add_param_group since the last one
                self._slow[p] = p.detach().clone()
        skipped = getattr(self.optimizer, "skipped_steps", None)
        loss = self.optimizer.step() if closure is None else self.optimizer.step(closure)
        if skipped is not None and self.optimizer.skipped_steps != skipped:
            return loss  # the weights did not move, so this was not one of the k steps
        self._step += 1
        if self._step % self.k == 0:
            with torch.no_grad():
                for p in self._params():
                    slow = self._slow[p]
                    ema_(slow, p, self.alpha)
                    p.copy_(slow)
        return loss

    def _param_state(self) -> dict[int, dict[str, Tensor]]:
        return {i: {"lookahead_slow_weights": self._slow[p]} for i, p in enumerate(self._params()) if p in self._slow}

    def _group_state(self) -> dict[str, Any]:
        return {"lookahead_step": self._step, "lookahead_k": self.k, "lookahead_alpha": self.alpha}

    def _from_nested(self, state_dict: dict[str, Any]) -> tuple[dict[int, dict[str, Tensor]], dict[str, Any]]:
        slow = state_dict["slow_weights"]
        tensors = {i: {"lookahead_slow_weights": t} for i, t in slow.items()} if isinstance(slow, dict) else slow
        scalars = {"lookahead_step": state_dict["step"], "lookahead_k": state_dict["k"]}
        return tensors, {**scalars, "lookahead_alpha": state_dict["alpha"]}

    def _load_own_state(self, tensors: dict[int, dict[str, Tensor]], scalars: dict[str, Any]) -> dict[str, Any]:
        k, alpha = checks.count("k", scalars["lookahead_k"], 1), _checked_alpha(scalars["lookahead_alpha"])
        step = scalars["lookahead_step"]
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"state_dict: step must be an int >= 0, got {step!r}")
        if not isinstance(tensors, dict):
            raise ValueError(f"state_dict: the slow weights must be a dict by parameter index, got {tensors!r}")
        slow_by_index = {i: entry["lookahead_slow_weights"] for i, entry in tensors.items()}
        slow = indexed_tensors(slow_by_index, self._params(), "slow weight")
        return {"_slow": slow, "_step": int(step), "k": k, "alpha": alpha}
