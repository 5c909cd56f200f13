"""State layouts: the named tensors an algorithm keeps per parameter, declared once.

The engine creates state lazily from a layout, checks loaded state_dicts against it, and the memory estimator
reads it; there is no second list of state to keep in sync.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Shape = Literal["param", "scalar"]
DType = Literal["state", "param", "scalar"]

LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class StateSpec:
    """One state tensor.

    ``shape``: ``"param"`` (like the parameter) or ``"scalar"`` (0-d, kept on the CPU as torch.optim keeps its
    scalar state). ``dtype``: ``"state"`` follows the optimizer's state dtype (float32 for float16/bfloat16
    parameters unless ``state_dtype`` says otherwise), ``"param"`` the parameter's dtype, ``"scalar"`` torch.optim's
    dtype for scalar state (float64 when the default dtype is float64, else float32).
    ``init``: the value the tensor starts from.
    """

    name: str
    shape: Shape = "param"
    dtype: DType = "state"
    init: float = 0.0


STEP = StateSpec("step", shape="scalar", dtype="scalar")


def state_dtype_for(param: Tensor, state_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of ``"state"`` tensors for ``param``: float32 for low-precision params unless overridden."""
    if state_dtype is not None:
        return state_dtype
    return torch.float32 if param.dtype in LOW_PRECISION else param.dtype


def spec_dtype(spec: StateSpec, param: Tensor, state_dtype: torch.dtype | None) -> torch.dtype:
    if spec.dtype == "scalar":
        return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    if spec.dtype == "param":
        return param.dtype
    return state_dtype_for(param, state_dtype)


def spec_shape(spec: StateSpec, param: Tensor) -> torch.Size:
    return torch.Size([]) if spec.shape == "scalar" else param.shape


def new_state_tensor(spec: StateSpec, param: Tensor, state_dtype: torch.dtype | None) -> Tensor:
    dtype = spec_dtype(spec, param, state_dtype)
    if spec.shape == "scalar":
        return torch.tensor(spec.init, dtype=dtype)
    return torch.full_like(param, spec.init, dtype=dtype, memory_format=torch.preserve_format)


def state_nbytes(specs: tuple[StateSpec, ...], param: Tensor, state_dtype: torch.dtype | None) -> int:
    """Bytes of the state the layout creates for ``param`` (what the memory estimator adds up)."""
    total = 0
    for spec in specs:
        itemsize = torch.empty((), dtype=spec_dtype(spec, param, state_dtype)).element_size()
        total += spec_shape(spec, param).numel() * itemsize
    return total
