"""The shell of an optimizer that wraps another: it shares the inner optimizer's param groups, state and
defaults (so lr schedulers, GradScaler and hooks see one object), runs torch's step and state_dict hooks on
itself, and leaves subclasses only their own step and their own part of the state_dict."""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from collections import OrderedDict
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

_HOOKS = ("step_pre", "step_post", "state_dict_pre", "state_dict_post", "load_state_dict_pre", "load_state_dict_post")
# attributes torch's Optimizer sets up per instance; rebuilt after unpickling rather than pickled
_TORCH_ATTRIBUTES = {f"_optimizer_{name}_hooks" for name in _HOOKS} | {"_zero_grad_profile_name"}


def _inner(name: str) -> property:
    return property(
        lambda self: getattr(self.optimizer, name),
        lambda self, value: setattr(self.optimizer, name, value),
        doc=f"The inner optimizer's ``{name}`` (the same object).",
    )


class OptimizerWrapper(Optimizer, metaclass=ABCMeta):
    """Base of Lookahead and MasterWeights. Subclasses implement ``step``, ``_own_state`` (their entries of the
    state_dict beside ``"optimizer"``) and ``_load_own_state``, and list the entries in ``_STATE_KEYS``."""

    param_groups = _inner("param_groups")
    defaults = _inner("defaults")
    state = _inner("state")
    _STATE_KEYS: tuple[str, ...] = ()

    def __init__(self, optimizer: Optimizer) -> None:
        name = type(self).__name__
        if isinstance(optimizer, type):
            raise TypeError(
                f"{name}: optimizer must be a torch.optim.Optimizer instance, got the class "
                f"{optimizer.__name__}; pass {optimizer.__name__}(params, ...)"
            )
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"{name}: optimizer must be a torch.optim.Optimizer instance, got {type(optimizer).__name__}"
            )
        # not Optimizer.__init__: it would build param groups of its own instead of sharing the inner ones
        self.optimizer = optimizer
        self._init_hooks()

    def _init_hooks(self) -> None:
        for name in _HOOKS:
            setattr(self, f"_optimizer_{name}_hooks", OrderedDict())
        self._patch_step_function()
        self._warned_capturable_if_run_uncaptured = True

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in _TORCH_ATTRIBUTES}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_hooks()

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    @abstractmethod
    def _own_state(self) -> dict[str, Any]:
        """The wrapper's entries of the state_dict, beside ``"optimizer"``."""

    @abstractmethod
    def _load_own_state(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Check the subclass's entries and return the attributes to set once the inner state has loaded."""

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state_dict under ``"optimizer"``, beside the wrapper's own entries."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        sd = {"optimizer": self.optimizer.state_dict(), **self._own_state()}
        for hook in self._optimizer_state_dict_post_hooks.values():
            sd = hook(self, sd) or sd
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = hook(self, state_dict) or state_dict
        missing = [key for key in ("optimizer", *self._STATE_KEYS) if key not in state_dict]
        if missing:
            raise ValueError(f"state_dict was not saved by {type(self).__name__}: it lacks {missing}")
        attributes = self._load_own_state(state_dict)
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.__dict__.update(attributes)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)


def indexed_tensors(saved: Any, params: list[Tensor], what: str) -> dict[Tensor, Tensor]:
    """``{index: tensor}`` from a state_dict checked against ``params`` (param-group order) and copied onto each
    parameter's device; the copy keeps the loaded tensors from aliasing a dict that may be loaded again."""
    out = {}
    for index, tensor in saved.items():
        if not (isinstance(index, int) and 0 <= index < len(params)):
            raise ValueError(f"state_dict: {what} {index!r} has no parameter (this optimizer has {len(params)})")
        p = params[index]
        if not isinstance(tensor, Tensor) or tensor.shape != p.shape:
            got = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
            raise ValueError(f"state_dict: {what} {index} is {got}, parameter {index} has shape {tuple(p.shape)}")
        out[p] = tensor.to(device=p.device, dtype=p.dtype, copy=True)
    return out
