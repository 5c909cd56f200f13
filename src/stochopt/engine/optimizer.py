"""The engine: one update function per algorithm, run as a per-tensor loop, as foreach, or as a fused kernel.

An optimizer subclass declares
- ``_layout(group)``: its state (``StateSpec`` tuple; ``STEP`` where it counts steps);
- ``_coefficients(group, step, states)``: every scalar the update needs at this step, as Python floats
  (bias corrections, step sizes); it reads state and changes nothing;
- ``_flags(group, step, matrix)``: the static switches of the update (``amsgrad``, ``nesterov``), hashable;
- ``_update(p, g, state, c, **flags)``: the elementwise math, written once against the Tensor API;
- optionally ``_validate(group)`` (checks only), ``_init_group(group)`` (group entries derived once, when the
  group is added), ``_advance(group, step, states)`` (scalar state that moves with the step, such as NAdam's
  running product), ``_sparse_update``, ``_native_fused`` and, for the fused path, ``_flatten``,
  ``_compile_options`` and ``_staged``.

The engine owns the books: param groups, lazy state, buckets of tensors that share device, dtype and step,
``maximize``, gradient centralization (the group option ``centralize_gradients``), precision (the math in
``promote_types(param dtype, state dtype)``, parameters and state of another dtype written back; see
``EngineOptimizer``), sparse gradients, the non-finite-gradient policy and the state_dict checks.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from stochopt.engine import checks
from stochopt.engine.fused import coefficient_dtype, fused_kernel
from stochopt.engine.layout import (
    STEP,
    StateSpec,
    applicable,
    compute_dtype_for,
    new_state_tensor,
    spec_dtype,
    state_dtype_for,
)
from stochopt.engine.tensorlist import TensorList
from stochopt.engine.update import apply_update, centralize

NONFINITE_POLICIES = (None, "skip", "raise")

#: Below this many elements a tensor's per-tensor dispatch (eager, or ~100 us for a compiled kernel) costs more
#: than its arithmetic: such tensors are updated together in one multi-tensor (foreach) call.
SMALL_TENSOR_NUMEL = 1 << 16

#: A multi-tensor call whose parameters or state are of another dtype than the compute dtype holds a
#: compute-dtype copy of each of its tensors at once (engine/update.py ``apply_update``): such calls are cut into
#: calls of at most this many elements per tensor list, so that the copies of bfloat16 state stay small beside
#: the state (on accelerators every tensor takes the foreach path). The update is per tensor: nothing changes.
ROUND_TRIP_NUMEL = 1 << 24

#: Keys every engine optimizer's param groups carry, with their defaults.
ENGINE_DEFAULTS: dict[str, Any] = {
    "maximize": False,
    "foreach": None,
    "fused": None,
    "nonfinite": None,
    "state_dtype": None,
    "centralize_gradients": False,
}


class NonFiniteGradientError(FloatingPointError, ValueError):
    """A gradient holds inf or NaN and the optimizer's ``nonfinite`` policy is ``"raise"``."""


class EngineOptimizer(Optimizer, metaclass=ABCMeta):
    """Base class of stochopt's optimizers (see the module docstring for what a subclass declares).

    Precision: ``state_dtype`` (a group option; None: float32 for bfloat16/float16 parameters, else the
    parameter's dtype) is the dtype the state is *stored* in. The update's math runs in
    ``promote_types(param dtype, state dtype)`` (``engine.layout.compute_dtype_for``): a parameter or a state
    tensor of another dtype is read into that dtype, updated there, and rounded to its own dtype once per step,
    when it is written back; the coefficients (lr, betas, ...) are taken at float32 or better in every path.
    So float32 parameters with ``state_dtype=torch.bfloat16`` compute in float32 and keep float32 parameters
    (half the state memory of float32 state, the state rounded once per step, as torchao's bfloat16 optimizer
    state is); bfloat16 parameters with the default float32 state compute in float32 and the parameter is
    rounded once per step; bfloat16 parameters with ``state_dtype=torch.bfloat16`` compute in bfloat16.
    Optimizers with their own step loops (Shampoo, Muon, AdaFisher) follow the same rule through
    ``_apply_update``.
    """

    _sparse_update: Callable[..., None] | None = None
    #: torch's own fused CPU kernel for the same algorithm, used by ``fused=True`` on the CPU where torch has
    #: one (Adam, AdamW, SGD, Adagrad) and the state dtype is the parameter's; elsewhere the compiled kernel runs.
    _native_fused: Callable[..., None] | None = None
    #: The fused kernel sees tensors flattened (elementwise math); False keeps their shapes (row/column
    #: statistics), at the price of one compiled graph per number of dimensions.
    _flatten: bool = True
    #: inductor options of the fused kernel; None: the elementwise defaults (see engine.fused)
    _compile_options: dict[str, Any] | None = None
    #: ``_update`` calls ``engine.stage_boundary()``: the fused path compiles one kernel per stage
    _staged: bool = False

    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        defaults = {**ENGINE_DEFAULTS, **defaults}
        self.skipped_steps = 0
        super().__init__(checks.checked_params(params), defaults)

    # ----- what subclasses declare -------------------------------------------------------------
    @abstractmethod
    def _layout(self, group: dict[str, Any]) -> tuple[StateSpec, ...]:
        """The state kept per parameter under this group's options."""

    @abstractmethod
    def _coefficients(self, group: dict[str, Any], step: int, states: list[dict[str, Tensor]]) -> dict[str, float]:
        """Every scalar the update needs at ``step``, as Python floats."""

    def _flags(self, group: dict[str, Any], step: int, matrix: bool) -> dict[str, Any]:
        """Static switches of the update for a bucket at ``step``; ``matrix``: its params have 2+ dimensions."""
        return {}

    @staticmethod
    @abstractmethod
    def _update(p: Any, g: Any, state: dict[str, Any], c: dict[str, Any]) -> None:
        """The elementwise math, on tensors or TensorLists (see the module docstring)."""

    def _validate(self, group: dict[str, Any]) -> None:
        """Raise ValueError/TypeError naming the hyperparameter and its value; changes nothing."""

    def _init_group(self, group: dict[str, Any]) -> None:
        """Set the group entries derived from others, once, when the group is added (after ``_validate``)."""

    def _advance(self, group: dict[str, Any], step: int, states: list[dict[str, Tensor]]) -> None:
        """Advance scalar state that moves with the step, once per bucket and step, before ``_coefficients``."""

    # ----- the torch.optim contract --------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        checks.check_group_params(param_group, self.param_groups)
        for key, value in self.defaults.items():
            param_group.setdefault(key, value)
        self._validate_engine_options(param_group)
        self._validate(param_group)
        self._init_group(param_group)
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("skipped_steps", 0)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["skipped_steps"] = self.skipped_steps
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict has {len(saved_groups)} param groups but this {type(self).__name__} has "
                f"{len(self.param_groups)}"
            )
        saved_by_param = {}
        for saved_group, group in zip(saved_groups, self.param_groups):
            merged = {**self.defaults, **saved_group}
            layout = self._layout(merged)
            for index, param in zip(saved_group["params"], group["params"]):
                saved = state_dict["state"].get(index)
                if saved:
                    checks.check_loaded_state(type(self).__name__, applicable(layout, param), index, param, saved)
                    saved_by_param[param] = (saved, layout, merged)
        super().load_state_dict(state_dict)
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        # torch.optim casts floating state to the param's dtype; restore the dtypes the layout asks for
        # (float32 moments of bfloat16 params) from the saved tensors, so that resume is bit-exact.
        for param, (saved, layout, merged) in saved_by_param.items():
            state = self.state[param]
            if STEP in layout and not isinstance(state.get("step"), Tensor):  # old torch kept steps as numbers
                state["step"] = torch.tensor(float(state.get("step", 1.0)))
            for spec in applicable(layout, param):
                if spec.name == "step":
                    continue
                dtype = spec_dtype(spec, param, merged["state_dtype"])
                device = param.device if spec.shape != "scalar" else torch.device("cpu")
                if state[spec.name].dtype != dtype or state[spec.name].device != device:
                    state[spec.name] = saved[spec.name].to(device=device, dtype=dtype, copy=True)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = [(group, *self._collect(group)) for group in self.param_groups]
        if self._nonfinite_found(work):
            return loss  # before any state is created: a skipped step leaves no trace but the count
        for group, params, grads in work:
            if params:
                self._step_group(group, params, grads, self._init_state(group, params))
        return loss

    def _apply_update(
        self,
        group: dict[str, Any],
        update: Callable[..., None],
        p: Tensor,
        g: Tensor,
        c: dict[str, Any],
        flags: dict[str, Any] | None = None,
    ) -> None:
        """One parameter's step, ``update(p, g, state, c, **flags)``, for optimizers with their own step loops
        (Shampoo, Muon, AdaFisher: matrix work, per tensor), with what the engine's paths do around an update:
        ``maximize``, gradient centralization of matrices, and the precision rule (the math in
        ``compute_dtype_for(p, state_dtype)``; ``p`` and the state tensors of another dtype read into it and
        written back, see engine/update.py ``apply_update``). ``state`` holds the layout's tensors but the
        scalar ones (``step``)."""
        compute_dtype = compute_dtype_for(p, group["state_dtype"])
        if group["centralize_gradients"] and p.dim() > 1:
            g = centralize(g.to(compute_dtype))
        state = self.state[p]
        tensors = {s.name: state[s.name] for s in applicable(self._layout(group), p) if s.shape != "scalar"}
        apply_update(update, p, g, tensors, c, flags or {}, group["maximize"], compute_dtype)

    # ----- internals -----------------------------------------------------------------------------
    def _validate_engine_options(self, group: dict[str, Any]) -> None:
        if group["fused"] and group["foreach"]:
            raise ValueError("fused=True and foreach=True are exclusive: choose one execution path")
        if group["nonfinite"] not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {group['nonfinite']!r}")
        checks.flag("centralize_gradients", group["centralize_gradients"])
        sd = group["state_dtype"]
        if sd is not None and (not isinstance(sd, torch.dtype) or not sd.is_floating_point):
            raise TypeError(f"state_dtype must be a floating torch.dtype or None, got {sd!r}")

    def _collect(self, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
        """The group's params that have gradients, and the gradients, checked."""
        params, grads = [], []
        for index, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if p.grad.is_sparse and self._sparse_update is None:
                raise ValueError(
                    f"{type(self).__name__} does not support sparse gradients (param {index} of its group, "
                    f"shape {tuple(p.shape)}); use stochopt.LazyAdam, or nn.Embedding(sparse=False)"
                )
            if torch.is_complex(p):
                raise TypeError(
                    f"{type(self).__name__} got a complex parameter (param {index}, dtype {p.dtype}); "
                    "optimize torch.view_as_real(param) instead"
                )
            params.append(p)
            grads.append(p.grad)
        return params, grads

    def _init_state(self, group: dict[str, Any], params: list[Tensor]) -> set[int]:
        """Create the layout's state where a param has none; returns the ids of those params."""
        fresh = set()
        for p in params:
            state = self.state[p]
            if not state:
                fresh.add(id(p))
                for spec in applicable(self._layout(group), p):
                    state[spec.name] = new_state_tensor(spec, p, group["state_dtype"])
        return fresh

    def _nonfinite_found(self, work: list[tuple[dict[str, Any], list[Tensor], list[Tensor]]]) -> bool:
        checked = [(group, params, grads) for group, params, grads in work if group["nonfinite"] and grads]
        if not checked:
            return False
        dense = [g.coalesce()._values() if g.is_sparse else g for _, _, grads in checked for g in grads]
        norms = torch._foreach_norm(dense, float("inf"))
        if bool(torch.stack([n.to("cpu", torch.float32) for n in norms]).isfinite().all()):
            return False
        first = next(i for i, n in enumerate(norms) if not torch.isfinite(n))
        if any(group["nonfinite"] == "raise" for group, _, _ in checked):
            raise NonFiniteGradientError(
                f"{type(self).__name__}: gradient {first} (counting params with gradients, in group order) "
                "holds inf or NaN; the step was not taken (nonfinite='raise')"
            )
        self.skipped_steps += 1
        return True

    def _step_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], fresh: set[int]) -> None:
        layout = self._layout(group)
        counted = STEP in layout
        buckets: dict[tuple[Any, ...], list[int]] = defaultdict(list)
        for i, p in enumerate(params):
            # A layout without STEP (torch's SGD keeps none) is told 1 on the update that created its state, else 2.
            step = int(self.state[p]["step"].item()) if counted else (0 if id(p) in fresh else 1)
            buckets[(p.device, p.dtype, step, grads[i].is_sparse, p.dim() > 1)].append(i)
        for (device, dtype, step, sparse, matrix), indices in buckets.items():
            names = [spec.name for spec in applicable(layout, params[indices[0]]) if spec.shape != "scalar"]
            ps = [params[i] for i in indices]
            gs = [grads[i] for i in indices]
            states = [self.state[p] for p in ps]
            if counted:
                torch._foreach_add_([s["step"] for s in states], 1.0)
            step += 1
            self._advance(group, step, states)
            c = self._coefficients(group, step, states)
            flags = self._flags(group, step, matrix)
            compute_dtype = compute_dtype_for(ps[0], group["state_dtype"])
            centralized = group["centralize_gradients"] and matrix and not sparse
            state_dtype = state_dtype_for(ps[0], group["state_dtype"])
            native = group["fused"] and self._native_fits(device, dtype, state_dtype, states)
            compiled = group["fused"] and not sparse and not native
            if centralized and not compiled:  # the compiled kernel centralizes g itself
                gs = [centralize(g.to(compute_dtype)) for g in gs]
            eager = partial(self._run_eager, group, flags, names, compute_dtype, c)
            if sparse:
                for p, g, s in zip(ps, gs, states):
                    g = -g if group["maximize"] else g
                    self._sparse_update(p, g, {n: s[n] for n in names}, c, **flags)
            elif native:
                self._native_fused(group, ps, gs, states, flags, step)
            elif compiled:
                self._run_fused(group, flags, names, compute_dtype, ps, gs, states, c, centralized)
            elif group["foreach"] or (group["foreach"] is None and device.type != "cpu"):
                eager(ps, gs, states, multi_tensor=True)
            elif group["foreach"] is None:
                # The CPU default: small tensors in one multi-tensor call (per-tensor dispatch would dominate),
                # large ones one by one (a multi-tensor call would hold every temporary at once, for no gain).
                small = [i for i, p in enumerate(ps) if p.numel() < SMALL_TENSOR_NUMEL]
                large = [i for i, p in enumerate(ps) if p.numel() >= SMALL_TENSOR_NUMEL]
                for subset, multi in ((small, True), (large, False)):
                    if subset:
                        eager(*_pick((ps, gs, states), subset), multi_tensor=multi)
            else:
                eager(ps, gs, states, multi_tensor=False)

    def _run_eager(
        self,
        group: dict[str, Any],
        flags: dict[str, Any],
        names: list[str],
        compute_dtype: torch.dtype,
        c: dict[str, float],
        ps: list[Tensor],
        gs: list[Tensor],
        states: list[dict[str, Tensor]],
        *,
        multi_tensor: bool,
    ) -> None:
        if multi_tensor:
            for chunk in _round_trip_chunks(ps, states, names, compute_dtype):
                cps, cgs, cstates = _pick((ps, gs, states), chunk)
                tl_state = {n: TensorList(s[n] for s in cstates) for n in names}
                apply_update(
                    self._update, TensorList(cps), TensorList(cgs), tl_state, c, flags, group["maximize"], compute_dtype
                )
            return
        for p, g, s in zip(ps, gs, states):
            apply_update(self._update, p, g, {n: s[n] for n in names}, c, flags, group["maximize"], compute_dtype)

    def _native_fits(self, device: torch.device, dtype: torch.dtype, state_dtype: torch.dtype, states: list) -> bool:
        # torch's fused kernels take float32 steps on the parameter's device and state of the parameter's dtype
        return (
            self._native_fused is not None
            and device.type == "cpu"
            and state_dtype == dtype
            and states[0].get("step", torch.empty((), dtype=torch.float32)).dtype == torch.float32
        )

    def _run_fused(
        self,
        group: dict[str, Any],
        flags: dict[str, Any],
        names: list[str],
        compute_dtype: torch.dtype,
        ps: list[Tensor],
        gs: list[Tensor],
        states: list[dict[str, Tensor]],
        c: dict[str, float],
        centralized: bool,
    ) -> None:
        """The compiled kernel per tensor; ``centralized``: the gradients are to be centralized (in the kernel:
        one more read of g instead of an eager mean, subtraction and temporary)."""
        coef_names = tuple(c)
        kernel = fused_kernel(
            type(self)._update, flags, coef_names, group["maximize"], self._compile_options, self._staged, centralized,
            compute_dtype=compute_dtype,
        )  # fmt: skip
        # at least float32: a bfloat16 tensor would round beta2 = 0.999 to 1.0 (the eager paths take floats)
        coefs = torch.tensor([c[k] for k in coef_names], dtype=coefficient_dtype(compute_dtype), device=ps[0].device)
        small = []
        for i, (p, g, s) in enumerate(zip(ps, gs, states)):
            tensors = [p, g, *(s[n] for n in names)]
            # Small tensors cost more in dispatch than the kernel saves, and strided ones cannot be flattened
            # without a copy: those take the foreach path, together.
            if p.numel() < SMALL_TENSOR_NUMEL or (self._flatten and not all(t.is_contiguous() for t in tensors)):
                small.append(i)
                continue
            # detach: a view's _base would add shape guards. Centralized, the kernel needs the rows (the mean over
            # all dimensions but the first), and a row-by-row loop: in a flat loop the compiled kernel would find
            # each element's row mean by an integer division (measured: the step took 4x as long).
            shape = (-1,) if not centralized else (p.shape[0], -1)
            flat = [t.view(shape).detach() if self._flatten else t.detach() for t in tensors]
            kernel(flat[0], flat[1], dict(zip(names, flat[2:])), coefs)
        if small:
            ps, gs, states = _pick((ps, gs, states), small)
            if centralized:
                gs = [centralize(g.to(compute_dtype)) for g in gs]
            self._run_eager(group, flags, names, compute_dtype, c, ps, gs, states, multi_tensor=True)


def _pick(lists: tuple[list, ...], indices: list[int]) -> list[list]:
    return [[xs[i] for i in indices] for xs in lists]


def _round_trip_chunks(
    ps: list[Tensor], states: list[dict[str, Tensor]], names: list[str], compute_dtype: torch.dtype
) -> list[list[int]]:
    """The indices of ``ps`` in one multi-tensor call, or, where the call converts tensors to the compute dtype,
    in calls of at most ``ROUND_TRIP_NUMEL`` elements (a larger tensor alone)."""
    converts = ps[0].dtype != compute_dtype or any(states[0][n].dtype != compute_dtype for n in names)
    if not converts:
        return [list(range(len(ps)))]
    chunks: list[list[int]] = [[]]
    size = 0
    for i, p in enumerate(ps):
        if chunks[-1] and size + p.numel() > ROUND_TRIP_NUMEL:
            chunks.append([])
            size = 0
        chunks[-1].append(i)
        size += p.numel()
    return chunks


def scalar(value: Any) -> float:
    """A hyperparameter as a Python float (torch.optim accepts 0-d tensors for lr and betas)."""
    return float(value.item()) if isinstance(value, Tensor) else float(value)
