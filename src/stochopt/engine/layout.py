"""State layouts: the named tensors an algorithm keeps per parameter, declared once.

The engine creates state lazily from a layout, checks loaded state_dicts against it, and the memory estimator
reads it; there is no second list of state to keep in sync.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

#: A named shape rule, or a function of the parameter's shape giving the state tensor's shape (the blocks of
#: Shampoo's preconditioners, the factor diagonals of AdaFisher): the estimator reads either the same way.
ShapeRule = Callable[[torch.Size], tuple[int, ...]]
Shape = Literal["param", "scalar", "row", "col"] | ShapeRule
DType = Literal["state", "param", "scalar"]
Applies = Literal["all", "matrix", "vector"]

LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class StateSpec:
    """One state tensor.

        ``shape``: ``"param"`` (like the parameter), ``"scalar"`` (0-d, kept on the CPU as torch.optim keeps its
        scalar state), ``"row"``/``"col"`` (the parameter's shape with the last / second-to-last dimension reduced
        to 1: factored statistics of a matrix), or a function of the parameter's shape (a ``ShapeRule``, for state
    that is neither, such as matrix preconditioners; make it a module-level function or a frozen dataclass so that
    layouts compare equal). ``applies``: ``"matrix"`` for parameters of two or more dimensions
        only, ``"vector"`` for the others only. ``dtype``: ``"state"`` follows the optimizer's state dtype (float32
        for float16/bfloat16 parameters unless ``state_dtype`` says otherwise), ``"param"`` the parameter's dtype,
        ``"scalar"`` torch.optim's dtype for scalar state (float64 when the default dtype is float64, else float32).
        ``init``: the value the tensor starts from, or ``"param"`` for a copy of the parameter.
    """

    name: str
    shape: Shape = "param"
    dtype: DType = "state"
    init: float | Literal["param"] = 0.0
    applies: Applies = "all"

    def applies_to(self, param: Tensor) -> bool:
        if self.applies == "all":
            return True
        return (param.dim() > 1) == (self.applies == "matrix")


STEP = StateSpec("step", shape="scalar", dtype="scalar")


def state_dtype_for(param: Tensor, state_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of ``"state"`` tensors for ``param``: float32 for low-precision params unless overridden."""
    if state_dtype is not None:
        return state_dtype
    return torch.float32 if param.dtype in LOW_PRECISION else param.dtype


def compute_dtype_for(param: Tensor, state_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype the update's math runs in for ``param``: ``promote_types(param dtype, state dtype)``.

    The state dtype is a storage format: state of another dtype is read into the compute dtype, updated there
    and rounded to its own dtype once per step, when it is written back (engine/update.py ``apply_update``);
    so is a parameter of another dtype. float32 params with ``state_dtype=torch.bfloat16`` compute in float32,
    bfloat16 params with the default float32 state in float32, bfloat16 params with bfloat16 state in bfloat16.
    """
    return torch.promote_types(param.dtype, state_dtype_for(param, state_dtype))


def spec_dtype(spec: StateSpec, param: Tensor, state_dtype: torch.dtype | None) -> torch.dtype:
    if spec.dtype == "scalar":
        return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    if spec.dtype == "param":
        return param.dtype
    return state_dtype_for(param, state_dtype)


def spec_shape(spec: StateSpec, param: Tensor) -> torch.Size:
    if callable(spec.shape):
        return torch.Size(spec.shape(param.shape))
    if spec.shape == "scalar":
        return torch.Size([])
    shape = list(param.shape)
    if spec.shape == "row":
        shape[-1] = 1
    elif spec.shape == "col":
        shape[-2] = 1
    return torch.Size(shape)


def applicable(specs: tuple[StateSpec, ...], param: Tensor) -> tuple[StateSpec, ...]:
    """The specs of ``specs`` that exist for ``param``."""
    return tuple(spec for spec in specs if spec.applies_to(param))


def new_state_tensor(
    spec: StateSpec, param: Tensor, state_dtype: torch.dtype | None, scalar_on_device: bool = False
) -> Tensor:
    """``scalar_on_device``: a ``"scalar"`` tensor (a step counter) on the parameter's device, not the CPU."""
    dtype = spec_dtype(spec, param, state_dtype)
    if spec.init == "param":
        return param.detach().to(dtype, copy=True, memory_format=torch.preserve_format)
    if spec.shape == "scalar":
        return torch.tensor(spec.init, dtype=dtype, device=param.device if scalar_on_device else "cpu")
    if spec.shape == "param":
        return torch.full_like(param, spec.init, dtype=dtype, memory_format=torch.preserve_format)
    return torch.full(spec_shape(spec, param), spec.init, dtype=dtype, device=param.device)


def state_nbytes(specs: tuple[StateSpec, ...], param: Tensor, state_dtype: torch.dtype | None) -> int:
    """Bytes of the state the layout creates for ``param`` (what the memory estimator adds up)."""
    total = 0
    for spec in applicable(specs, param):
        itemsize = torch.empty((), dtype=spec_dtype(spec, param, state_dtype)).element_size()
        total += spec_shape(spec, param).numel() * itemsize
    return total
