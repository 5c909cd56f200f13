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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
import torch.fx.experimental._config as fx_config
from torch import Tensor

from stochopt.engine import storage
from stochopt.engine.update import (
    PLAIN,
    STATISTICS,
    Storage,
    apply_update,
    centralize,
    coefficient_row,
    pick,
)

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
    return torch.compile(fresh, dynamic=True, fullgraph=not staged, options=options)


@contextmanager
def _launching() -> Iterator[None]:
    """Around the launches of the compiled kernels (entered once per bucket list, not per launch: a config patch
    per launch cost 26 us, 13 % of a 50-tensor step's host time): duck sizing off, since it would give two tensors
    of equal size one symbol and guard on it, so that one graph serves every bucket (read when a graph is traced,
    that is on the first calls); and ``_in_fused_kernel`` for ``stage_boundary``."""
    global _in_fused_kernel
    duck = fx_config.use_duck_shape
    fx_config.use_duck_shape, _in_fused_kernel = False, True
    try:
        yield
    finally:
        fx_config.use_duck_shape, _in_fused_kernel = duck, False


def run_compiled(
    update: Callable[..., None],
    flags: dict[str, Any],
    names: list[str],
    compute_dtype: torch.dtype,
    ps: list[Tensor],
    gs: list[Tensor],
    states: list[dict[str, Tensor]],
    c: dict[str, Any],
    centralized: bool,
    amp: tuple[Tensor, Tensor] | None,
    stored: Storage = PLAIN,
    *,
    maximize: bool,
    options: dict[str, Any] | None,
    staged: bool,
    flatten: bool,
) -> None:
    """The bucket as tensor code: ``BUCKET_WIDTH`` tensors per launch of the compiled kernel, or, traced by
    the user's torch.compile, the same code inline (dynamo fuses it with the user's step). ``centralized``:
    the gradients are to be centralized (in the kernel: one more read of g instead of an eager mean,
    subtraction and temporary)."""
    coef_names = tuple(c)
    device = ps[0].device
    amp_tensor = None
    if amp is not None:
        amp_tensor = torch.stack([amp[0].reciprocal(), amp[1]]).to(device, coefficient_dtype(compute_dtype))
    by_name = {n: [s[n] for s in states] for n in names}
    run_here = partial(update_bucket, update, flags, maximize, compute_dtype, storage=stored)
    if torch.compiler.is_compiling():
        run_here(ps, gs, by_name, [coefficient_row(c, i) for i in range(len(ps))], amp_tensor, centralized)
        return
    width = BUCKET_WIDTH if flatten and not staged else 1
    # numbers (number mode): every row is the same, and one tensor of ``width`` rows serves every launch (a
    # row picked and padded per launch cost 20 us each); tensors: one row per tensor, picked per launch
    numbers = not any(isinstance(c[k], Tensor) for k in coef_names)
    coefs = _coefficient_rows(c, coef_names, width if numbers else len(ps), device, coefficient_dtype(compute_dtype))
    kernel = fused_kernel(
        update, flags, coef_names, maximize, options, staged, centralized,
        compute_dtype=compute_dtype, amp=amp is not None, storage=stored,
    )  # fmt: skip
    # Flattened (elementwise math) or, centralized, by rows: the kernel needs the rows (the mean over all
    # dimensions but the first) and a row-by-row loop: in a flat loop the compiled kernel would find each
    # element's row mean by an integer division (measured: the step took 4x as long). detach: a view's _base
    # would add shape guards. One tensor per launch where shapes are kept (``_flatten = False``) or the
    # update is staged. Tensors of fewer than two elements (dynamo specializes sizes 0 and 1) and strided
    # ones (no flat view without a copy) run the same code uncompiled.
    launch, alone = [], []
    for i, p in enumerate(ps):
        tensors = [p, gs[i], *(by_name[n][i] for n in names)]
        fits = p.numel() >= 2 and (not flatten or all(t.is_contiguous() for t in tensors))
        (launch if fits else alone).append(i)
    # a padding tensor of a quantized bucket has two blocks (its scales two values: a size of 1 would be
    # specialized by dynamo, and compiled again)
    quantized = any(by_name[n][0].dtype == torch.uint8 for n, _ in stored.quantized if n in by_name)
    scales = {storage.absmax_name(n) for n, _ in stored.quantized}
    pad_numel = [2 if name in scales or not quantized else storage.MIN_NUMEL for name in ("p", "g", *names)]
    with _launching():
        for start in range(0, len(launch), width):
            chunk = launch[start : start + width]
            args = []
            for name, column in zip(("p", "g", *by_name), (ps, gs, *by_name.values())):
                if name == STATISTICS:  # a short vector, flat in every kernel, padded with its own length
                    views = [column[i].view(-1).detach() for i in chunk]
                    args.append(views + _scratch(views[0], width - len(chunk), len(args), views[0].numel()))
                    continue
                views = [_kernel_view(column[i], flatten, centralized) for i in chunk]
                args.append(views + _scratch(views[0], width - len(chunk), len(args), pad_numel[len(args)]))
            rows = coefs if numbers else coefs[chunk]
            if not numbers and len(chunk) < width:
                rows = torch.cat([rows, rows[:1].expand(width - len(chunk), -1)])
            kernel(args[0], args[1], dict(zip(names, args[2:])), rows, amp_tensor)
    if alone:  # with the coefficients as the eager paths take them (numbers, in number mode)
        sub = pick((ps, gs, *by_name.values()), alone)
        rows = [coefficient_row(c, i) for i in alone]
        run_here(sub[0], sub[1], dict(zip(names, sub[2:])), rows, amp_tensor, centralized)


def _coefficient_rows(
    c: dict[str, Any], names: tuple[str, ...], n: int, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """The coefficients as an ``(n, len(names))`` tensor: numbers (number mode) repeated on every row, tensors
    (tensor mode: one entry per parameter, or one for all) broadcast to their rows."""
    if not any(isinstance(c[k], Tensor) for k in names):
        return torch.tensor([[c[k] for k in names]] * n, dtype=dtype, device=device)
    columns = [torch.as_tensor(c[k], dtype=torch.float64).to(device).expand(n) for k in names]
    return torch.stack(columns, dim=1).to(dtype)


def _kernel_view(t: Tensor, flatten: bool, centralized: bool) -> Tensor:
    """What the compiled kernel sees of ``t``: flat, by rows (centralized), or in its shape; detached, because a
    view's ``_base`` would add shape guards."""
    if not flatten:
        return t.detach()
    return (t.view(-1) if not centralized else t.view(t.shape[0], -1)).detach()


_SCRATCH: dict[tuple[Any, ...], list[Tensor]] = {}


def _scratch(like: Tensor, count: int, column: int, numel: int = 2) -> list[Tensor]:
    """``count`` tensors of ``numel`` elements that pad a launch to the kernel's width: distinct per column and
    slot (the kernel must not see one tensor twice), written by the kernel and never read by anything else."""
    if count <= 0:
        return []
    shape = (numel,) if like.dim() == 1 else (2, numel // 2)
    key = (like.device, like.dtype, shape, column)
    pads = _SCRATCH.setdefault(key, [])
    while len(pads) < count:
        pads.append(torch.ones(shape, dtype=like.dtype, device=like.device))
    return pads[:count]
