r"""The optimizer step fused into the backward pass: each parameter is stepped as soon as its gradient is
complete, and the gradient is freed at once, so that backward holds about one parameter's gradient instead of
all of them (the pattern of PyTorch's tutorial "How to save memory by fusing the optimizer step into the
backward pass" and of torchtune's ``OptimizerInBackwardWrapper``).

One optimizer per parameter is built by a function the user gives, and run from the parameter's
``register_post_accumulate_grad_hook``, which autograd calls once per backward, after it has summed every
contribution to that gradient (a parameter used twice in the forward pass included). An optimizer whose update
reads more than one parameter at a time cannot be split so: those are refused by name (:data:`REFUSED`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from stochopt.optim.adafisher import AdaFisher
from stochopt.optim.newton import Newton
from stochopt.optim.prodigy import Prodigy
from stochopt.optim.schedulefree import AdamWScheduleFree, SGDScheduleFree
from stochopt.optim.wrapper import _HOOKS

_CLOSURE = "needs a closure that re-evaluates the loss during its step; a step taken in backward has none"
#: optimizers whose step cannot run one parameter at a time, with the reason given in the refusal
REFUSED: dict[type, str] = {
    torch.optim.LBFGS: _CLOSURE,
    Newton: _CLOSURE,
    Prodigy: "its step size d is one estimate summed over every parameter; per parameter it would be another method",
    AdaFisher: "its Kronecker factors come from hooks on the model's layers (AdaFisher(model)); built on one "
    "parameter it is plain Adam",
    AdamWScheduleFree: "its train()/eval() switch moves every parameter between two points, and StepInBackward "
    "does not pass it on",
    SGDScheduleFree: "its train()/eval() switch moves every parameter between two points, and StepInBackward "
    "does not pass it on",
}

Factory = Callable[[list[dict[str, Any]]], Optimizer]


class StepInBackward(Optimizer):
    """Step each parameter during backward, as soon as its gradient is complete, and free the gradient::

        opt = StepInBackward(model.parameters(), lambda params: stochopt.AdamW(params, lr=1e-3))
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=10)
        for x, y in loader:
            loss_fn(model(x), y).backward()   # steps every parameter; every p.grad is None after it
            opt.step()                        # a no-op, kept so that the loop reads as usual
            scheduler.step()

    ``params`` are tensors or param groups (dicts), as for any optimizer; ``make_optimizer`` is called once per
    parameter with a list of one param group holding that parameter and its group's options (which override
    the optimizer's defaults, as in ``torch.optim``), and must return an optimizer of that one parameter.
    ``opt.optimizers`` are those optimizers, in parameter order.

    ``param_groups`` lists every per-parameter optimizer's group (the same dicts), so ``torch.optim.lr_scheduler``
    schedulers and stochopt's schedules drive it; ``state_dict()`` is ``{"optimizers": [each optimizer's
    state_dict, in parameter order]}``. ``zero_grad()`` frees any gradient left (there is none after backward);
    ``step(closure)`` evaluates the closure once (its backward steps) and returns its loss.

    Limits, by construction: every backward is one step, so gradient accumulation over several backward calls
    (micro-batches) cannot be done (accumulate within one backward: sum the micro-batches' losses); clipping by
    the norm of all gradients (``clip_grad_norm_``, :func:`stochopt.training.clip_gradients`) sees no gradient,
    as every parameter has stepped and freed its gradient before the last one is known (a norm of 0 is
    returned, clipping nothing); float16 loss scaling (GradScaler) needs every gradient checked before any step;
    under DistributedDataParallel the hook fires before the gradients' all-reduce (each rank would step alone).
    Optimizers whose step needs a closure or couples parameters (:data:`REFUSED`), and a ``nonfinite`` policy,
    which decides for a whole step, are refused by name. The hooks hold this object: :meth:`remove_hooks`
    takes them off.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], make_optimizer: Factory) -> None:
        if isinstance(make_optimizer, Optimizer) or not callable(make_optimizer):
            got = type(make_optimizer).__name__
            raise TypeError(
                f"StepInBackward: make_optimizer must be a function that builds an optimizer from params, such as "
                f"lambda params: stochopt.AdamW(params, lr=1e-3); got {got}"
            )
        if isinstance(params, Tensor):
            raise TypeError("StepInBackward: params must be an iterable of tensors or param groups, got a Tensor")
        self._make = make_optimizer
        self._by_param: dict[Tensor, Optimizer] = {}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        # not Optimizer.__init__ (it would build param groups of its own); its hooks, as OptimizerWrapper sets them
        for name in _HOOKS:
            setattr(self, f"_optimizer_{name}_hooks", OrderedDict())
        self._patch_step_function()
        self._warned_capturable_if_run_uncaptured = True
        groups = list(params)
        if not groups:
            raise ValueError("StepInBackward: params is empty")
        for group in groups if isinstance(groups[0], dict) else [{"params": groups}]:
            self.add_param_group(group)

    @property
    def optimizers(self) -> list[Optimizer]:
        """One optimizer per parameter, in parameter order."""
        return list(self._by_param.values())

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return [group for opt in self._by_param.values() for group in opt.param_groups]

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return next(iter(self._by_param.values())).defaults

    @property
    def state(self) -> dict[Tensor, Any]:  # type: ignore[override]
        """Every optimizer's state, merged (a new dict: change the optimizers' own ``state``)."""
        return {p: s for opt in self._by_param.values() for p, s in opt.state.items()}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict) or "params" not in param_group:
            raise TypeError(f"StepInBackward: a param group must be a dict with 'params', got {param_group!r}")
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        options = {k: v for k, v in param_group.items() if k != "params"}
        for p in params:
            self._check_param(p)
            opt = self._make([{**options, "params": [p]}])
            self._check_optimizer(opt, p)
            self._by_param[p] = opt
            self._hooks.append(p.register_post_accumulate_grad_hook(self._step_param))

    def _check_param(self, p: Any) -> None:
        index = len(self._by_param)
        if not isinstance(p, Tensor):
            raise TypeError(f"StepInBackward: parameter {index} must be a Tensor, got {type(p).__name__}")
        if not (p.is_leaf and p.requires_grad):
            raise ValueError(
                f"StepInBackward: parameter {index} (shape {tuple(p.shape)}) is not a leaf tensor that requires grad; "
                "pass only trainable parameters: [p for p in model.parameters() if p.requires_grad]"
            )
        if p in self._by_param:
            raise ValueError(f"StepInBackward: parameter {index} (shape {tuple(p.shape)}) is given twice")

    def _check_optimizer(self, opt: Any, p: Tensor) -> None:
        if not isinstance(opt, Optimizer):
            raise TypeError(f"StepInBackward: make_optimizer must return a torch.optim.Optimizer, got {opt!r}")
        held = sum(len(group["params"]) for group in opt.param_groups)
        if held != 1:
            raise ValueError(
                f"StepInBackward: make_optimizer must build an optimizer of the one parameter it is given "
                f"(shape {tuple(p.shape)}); it built one of {held} parameters"
            )
        inner: Any = opt
        while isinstance(inner, Optimizer):  # wrappers (Lookahead, MasterWeights) keep theirs in .optimizer
            for cls, reason in REFUSED.items():
                if isinstance(inner, cls):
                    raise ValueError(f"StepInBackward cannot run {cls.__name__}: {reason}")
            inner = getattr(inner, "optimizer", None)
        for group in opt.param_groups:
            if group.get("nonfinite"):
                raise ValueError(
                    f"StepInBackward: nonfinite={group['nonfinite']!r} decides over every gradient of a step, but "
                    "the parameters stepped in backward before a non-finite gradient cannot be taken back; use "
                    "nonfinite=None"
                )

    def _step_param(self, p: Tensor) -> None:
        # autograd calls this after it has summed all of this backward's contributions to p.grad; the nodes
        # that read p's value have run by then (each also produced a contribution), so p may change in place
        self._by_param[p].step()
        p.grad = None

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """A no-op (the parameters stepped in backward); with a closure, evaluates it once and returns its loss."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self._by_param.values():
            opt.zero_grad(set_to_none)

    def remove_hooks(self) -> None:
        """Take the hooks off the parameters: backward then leaves gradients and steps nothing."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [opt.state_dict() for opt in self._by_param.values()]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("optimizers") if isinstance(state_dict, dict) else None
        if not isinstance(saved, list):
            raise ValueError("state_dict was not saved by StepInBackward: it has no 'optimizers' list")
        if len(saved) != len(self._by_param):
            raise ValueError(
                f"state_dict holds {len(saved)} optimizers but this StepInBackward has {len(self._by_param)} parameters"
            )
        for opt, sd in zip(self._by_param.values(), saved):
            opt.load_state_dict(sd)

    def __repr__(self) -> str:
        first = next(iter(self._by_param.values()))
        return f"StepInBackward({len(self._by_param)} parameters, {type(first).__name__} each)"
