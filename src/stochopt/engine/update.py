"""The pure pieces of an update that every execution path shares: the eager loop, foreach and the fused kernel.

A leaf of the engine: it imports only the engine's leaves (storage, tensorlist), so that ``optimizer`` and
``fused`` both read from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor

from stochopt.engine import storage as storage_
from stochopt.engine.tensorlist import TensorList


def centralize(g: Tensor) -> Tensor:
    """Gradient centralization (Yong et al., 2020): subtract the mean over all dimensions but the first.

    The row means are a product with a vector of ones: in the fused path that is one BLAS call ahead of the
    update's loop. As a reduction, inductor (torch 2.13, CPU) fuses the mean into the update's row loop and
    fails compiling it (``InductorError: KeyError`` in its outer-loop fusion).
    """
    rows = g.flatten(1)  # not reshape(n, -1): a rank's shard of a sharded matrix may hold no rows
    mean = torch.mm(rows, rows.new_ones(rows.shape[1], 1)).div_(rows.shape[1])
    return g - mean.view(-1, *(1,) * (g.dim() - 1))


@dataclass(frozen=True)
class Storage:
    """How the update's tensors are stored (engine/storage.py), static per kernel: ``quantized``, the
    moments (name, signed) kept as 8-bit codes with block scales (``<name>_absmax``) where their dtype is
    uint8; ``weights``, the rounding of a bfloat16 parameter: None (to nearest), ``"stochastic"`` (with the
    coefficient ``rounding_salt``) or ``"compensated"`` (with the state tensor ``compensation``)."""

    quantized: tuple[tuple[str, bool], ...] = ()
    weights: str | None = None


PLAIN = Storage()


def _tensors(x: Any) -> list[Tensor]:
    return x.tensors if isinstance(x, TensorList) else [x]


def _each(fn: Callable[..., Tensor], *args: Any) -> Any:
    """``fn`` on tensors, or on each tensor of TensorLists (then a TensorList)."""
    if isinstance(args[0], TensorList):
        columns = [a.tensors if isinstance(a, TensorList) else a for a in args]
        return TensorList(fn(*row) for row in zip(*columns))
    return fn(*args)


#: the state entry that collects a step's statistics when the group option ``statistics`` is on (a float32
#: vector per parameter, engine/statistics.py); hidden from the update like the 8-bit scales
STATISTICS = "statistics"
#: entries an update function may add to its state dict for the statistics: ``state["stat_trust_ratio"] = r``
STATISTIC_PREFIX = "stat_"


def _statistics_row(sink: Tensor, new: Tensor, old: Tensor, *rest: Tensor, squares: int) -> Tensor:
    """One parameter's statistics written into ``sink``: the sums of squares of the update (new - old), of the
    weight and of the first ``squares`` of ``rest`` (its state tensors), then the rest as they are (scalars the
    update reported), NaN-padded to the sink's length. Sums, not norms: the host takes the roots, once."""
    values = [(new - old).square().sum(), new.square().sum(), *(t.square().sum() for t in rest[:squares])]
    values += [t.reshape(()) if isinstance(t, Tensor) else new.new_tensor(t) for t in rest[squares:]]
    row = torch.stack([v.to(sink.dtype) for v in values])
    if row.numel() < sink.numel():
        row = torch.cat([row, row.new_full((sink.numel() - row.numel(),), float("nan"))])
    sink.view(-1).copy_(row)
    return sink


@dataclass(frozen=True)
class MatrixUpdate:
    """An update elementwise but for one function of the whole matrix in its middle (Muon: the momentum, then
    Newton-Schulz of the whole matrix, then the decayed step): ``before(p, g, state, c)`` returns the matrix
    function's input, ``matrix(x, c)`` maps the whole tensor, ``after(p, u, state, c)`` applies the result. Called
    as an update it is all three on one tensor; split, the engine runs ``before`` and ``after`` on a sharded
    parameter's shards (its state stays sharded) and ``matrix`` on one owning rank
    (``EngineOptimizer._apply_matrix_update``)."""

    before: Callable[..., Tensor]
    matrix: Callable[[Tensor, dict[str, Any]], Tensor]
    after: Callable[..., None]

    def __call__(self, p: Tensor, g: Tensor, state: dict[str, Tensor], c: dict[str, Any]) -> None:
        self.after(p, self.matrix(self.before(p, g, state, c), c), state, c)


def apply_update(
    update: Callable[..., None],
    p: Any,
    g: Any,
    state: dict[str, Any],
    c: dict[str, Any],
    flags: dict[str, Any],
    maximize: bool,
    compute_dtype: torch.dtype,
    storage: Storage = PLAIN,
) -> None:
    """Run ``update`` on tensors or TensorLists with its math in ``compute_dtype`` (engine/layout.py
    ``compute_dtype_for``: the promotion of the parameter's dtype and the state dtype).

    The gradient, the parameter and every state tensor of another dtype are converted to ``compute_dtype``,
    the update runs on those copies, and the parameter and the state tensors are written back (``copy_``): each
    is rounded to its own dtype once per step. So ``state_dtype`` is a storage format: bfloat16 state of float32
    parameters is read as float32 and rounded to bfloat16 when stored, as a bfloat16 parameter with float32
    state is. 8-bit moments are decoded and encoded again, and bfloat16 weights rounded as ``storage`` says
    (engine/storage.py). The same code runs eagerly and inside the fused path's compiled kernel (dtypes are
    static there). ``state`` holds the tensors the update reads (not the scalar state such as ``step``).
    """
    if maximize:
        g = -g
    if g.dtype != compute_dtype:
        g = g.to(compute_dtype)
    quantized = {name: signed for name, signed in storage.quantized if state[name].dtype == torch.uint8}
    hidden = {storage_.absmax_name(name) for name in quantized} | {"compensation", STATISTICS}
    converted = [name for name, s in state.items() if name not in hidden and s.dtype != compute_dtype]
    work = {name: s for name, s in state.items() if name not in hidden}
    for name in converted:
        if name in quantized:
            decode = partial(storage_.dequantize, signed=quantized[name], dtype=compute_dtype)
            work[name] = _each(decode, state[name], state[storage_.absmax_name(name)])
        else:
            work[name] = state[name].to(compute_dtype)
    p_compute = p if p.dtype == compute_dtype else p.to(compute_dtype)
    if storage.weights == "compensated":
        p_compute = p_compute.add(state["compensation"].to(compute_dtype))
    sink = state.get(STATISTICS)
    before = _each(torch.clone, p_compute) if sink is not None else None
    measured = list(work)  # the state tensors, before the update adds what it reports
    update(p_compute, g, work, c, **flags)
    if sink is not None:
        moments = [work[name] for name in measured]
        reported = [work[k] for k in sorted(work) if k.startswith(STATISTIC_PREFIX)]
        row = partial(_statistics_row, squares=len(moments))
        _each(row, sink, p_compute, before, *moments, *reported)
    if storage.weights == "stochastic":
        salts = c["rounding_salt"]
        salts = list(salts.unbind(0)) if isinstance(p, TensorList) and isinstance(salts, Tensor) else salts
        p.copy_(_each(storage_.stochastic_round, p_compute, salts))
    elif storage.weights == "compensated":
        # the rounded weight is computed once and used twice: read back after the write, p would be the value
        # from before it inside the compiled kernel (inductor, torch 2.13, CPU)
        rounded = _each(storage_.nearest_bfloat16, p_compute)
        state["compensation"].copy_(p_compute.sub(rounded))
        p.copy_(rounded)
    elif p.dtype != compute_dtype:
        p.copy_(p_compute)
    for name in converted:
        if name not in quantized:
            state[name].copy_(work[name])
            continue
        absmax = state[storage_.absmax_name(name)]
        for code, scale, value in zip(_tensors(state[name]), _tensors(absmax), _tensors(work[name])):
            new_codes, new_scale = storage_.quantize(value, quantized[name])
            code.copy_(new_codes)
            scale.copy_(new_scale.view(scale.shape))


def pick(lists: tuple[list, ...], indices: list[int]) -> list[list]:
    """The entries at ``indices`` of each list."""
    return [[xs[i] for i in indices] for xs in lists]


def coefficient_rows(c: dict[str, Any], indices: list[int]) -> dict[str, Any]:
    """The coefficients of the parameters at ``indices`` of the bucket (per-parameter entries picked)."""
    return {k: v[indices] if isinstance(v, Tensor) and v.dim() == 1 else v for k, v in c.items()}


def coefficient_row(c: dict[str, Any], i: int) -> dict[str, Any]:
    """Parameter ``i``'s coefficients: tensor mode gives one entry per parameter of the bucket."""
    return {k: v[i] if isinstance(v, Tensor) and v.dim() == 1 else v for k, v in c.items()}
