"""The fused path: an update function compiled by torch.compile into one kernel.

One kernel is compiled per (update function, static flags, coefficient names, maximize, compute dtype) and
reused for every tensor: tensors are passed flattened with dynamic sizes, so a new shape never recompiles, and
coefficients (lr, betas, bias corrections) are passed as one tensor, so a scheduler changing lr never recompiles
either. That tensor is at least float32 (``coefficient_dtype``) whatever the compute dtype: in bfloat16, beta2 =
0.999 would be 1.0 and lr = 1e-3 0.0010004, where the eager paths take a Python float at float32 (opmath).
Dynamo guards on dtype and device, so the compile cost is paid once per optimizer, dtype and device
(C++/OpenMP on the CPU, Triton on CUDA).

An update function may mark ``stage_boundary()`` points: the fused path then compiles one kernel per stage and
the tensors that cross a boundary are written to memory once. Why: inductor inlines cheap pointwise producers
into every loop that consumes them, so a small tensor broadcast over a large one (Adafactor's row and column
factors, each a square root and a division) is recomputed for every element of the large one.

Why one launch per tensor rather than one per list: a graph over a list of N tensors compiles N kernels and is
specialized to N; measured on a 2-core CPU, compiling it for 49 tensors took ~70 s against ~8 s for the
per-tensor kernel. The per-tensor launch costs ~100 microseconds of dispatch (dynamo's guards and inductor's
wrapper), more than the kernel saves on a small tensor: tensors under ``SMALL_TENSOR_NUMEL`` elements take the
foreach path instead, all together in one multi-tensor call.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from stochopt.engine.update import apply_update, centralize

_KERNELS: dict[tuple[Any, ...], Callable[..., None]] = {}


#: inductor options for elementwise kernels. dynamic_threads: otherwise the C++ kernel's OpenMP decision is fixed
#: by the size of the first tensor it sees, and a kernel first compiled for a small tensor runs single-threaded on
#: every matrix after it (measured: 12.6 against 8.3 ms on 8M elements).
ELEMENTWISE_OPTIONS: dict[str, Any] = {"cpp.dynamic_threads": True}


def stage_boundary() -> None:
    """End one compiled kernel of the fused path and start the next here (see the module docstring).

    A no-op in the eager paths. Only optimizers that declare ``_staged = True`` may call it: the others are
    compiled with ``fullgraph=True``, which turns any break of the graph into an error.
    """
    torch._dynamo.graph_break()


def coefficient_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the kernel's coefficient tensor: the compute dtype, but at least float32."""
    return torch.promote_types(compute_dtype, torch.float32)


def fused_kernel(
    update: Callable[..., None],
    flags: dict[str, Any],
    coef_names: tuple[str, ...],
    maximize: bool,
    options: dict[str, Any] | None = None,
    staged: bool = False,
    centralized: bool = False,
    *,
    compute_dtype: torch.dtype,
) -> Callable[[Tensor, Tensor, dict[str, Tensor], Tensor], None]:
    """The compiled kernel ``kernel(p, g, state, coefs)`` for ``update`` with these static options;
    ``staged``: ``update`` calls ``stage_boundary()`` (one kernel per stage); ``centralized``: the kernel first
    centralizes g (gradient centralization); every tensor then arrives with its rows, as ``(rows, -1)`` or
    in its own shape. ``compute_dtype``: the dtype the math runs in (engine/update.py ``apply_update``);
    ``coefs`` is of ``coefficient_dtype(compute_dtype)``."""
    options = ELEMENTWISE_OPTIONS if options is None else options
    key = (update, tuple(sorted(flags.items())), coef_names, maximize, tuple(sorted(options.items())))
    key += (staged, centralized, compute_dtype)
    kernel = _KERNELS.get(key)
    if kernel is None:
        kernel = _compile(update, dict(flags), coef_names, maximize, options, staged, centralized, compute_dtype)
        _KERNELS[key] = kernel
    return kernel


def _compile(
    update: Callable[..., None],
    flags: dict[str, Any],
    coef_names: tuple[str, ...],
    maximize: bool,
    options: dict[str, Any],
    staged: bool,
    centralized: bool,
    compute_dtype: torch.dtype,
) -> Callable[..., None]:
    def kernel(p: Tensor, g: Tensor, state: dict[str, Tensor], coefs: Tensor) -> None:
        c = dict(zip(coef_names, coefs.unbind(0)))
        if centralized:
            g = centralize(g.to(compute_dtype))
        apply_update(update, p, g, state, c, flags, maximize, compute_dtype)

    # Dynamo keeps its compiled graphs (and its recompile limit) per code object. A fresh code object per
    # kernel keeps the variants of many optimizers from sharing one cache and hitting that limit.
    name = f"fused_{getattr(update, '__qualname__', 'update').replace('.', '_')}"
    code = kernel.__code__.replace(co_name=name)
    fresh = types.FunctionType(code, kernel.__globals__, name, kernel.__defaults__, kernel.__closure__)
    return torch.compile(fresh, dynamic=True, fullgraph=not staged, options=options)
