"""Gradient centralization as a step any optimizer can switch on."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from stochopt.engine import EngineOptimizer, centralize

__all__ = ["centralize", "gradient_centralization"]


def gradient_centralization(optimizer: torch.optim.Optimizer) -> RemovableHandle | None:
    r"""Switch on gradient centralization (Yong et al., 2020, "Gradient Centralization: A New Optimization
    Technique for Deep Neural Networks") for every parameter of two or more dimensions:

    .. math::
        g \leftarrow g - \mathrm{mean}_{\text{all dims but the first}}(g)

    On a stochopt optimizer this sets the ``centralize_gradients`` option of every param group (and of groups
    added later): the engine centralizes a copy of the gradient in the precision of the update, leaving
    ``p.grad`` as it is. Any other ``torch.optim.Optimizer`` gets a step pre-hook that centralizes ``p.grad``
    in place; the returned handle removes it. Per-group control on a stochopt optimizer: set
    ``centralize_gradients`` in the param-group dict instead.
    """
    if isinstance(optimizer, EngineOptimizer):
        optimizer.defaults["centralize_gradients"] = True
        for group in optimizer.param_groups:
            group["centralize_gradients"] = True
        return None
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")

    def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        with torch.no_grad():
            for group in opt.param_groups:
                for p in group["params"]:
                    if p.grad is not None and p.grad.dim() > 1 and not p.grad.is_sparse:
                        p.grad.copy_(centralize(p.grad))

    return optimizer.register_step_pre_hook(hook)
