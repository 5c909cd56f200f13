"""The fused path: an update function compiled by torch.compile, one launch per bucket of tensors.

A kernel is compiled per (update function, static flags, coefficient names, maximize, compute dtype, ...) and
takes a fixed number of tensors, ``BUCKET_WIDTH``: the engine cuts a bucket (tensors of one device, dtype and
step) into groups of that many, padding the last with two-element scratch tensors, so that one compiled graph
serves every bucket whatever its length. Tensors arrive flattened with dynamic sizes (duck sizing off, so that
two tensors of equal size in one call do not become one symbol), so a new shape never recompiles; the
coefficients (lr, betas, bias corrections) arrive as one ``(BUCKET_WIDTH, n_coefficients)`` tensor, one row per
tensor, so neither a scheduler changing lr nor tensors at different steps recompile. That tensor is at least
float32 (``coefficient_dtype``) whatever the compute dtype: in bfloat16, beta2 = 0.999 would be 1.0 and lr =
1e-3 0.0010004, where the eager paths take a Python float at float32 (opmath). Dynamo guards on dtype and
device, so the compile cost is paid once per optimizer, dtype and device (C++/OpenMP on the CPU, Triton on CUDA).

Why a fixed width rather than one graph over the whole list: a graph over N tensors is specialized to N and
compiles N loops (measured on this 2-core CPU: 83 s for 50 tensors). Why 4: NAdam's first fused step on the
30M-parameter model-like set (50 tensors), each on an empty inductor cache, took 14.6 / 19.0 / 25.6 s at
widths 1 / 4 / 8 and its step 32.0 / 24.5 / 24.6 ms: one launch per tensor costs ~30 microseconds of
dispatch (dynamo's guards and inductor's wrapper) and its own OpenMP region, and a width beyond 4 only adds
compile time. (A trivial kernel's first call on an empty cache takes 15 s here: inductor's C++ prelude.)

An update function may mark ``stage_boundary()`` points: the fused path then compiles one kernel per stage and
the tensors that cross a boundary are written to memory once. Why: inductor inlines cheap pointwise producers
into every loop that consumes them, so a small tensor broadcast over a large one (Adafactor's row and column
factors, each a square root and a division) is recomputed for every element of the large one. Staged updates,
and updates that keep the tensors' shapes (``_flatten = False``), take one tensor per call.

Mixed precision (``amp``: a tensor ``[1 / grad_scale, found_inf]``, from torch's GradScaler): the kernel
unscales the gradient and, where ``found_inf`` is set, writes back the values it read, so that the step is
skipped without the host reading ``found_inf``.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
import torch.fx.experimental._config as fx_config
from torch import Tensor

from stochopt.engine.update import PLAIN, Storage, apply_update, centralize

_KERNELS: dict[tuple[Any, ...], Callable[..., None]] = {}

#: Tensors per launch of a flattened kernel (see the module docstring).
DEFAULT_BUCKET_WIDTH = 4
BUCKET_WIDTH = DEFAULT_BUCKET_WIDTH  # a module attribute: tests (and users measuring) may set another


#: inductor options for elementwise kernels. dynamic_threads: otherwise the C++ kernel's OpenMP decision is fixed
#: by the size of the first tensor it sees, and a kernel first compiled for a small tensor runs single-threaded on
#: every matrix after it (measured: 12.6 against 8.3 ms on 8M elements).
ELEMENTWISE_OPTIONS: dict[str, Any] = {"cpp.dynamic_threads": True}


#: True while the fused path's own kernels run (and are traced): only there does a stage boundary break the graph
_in_fused_kernel = False


def stage_boundary() -> None:
    """End one compiled kernel of the fused path and start the next here (see the module docstring).

    A no-op in the eager paths and in a step traced by the user's torch.compile (no graph break inside the
    update there). Only optimizers that declare ``_staged = True`` may call it: the others are compiled with
    ``fullgraph=True``, which turns any break of the graph into an error.
    """
    if _in_fused_kernel:
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
    amp: bool = False,
    storage: Storage = PLAIN,
) -> Callable[[list[Tensor], list[Tensor], dict[str, list[Tensor]], Tensor, Tensor | None], None]:
    """The compiled kernel ``kernel(ps, gs, states, coefs, amp)`` for ``update`` with these static options:
    ``states`` maps each state name to a list beside ``ps``; ``coefs`` has one row per tensor, of
    ``coefficient_dtype(compute_dtype)``; ``amp`` is ``[1 / grad_scale, found_inf]`` or None (then ``amp=False``).
    ``staged``: ``update`` calls ``stage_boundary()`` (one kernel per stage); ``centralized``: the kernel first
    centralizes g (gradient centralization), every tensor arriving with its rows, as ``(rows, -1)`` or in its own
    shape. ``compute_dtype``: the dtype the math runs in, ``storage``: how state and weights are stored
    (engine/update.py ``apply_update``)."""
    options = ELEMENTWISE_OPTIONS if options is None else options
    key = (update, tuple(sorted(flags.items())), coef_names, maximize, tuple(sorted(options.items())))
    key += (staged, centralized, compute_dtype, amp, storage)
    kernel = _KERNELS.get(key)
    if kernel is None:
        kernel = _compile(
            update, dict(flags), coef_names, maximize, options, staged, centralized, compute_dtype, storage
        )
        _KERNELS[key] = kernel
    return kernel


def update_bucket(
    update: Callable[..., None],
    flags: dict[str, Any],
    maximize: bool,
    compute_dtype: torch.dtype,
    ps: list[Tensor],
    gs: list[Tensor],
    states: dict[str, list[Tensor]],
    coefficients: list[dict[str, Any]],
    amp: Tensor | None,
    centralized: bool = False,
    storage: Storage = PLAIN,
) -> None:
    """The update of tensors ``ps`` (``coefficients[i]`` for ``ps[i]``), written once for every path that runs
    whole buckets as tensor code: the compiled kernel's body, a step traced by the user's ``torch.compile``, and
    the tensors the kernel does not take (run uncompiled)."""
    for i, (p, g) in enumerate(zip(ps, gs)):
        state = {name: tensors[i] for name, tensors in states.items()}
        c = coefficients[i]
        if centralized:
            g = centralize(g.to(compute_dtype))
        if amp is None:
            apply_update(update, p, g, state, c, flags, maximize, compute_dtype, storage)
            continue
        # unscale, update, and where found_inf is set write back what was read: in one kernel this costs no
        # traffic (the old values are in registers), and the host never reads found_inf
        written = [p, *state.values()]
        before = [t.clone() for t in written]
        apply_update(update, p, g * amp[0].to(g.dtype), state, c, flags, maximize, compute_dtype, storage)
        for t, old in zip(written, before):
            t.copy_(torch.where(amp[1] > 0, old, t))


def _compile(
    update: Callable[..., None],
    flags: dict[str, Any],
    coef_names: tuple[str, ...],
    maximize: bool,
    options: dict[str, Any],
    staged: bool,
    centralized: bool,
    compute_dtype: torch.dtype,
    storage: Storage,
) -> Callable[..., None]:
    def kernel(
        ps: list[Tensor], gs: list[Tensor], states: dict[str, list[Tensor]], coefs: Tensor, amp: Tensor | None
    ) -> None:
        rows = [dict(zip(coef_names, row.unbind(0))) for row in coefs.unbind(0)]
        update_bucket(update, flags, maximize, compute_dtype, ps, gs, states, rows, amp, centralized, storage)

    # Dynamo keeps its compiled graphs (and its recompile limit) per code object. A fresh code object per
    # kernel keeps the variants of many optimizers from sharing one cache and hitting that limit.
    name = f"fused_{getattr(update, '__qualname__', 'update').replace('.', '_')}"
    code = kernel.__code__.replace(co_name=name)
    fresh = types.FunctionType(code, kernel.__globals__, name, kernel.__defaults__, kernel.__closure__)
    compiled = torch.compile(fresh, dynamic=True, fullgraph=not staged, options=options)

    def launch(*args: Any) -> None:
        # duck sizing would give two tensors of equal size one symbol, and guard on it: off, so that one graph
        # serves every bucket (the flag is read when a graph is traced, that is on the first calls)
        global _in_fused_kernel
        _in_fused_kernel = True
        try:
            with fx_config.patch(use_duck_shape=False):
                compiled(*args)
        finally:
            _in_fused_kernel = False

    return launch
