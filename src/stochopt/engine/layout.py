"""State layouts: the named tensors an algorithm keeps per parameter, declared once.

The engine creates state lazily from a layout, checks loaded state_dicts against it, and the memory estimator
reads it; there is no second list of state to keep in sync.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import Tensor

from stochopt.engine import storage

#: A named shape rule, or a function of the parameter's shape giving the state tensor's shape (the blocks of
#: Shampoo's preconditioners, the factor diagonals of AdaFisher): the estimator reads either the same way.
ShapeRule = Callable[[torch.Size], tuple[int, ...]]
Shape = Literal["param", "scalar", "row", "col"] | ShapeRule
DType = Literal["state", "param", "scalar", "codes", "absmax"]
Applies = Literal["all", "matrix", "vector", "blocks"]

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
        ``quantize``: the tensor is a moment that ``state_dtype="int8"`` stores as 8-bit codes with the
        ``"signed"`` or (non-negative moments) the ``"unsigned"`` map (engine/storage.py); ``stored_layout``
        then turns it into a ``"codes"`` tensor (uint8 for parameters of ``storage.MIN_NUMEL`` values or more,
        else the state dtype) and an ``"absmax"`` tensor of block scales (``applies="blocks"``: only there).
    """

    name: str
    shape: Shape = "param"
    dtype: DType = "state"
    init: float | Literal["param"] = 0.0
    applies: Applies = "all"
    quantize: Literal["signed", "unsigned"] | None = None

    def applies_to(self, param: Tensor) -> bool:
        if self.applies == "all":
            return True
        if self.applies == "blocks":
            return storage.quantized_param(param)
        return (param.dim() > 1) == (self.applies == "matrix")


STEP = StateSpec("step", shape="scalar", dtype="scalar")


def stored_layout(specs: tuple[StateSpec, ...], group: dict[str, Any]) -> tuple[StateSpec, ...]:
    """The tensors the engine keeps for a layout under the group's storage options: under
    ``state_dtype="int8"`` each quantizable moment as codes and block scales, and with
    ``weight_rounding="compensated"`` a bfloat16 ``compensation`` buffer per parameter (engine/storage.py)."""
    stored: list[StateSpec] = []
    for spec in specs:
        if spec.quantize is None or group.get("state_dtype") != storage.INT8:
            stored.append(spec)
            continue
        scales = StateSpec(storage.absmax_name(spec.name), storage.block_count, "absmax", abs(spec.init), "blocks")
        stored += [replace(spec, dtype="codes"), scales]
    if group.get("weight_rounding") == "compensated":
        stored.append(StateSpec("compensation", dtype="param"))
    if group.get("weight_rounding") == "stochastic" and STEP not in stored:
        stored.insert(0, STEP)  # the random bits of each step are drawn by the step's number
    return tuple(stored)


def measured_states(specs: tuple[StateSpec, ...], param: Tensor) -> tuple[str, ...]:
    """The state tensors of ``param`` whose norms the statistics report (engine/update.py ``STATISTICS``): the
    non-scalar ones the update sees (not the 8-bit scales, nor a compensation buffer), in layout order."""
    hidden = ("absmax", "scalar")
    return tuple(
        s.name
        for s in applicable(specs, param)
        if s.shape != "scalar" and s.dtype not in hidden and s.name not in ("compensation", "statistics")
    )


@dataclass(frozen=True)
class StatisticsShape:
    """The statistics vector of a parameter: update, weight, each measured state tensor, and the ``reported``
    scalars of the update (a ``ShapeRule``: it sees the shape only, so it judges applicability on a meta
    tensor of that shape)."""

    specs: tuple[StateSpec, ...]
    reported: int

    def __call__(self, shape: torch.Size) -> tuple[int, ...]:
        return (2 + len(measured_states(self.specs, torch.empty(shape, device="meta"))) + self.reported,)


def with_statistics(specs: tuple[StateSpec, ...], reported: tuple[str, ...]) -> tuple[StateSpec, ...]:
    """``specs`` with the statistics vector (float32) of the group option ``statistics``."""
    return (*specs, StateSpec("statistics", StatisticsShape(specs, len(reported)), "absmax", float("nan")))


def convert_saved(specs: tuple[StateSpec, ...], param: Tensor, saved: dict[str, Any]) -> dict[str, Any]:
    """A parameter's saved state in the form ``specs`` (a stored layout) keeps: float moments saved by an
    optimizer without ``state_dtype="int8"`` are encoded where this one keeps codes, codes decoded (to float32)
    where it keeps floats; a missing ``compensation`` starts at zero, an unused one is dropped. So a checkpoint
    loads across the storage options; within one, nothing changes (resume is bit-exact)."""
    out = dict(saved)
    names = {spec.name for spec in specs}
    for spec in specs:
        if spec.quantize is None or spec.name not in out:
            continue
        scale, signed = storage.absmax_name(spec.name), spec.quantize == "signed"
        wants_codes = spec.dtype == "codes" and storage.quantized_param(param)
        has_codes = out[spec.name].dtype == torch.uint8
        if wants_codes and not has_codes:
            out[spec.name], out[scale] = storage.quantize(out[spec.name].to(torch.float32), signed)
        elif has_codes and not wants_codes:
            out[spec.name] = storage.dequantize(out[spec.name], out.pop(scale), signed, torch.float32)
    if "compensation" in names and "compensation" not in out and out:
        out["compensation"] = torch.zeros_like(param)
    if "compensation" not in names:
        out.pop("compensation", None)
    return out


def quantized_moments(specs: tuple[StateSpec, ...]) -> tuple[tuple[str, bool], ...]:
    """(name, signed) of the moments ``stored_layout`` keeps as codes."""
    return tuple((spec.name, spec.quantize == "signed") for spec in specs if spec.dtype == "codes")


def state_dtype_for(param: Tensor, state_dtype: torch.dtype | str | None) -> torch.dtype:
    """The dtype of ``"state"`` tensors for ``param``: float32 for low-precision params unless overridden
    (``"int8"`` overrides only the quantized moments: the rest keeps the default)."""
    if isinstance(state_dtype, torch.dtype):
        return state_dtype
    return torch.float32 if param.dtype in LOW_PRECISION else param.dtype


def compute_dtype_for(param: Tensor, state_dtype: torch.dtype | str | None) -> torch.dtype:
    """The dtype the update's math runs in for ``param``: ``promote_types(param dtype, state dtype)``.

    The state dtype is a storage format: state of another dtype is read into the compute dtype, updated there
    and rounded to its own dtype once per step, when it is written back (engine/update.py ``apply_update``);
    so is a parameter of another dtype. float32 params with ``state_dtype=torch.bfloat16`` compute in float32,
    bfloat16 params with the default float32 state in float32, bfloat16 params with bfloat16 state in bfloat16.
    """
    return torch.promote_types(param.dtype, state_dtype_for(param, state_dtype))


def spec_dtype(spec: StateSpec, param: Tensor, state_dtype: torch.dtype | str | None) -> torch.dtype:
    if spec.dtype == "codes" and storage.quantized_param(param):
        return torch.uint8
    if spec.dtype == "absmax":
        return torch.float32
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
    spec: StateSpec, param: Tensor, state_dtype: torch.dtype | str | None, scalar_on_device: bool = False
) -> Tensor:
    """``scalar_on_device``: a ``"scalar"`` tensor (a step counter) on the parameter's device, not the CPU."""
    dtype = spec_dtype(spec, param, state_dtype)
    if dtype == torch.uint8:  # 8-bit codes of a tensor filled with init (its scale is abs(init))
        code = storage.init_code(spec.quantize == "signed", float(spec.init))
        return torch.full(param.shape, code, dtype=dtype, device=param.device)
    if spec.init == "param":
        return param.detach().to(dtype, copy=True, memory_format=torch.preserve_format)
    if spec.shape == "scalar":
        return torch.tensor(spec.init, dtype=dtype, device=param.device if scalar_on_device else "cpu")
    if spec.shape == "param":
        return torch.full_like(param, spec.init, dtype=dtype, memory_format=torch.preserve_format)
    return torch.full(spec_shape(spec, param), spec.init, dtype=dtype, device=param.device)


def state_nbytes(specs: tuple[StateSpec, ...], param: Tensor, state_dtype: torch.dtype | str | None) -> int:
    """Bytes of the state the layout creates for ``param`` (what the memory estimator adds up)."""
    total = 0
    for spec in applicable(specs, param):
        itemsize = torch.empty((), dtype=spec_dtype(spec, param, state_dtype)).element_size()
        total += spec_shape(spec, param).numel() * itemsize
    return total
