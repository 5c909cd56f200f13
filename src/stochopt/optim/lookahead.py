"""Lookahead: k steps forward with any optimizer, one step back (Zhang et al., 2019)."""

from __future__ import annotations

import numbers
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from stochopt.engine import checks

_HOOKS = ("step_pre", "step_post", "state_dict_pre", "state_dict_post", "load_state_dict_pre", "load_state_dict_post")
_KEYS = ("optimizer", "slow_weights", "step", "k", "alpha")


def _checked_alpha(alpha: Any) -> float:
    checks.in_unit_interval("alpha", alpha, closed_right=True)
    return float(alpha)


def _inner(name: str) -> property:
    return property(
        lambda self: getattr(self.optimizer, name),
        lambda self, value: setattr(self.optimizer, name, value),
        doc=f"The inner optimizer's ``{name}`` (the same object).",
    )


class Lookahead(Optimizer):
    r"""Lookahead (Zhang, Lucas, Hinton & Ba, 2019, "Lookahead Optimizer: k steps forward, 1 step back").

    The inner optimizer moves the fast weights :math:`\theta`; the slow weights :math:`\phi` start as a copy of
    each parameter taken before its first step, and every :math:`k` inner steps

    .. math::
        \phi &\leftarrow \phi + \alpha\,(\theta - \phi) \\
        \theta &\leftarrow \phi

    Wraps any ``torch.optim.Optimizer`` instance and keeps its state (momentum) across synchronizations.
    ``param_groups``, ``defaults`` and ``state`` are the inner optimizer's own objects, so an lr scheduler
    built on the wrapper changes the inner lr. The slow weights, the step count, ``k`` and ``alpha`` travel in
    :meth:`state_dict` beside the inner optimizer's. ``alpha = 1`` is the inner optimizer alone. A step that
    stochopt's ``nonfinite="skip"`` skipped does not count towards ``k``.
    """

    param_groups = _inner("param_groups")
    defaults = _inner("defaults")
    state = _inner("state")

    def __init__(self, optimizer: Optimizer, k: int = 5, alpha: float = 0.5) -> None:
        if isinstance(optimizer, type):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer instance, got the class {optimizer.__name__}; "
                f"pass {optimizer.__name__}(params, ...)"
            )
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer instance, got {type(optimizer).__name__}")
        # not Optimizer.__init__: it would build param groups of its own instead of sharing the inner ones
        self.optimizer = optimizer
        self.k = checks.count("k", k, 1)
        self.alpha = _checked_alpha(alpha)
        self._step = 0
        self._slow: dict[Tensor, Tensor] = {}
        self._init_hooks()

    def _init_hooks(self) -> None:
        for name in _HOOKS:
            setattr(self, f"_optimizer_{name}_hooks", OrderedDict())
        self._patch_step_function()
        self._warned_capturable_if_run_uncaptured = True

    def __getstate__(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer, "k": self.k, "alpha": self.alpha, "_step": self._step, "_slow": self._slow}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_hooks()

    def __repr__(self) -> str:
        return f"Lookahead(k={self.k}, alpha={self.alpha}, optimizer={self.optimizer!r})"

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

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
                    slow.lerp_(p, self.alpha)
                    p.copy_(slow)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """The inner state_dict, the slow weights keyed by parameter index (param-group order), step, k, alpha."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        slow = {i: self._slow[p] for i, p in enumerate(self._params()) if p in self._slow}
        sd = {"optimizer": self.optimizer.state_dict(), "slow_weights": slow, "step": self._step,
              "k": self.k, "alpha": self.alpha}  # fmt: skip
        for hook in self._optimizer_state_dict_post_hooks.values():
            sd = hook(self, sd) or sd
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = hook(self, state_dict) or state_dict
        missing = [key for key in _KEYS if key not in state_dict]
        if missing:
            raise ValueError(f"state_dict was not saved by Lookahead: it lacks {missing}")
        k, alpha, step = checks.count("k", state_dict["k"], 1), _checked_alpha(state_dict["alpha"]), state_dict["step"]
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"state_dict: step must be an int >= 0, got {step!r}")
        params = self._params()
        slow = {}
        for index, saved in state_dict["slow_weights"].items():
            if not (isinstance(index, int) and 0 <= index < len(params)):
                raise ValueError(
                    f"state_dict: slow weight {index!r} has no parameter (this optimizer has {len(params)})"
                )
            p = params[index]
            if not isinstance(saved, Tensor) or saved.shape != p.shape:
                got = tuple(saved.shape) if isinstance(saved, Tensor) else type(saved).__name__
                raise ValueError(
                    f"state_dict: slow weight {index} is {got}, parameter {index} has shape {tuple(p.shape)}"
                )
            # a copy: the loaded slow weights must not alias the caller's dict, which may be loaded again
            slow[p] = saved.to(device=p.device, dtype=p.dtype, copy=True)
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self._slow, self._step, self.k, self.alpha = slow, int(step), k, alpha
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)
