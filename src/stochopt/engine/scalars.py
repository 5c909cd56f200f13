"""The arithmetic of an update's coefficients, written once for Python numbers and for tensors.

An optimizer's ``_coefficients(group, step, states)`` turns the step count and the hyperparameters into the
scalars its update needs (bias corrections, step sizes). The engine evaluates it in one of two modes:

- **number mode** (the default, eager): ``step`` is a Python int and every value is a Python float. Nothing
  touches a device: the step counters are CPU tensors, as torch.optim keeps them when ``capturable=False``.
- **tensor mode** (``capturable=True``, and any step traced by ``torch.compile``): ``step`` is a float64 tensor
  of shape ``(n,)`` on the parameters' device, one entry per parameter of the bucket, and the coefficients come
  out as tensors of that shape (or Python floats where they depend on hyperparameters alone). No value is read
  by the host, so the step can be captured in a CUDA graph and traced without a graph break.

So a coefficient function must not call ``math.*``, ``float()`` or ``.item()`` on step-derived values, nor branch
on them: it uses the functions here (``sqrt``, ``log``, ``where``, ``minimum``, ``maximum``) and ``scalar`` for
hyperparameters, each of which does the right thing in either mode.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

_mode = threading.local()


@contextmanager
def tensor_mode() -> Iterator[None]:
    """Evaluate coefficients in tensor mode (see the module docstring) inside this block."""
    previous = getattr(_mode, "tensors", False)
    _mode.tensors = True
    try:
        yield
    finally:
        _mode.tensors = previous


def in_tensor_mode() -> bool:
    """Whether coefficients are being evaluated as tensors: inside ``tensor_mode()`` or under torch.compile."""
    return getattr(_mode, "tensors", False) or torch.compiler.is_compiling()


def scalar(value: Any) -> Any:
    """A hyperparameter: a Python float in number mode; in tensor mode a tensor stays a tensor (torch.optim
    accepts 0-d tensors for lr and betas, and reading one would be a host synchronization)."""
    if isinstance(value, Tensor):
        return value if in_tensor_mode() else float(value.item())
    return float(value)


def sqrt(x: Any) -> Any:
    return x.sqrt() if isinstance(x, Tensor) else math.sqrt(x)


def log(x: Any) -> Any:
    return x.log() if isinstance(x, Tensor) else math.log(x)


def where(condition: Any, a: Any, b: Any) -> Any:
    """``a`` where ``condition`` holds, else ``b``: a Python conditional on numbers, ``torch.where`` on tensors.
    Both branches are evaluated, so each must be finite (or at least not raise) where it is not chosen.
    Two Python numbers under a tensor condition come out in float64 (``torch.where`` would give the default
    dtype, float32, and round them)."""
    if isinstance(condition, Tensor):
        if not isinstance(a, Tensor) and not isinstance(b, Tensor):
            a = torch.as_tensor(a, dtype=torch.float64, device=condition.device)
        return torch.where(condition, a, b)
    return a if condition else b


def minimum(a: Any, b: Any) -> Any:
    """``min(a, b)`` on numbers, elementwise on tensors; a Python number beside a tensor takes the tensor's
    dtype, as in any arithmetic (``torch.as_tensor`` would round it to the default dtype first)."""
    return _extreme(a, b, smaller=True)


def maximum(a: Any, b: Any) -> Any:
    """``max(a, b)`` on numbers, elementwise on tensors (see ``minimum``)."""
    return _extreme(a, b, smaller=False)


def _extreme(a: Any, b: Any, smaller: bool) -> Any:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return torch.minimum(a, b) if smaller else torch.maximum(a, b)
    if isinstance(b, Tensor):
        a, b = b, a
    if isinstance(a, Tensor):  # b a number
        return a.clamp(max=b) if smaller else a.clamp(min=b)
    return min(a, b) if smaller else max(a, b)
