"""The pure pieces of an update that every execution path shares: the eager loop, foreach and the fused kernel.

A leaf of the engine: it imports nothing of the engine, so that ``optimizer`` and ``fused`` both read from it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def centralize(g: Tensor) -> Tensor:
    """Gradient centralization (Yong et al., 2020): subtract the mean over all dimensions but the first.

    The row means are a product with a vector of ones: in the fused path that is one BLAS call ahead of the
    update's loop. As a reduction, inductor (torch 2.13, CPU) fuses the mean into the update's row loop and
    fails compiling it (``InductorError: KeyError`` in its outer-loop fusion).
    """
    rows = g.reshape(g.shape[0], -1)
    mean = torch.mm(rows, rows.new_ones(rows.shape[1], 1)).div_(rows.shape[1])
    return g - mean.view(-1, *(1,) * (g.dim() - 1))


def apply_update(
    update: Callable[..., None],
    p: Any,
    g: Any,
    state: dict[str, Any],
    c: dict[str, Any],
    flags: dict[str, Any],
    maximize: bool,
    compute_dtype: torch.dtype,
) -> None:
    """Run ``update`` on tensors or TensorLists with its math in ``compute_dtype`` (engine/layout.py
    ``compute_dtype_for``: the promotion of the parameter's dtype and the state dtype).

    The gradient, the parameter and every state tensor of another dtype are converted to ``compute_dtype``,
    the update runs on those copies, and the parameter and the state tensors are written back (``copy_``): each
    is rounded to its own dtype once per step. So ``state_dtype`` is a storage format: bfloat16 state of float32
    parameters is read as float32 and rounded to bfloat16 when stored, as a bfloat16 parameter with float32
    state is. The same code runs eagerly and inside the fused path's compiled kernel (dtypes are static there).
    ``state`` holds the tensors the update reads (not the scalar state such as ``step``).
    """
    if maximize:
        g = -g
    if g.dtype != compute_dtype:
        g = g.to(compute_dtype)
    converted = [name for name, s in state.items() if s.dtype != compute_dtype]
    work = {name: s.to(compute_dtype) if name in converted else s for name, s in state.items()}
    p_compute = p if p.dtype == compute_dtype else p.to(compute_dtype)
    update(p_compute, g, work, c, **flags)
    if p.dtype != compute_dtype:
        p.copy_(p_compute)
    for name in converted:
        state[name].copy_(work[name])
