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
    """Base of Lookahead and MasterWeights. Subclasses implement ``step``, ``_param_state`` / ``_group_state``
    (their entries of the state_dict) and ``_load_own_state``, and name the entries in ``_PARAM_KEYS`` /
    ``_GROUP_KEYS``.

    The state_dict is torch.optim's own format: the inner optimizer's, with the wrapper's per-parameter tensors
    (Lookahead's slow weights) added to each parameter's ``state`` entry and its scalars (Lookahead's k, alpha,
    step) to every param group, as timm's Lookahead keeps them. So ``torch.distributed.checkpoint``'s
    ``get_optimizer_state_dict``, accelerate and Lightning checkpoint a wrapper like any optimizer (sharded
    tensors included). State dicts of the earlier nested format (``{"optimizer": inner, ...}``) still load
    (``_from_nested``)."""

    param_groups = _inner("param_groups")
    defaults = _inner("defaults")
    state = _inner("state")
    _PARAM_KEYS: tuple[str, ...] = ()
    _GROUP_KEYS: tuple[str, ...] = ()
    #: the entries of the nested state_dict format, beside "optimizer"
    _NESTED_KEYS: tuple[str, ...] = ()

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
    def _param_state(self) -> dict[int, dict[str, Tensor]]:
        """The wrapper's tensors per parameter index (param-group order), keyed by ``_PARAM_KEYS``."""

    def _group_state(self) -> dict[str, Any]:
        """The wrapper's scalars, keyed by ``_GROUP_KEYS``, stored in every param group."""
        return {}

    @abstractmethod
    def _load_own_state(self, tensors: dict[int, dict[str, Tensor]], scalars: dict[str, Any]) -> dict[str, Any]:
        """Check the wrapper's entries and return the attributes to set once the inner state has loaded."""

    @abstractmethod
    def _from_nested(self, state_dict: dict[str, Any]) -> tuple[dict[int, dict[str, Tensor]], dict[str, Any]]:
        """The wrapper's entries of a nested-format state_dict (earlier versions), as ``_load_own_state`` takes
        them."""

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's ``state_dict`` with the wrapper's own state beside it."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        sd = self.optimizer.state_dict()
        state = dict(sd["state"])
        for index, entries in self._param_state().items():
            state[index] = {**state.get(index, {}), **entries}
        scalars = self._group_state()
        sd = {**sd, "state": state, "param_groups": [{**group, **scalars} for group in sd["param_groups"]]}
        for hook in self._optimizer_state_dict_post_hooks.values():
            sd = hook(self, sd) or sd
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = hook(self, state_dict) or state_dict
        if "optimizer" in state_dict:  # the nested format of earlier versions
            missing = [key for key in self._NESTED_KEYS if key not in state_dict]
            if missing:
                raise ValueError(f"state_dict was not saved by {type(self).__name__}: it lacks {missing}")
            tensors, scalars = self._from_nested(state_dict)
            inner = state_dict["optimizer"]
        else:
            tensors, scalars, inner = self._split(state_dict)
        attributes = self._load_own_state(tensors, scalars)
        self.optimizer.load_state_dict(inner)
        self.__dict__.update(attributes)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _split(self, state_dict: dict[str, Any]) -> tuple[dict[int, dict[str, Tensor]], dict[str, Any], dict]:
        """The wrapper's entries of a state_dict and the inner optimizer's state_dict without them."""
        groups = state_dict.get("param_groups") or [{}]
        missing = [key for key in self._GROUP_KEYS if key not in groups[0]]
        if missing or "state" not in state_dict:
            raise ValueError(
                f"state_dict was not saved by {type(self).__name__}: its param groups lack {missing or ['state']}"
            )
        scalars = {key: groups[0][key] for key in self._GROUP_KEYS}
        # state keys as the saved groups list them (indices; torch.distributed.checkpoint gives parameter names),
        # to positions in param-group order
        position = {key: i for i, key in enumerate(k for g in state_dict["param_groups"] for k in g["params"])}
        tensors, state = {}, {}
        for index, entry in state_dict["state"].items():
            own = {k: v for k, v in entry.items() if k in self._PARAM_KEYS}
            if own:
                tensors[position.get(index, index)] = own
            rest = {k: v for k, v in entry.items() if k not in self._PARAM_KEYS}
            if rest:
                state[index] = rest
        inner_groups = [{k: v for k, v in g.items() if k not in self._GROUP_KEYS} for g in state_dict["param_groups"]]
        return tensors, scalars, {**state_dict, "state": state, "param_groups": inner_groups}


def indexed_tensors(saved: Any, params: list[Tensor], what: str) -> dict[Tensor, Tensor]:
    """``{index: tensor}`` from a state_dict checked against ``params`` (param-group order) and copied onto each
    parameter's device; the copy keeps the loaded tensors from aliasing a dict that may be loaded again."""
    out = {}
    if not isinstance(saved, dict):
        raise ValueError(f"state_dict: the {what}s must be a dict by parameter index, got {type(saved).__name__}")
    for index, tensor in saved.items():
        if not (isinstance(index, int) and 0 <= index < len(params)):
            raise ValueError(f"state_dict: {what} {index!r} has no parameter (this optimizer has {len(params)})")
        p = params[index]
        if not isinstance(tensor, Tensor) or tensor.shape != p.shape:
            got = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
            raise ValueError(f"state_dict: {what} {index} is {got}, parameter {index} has shape {tuple(p.shape)}")
        out[p] = tensor.to(device=p.device, dtype=p.dtype, copy=True)
    return out
