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
``maximize``, gradient centralization (the group option ``centralize_gradients``), cautious updates (the group
option ``cautious``, for the optimizers that declare ``_cautious_supported``), sharded (FSDP2, DTensor)
parameters (engine/sharded.py: elementwise updates on local shards, whole-tensor ones, ``_whole_tensor_update``,
on one owning rank), precision (the math in
``promote_types(param dtype, state dtype)``, parameters and state of another dtype written back; see
``EngineOptimizer``), sparse gradients, the non-finite-gradient policy and the state_dict checks.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from collections import defaultdict
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from stochopt.engine import checks, fused, scalars, sharded, statistics, storage
from stochopt.engine.group_options import GroupOptions
from stochopt.engine.layout import (
    STEP,
    StateSpec,
    applicable,
    compute_dtype_for,
    convert_saved,
    new_state_tensor,
    quantized_moments,
    spec_dtype,
    state_dtype_for,
    stored_layout,
    with_statistics,
)
from stochopt.engine.sharded_steps import ShardedSteps
from stochopt.engine.tensorlist import TensorList
from stochopt.engine.update import (
    PLAIN,
    Storage,
    apply_update,
    centralize,
    coefficient_row,
    coefficient_rows,
    pick,
)

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
    "weight_rounding": None,
    "rounding_seed": 0,
    "centralize_gradients": False,
    "cautious": False,
    "capturable": False,
    "decouple_lr": False,
    "statistics": False,
}


class NonFiniteGradientError(FloatingPointError, ValueError):
    """A gradient holds inf or NaN and the optimizer's ``nonfinite`` policy is ``"raise"``."""


class EngineOptimizer(GroupOptions, ShardedSteps, Optimizer, metaclass=ABCMeta):
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
    #: False: the compiled kernel runs where torch has a native fused kernel for the algorithm (tests compare
    #: it against torch that way; ``stochopt speed`` times both). A class attribute, so ``stochopt.AdamW.
    #: use_native_fused = False`` switches one optimizer.
    use_native_fused: bool = True
    #: The step can run in tensor mode (engine/scalars.py: ``capturable=True``, or traced by torch.compile)
    #: without reading a value on the host; False for optimizers whose own step loop decides on the host.
    _capturable: bool = True
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
    #: ``_update`` takes the static flag ``cautious`` (Liang et al., 2024: the group option ``cautious``, set by the
    #: constructor's ``cautious=True``) and masks its update direction with ``optim.common.cautious_direction``
    _cautious_supported: bool = False
    #: the weight decay is decoupled (a factor ``optim.common.decay_factor`` on the weights) in every group;
    #: groups of the Adam family are so where ``decoupled_weight_decay`` says (``_decouples_decay``)
    _decoupled_decay: bool = False
    #: scalars ``_update`` reports per tensor for the statistics (``state["stat_<name>"] = value``: LAMB's trust
    #: ratio), coefficients reported per parameter (statistic name -> (coefficient, factor): Muon's adjusted lr),
    #: and group entries reported per group (Prodigy's ``d``); see ``statistics``
    _update_statistics: tuple[str, ...] = ()
    _coefficient_statistics: dict[str, tuple[str, float]] = {}
    _group_statistics: tuple[str, ...] = ()
    #: ``_update`` reduces over the whole tensor (a norm, row/column statistics) or the optimizer's own step loop
    #: does matrix work: sharded (DTensor) parameters are gathered to an owning rank and stepped whole there
    #: (engine/sharded.py); False: elementwise, stepped on each rank's local shard
    _whole_tensor_update: bool = False
    #: every write of a parameter goes through ``apply_update`` (or ``_apply_update``), so ``weight_rounding``
    #: reaches it; False for optimizers that also move parameters themselves (Schedule-Free's train/eval)
    _rounding_supported: bool = True

    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        defaults = {**ENGINE_DEFAULTS, **defaults}
        self.skipped_steps = 0
        super().__init__(checks.checked_params(params), defaults)

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """True when every group runs a kernel (fused or capturable): GradScaler then hands its scale and
        found_inf to ``step`` (as ``self.grad_scale`` / ``self.found_inf``) instead of unscaling the gradients
        and reading found_inf itself, as it does for torch's fused optimizers (see ``step``). The eager paths
        keep GradScaler's own flow, in which ``scaler.unscale_`` before gradient clipping works."""
        return all(group["fused"] or group["capturable"] for group in self.param_groups)

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

    def _finish_step(self) -> None:
        """Work after every group's update and before sharded whole tensors go back to their ranks (Prodigy: a
        process that stepped nothing still joins the estimate's reduction)."""

    # ----- the torch.optim contract --------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        checks.check_group_params(param_group, self.param_groups)
        for key, value in self.defaults.items():
            param_group.setdefault(key, value)
        self._validate_engine_options(param_group)
        self._validate(param_group)
        self._validate_storage(param_group)
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
        state_dict = {**state_dict, "state": dict(state_dict["state"])}  # the caller's dict stays as it was
        own = [_storage_options(group) for group in self.param_groups]
        for saved_group, group, options in zip(saved_groups, self.param_groups, own):
            merged = {**self.defaults, **saved_group, **options}
            layout = self._stored_layout(merged)
            for index, param in zip(saved_group["params"], group["params"]):
                saved = state_dict["state"].get(index)
                if saved:  # saved under other storage options (8-bit or float moments, compensation)
                    saved = state_dict["state"][index] = convert_saved(applicable(layout, param), param, saved)
                if saved and set(saved) == {"step"} and self._owned_elsewhere(merged, param):
                    continue  # a sharded whole tensor that another rank steps: its step counter alone
                if saved:
                    checks.check_loaded_state(type(self).__name__, applicable(layout, param), index, param, saved)
                    saved_by_param[param] = (saved, layout, merged)
        super().load_state_dict(state_dict)
        for group, options in zip(self.param_groups, own):
            group.update(options)
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
                on_device = spec.shape != "scalar" or self._on_device(merged, param)
                device = param.device if on_device else torch.device("cpu")
                if state[spec.name].dtype != dtype or state[spec.name].device != device:
                    state[spec.name] = saved[spec.name].to(device=device, dtype=dtype, copy=True)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss.

        Under ``torch.amp.GradScaler`` (which sets ``self.grad_scale`` and ``self.found_inf``), the gradients
        are still scaled: the compiled and native fused kernels unscale them and skip the step on the device
        where found_inf is set; the other paths read found_inf once (a host synchronization, as GradScaler's
        own path has) and unscale the gradients in place."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        amp = _amp_scaling(getattr(self, "grad_scale", None), getattr(self, "found_inf", None))
        self._gather_whole_tensors()
        for group in self.param_groups:
            if group["statistics"]:
                statistics.clear(self, group)
        try:
            work = [(group, *self._collect(group)) for group in self.param_groups]
            if self._nonfinite_found(work):
                return loss  # before any state is created: a skipped step leaves no trace but the count
            if amp is not None and not self._capturable:  # own step loops (matrix work): the eager paths' rule
                if not _host_unscale([g for _, _, grads in work for g in grads], amp):
                    return loss
                amp = None
            for group, params, grads in work:
                if params:
                    self._step_group(group, params, grads, self._init_state(group, params), amp)
            self._finish_step()
            self._scatter_whole_tensors()
        finally:
            self._release_stand_ins()
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
        scalar ones (``step``). A sharded ``p`` is stepped on its local shard (``_apply_matrix_update``)."""
        compute_dtype = compute_dtype_for(p, group["state_dtype"])
        param, state = self._parameter_of(p), self.state[p]
        if sharded.is_sharded(p):
            p, g, state = sharded.local(p), sharded.local(g), sharded.local_state(state)
        if group["centralize_gradients"] and p.dim() > 1:  # a sharded p's rows are whole here (_whole_tensor)
            g = centralize(g.to(compute_dtype))
        layout = self._stored_layout(group)
        tensors = {s.name: state[s.name] for s in applicable(layout, p) if s.shape != "scalar"}
        storage_ = self._storage(group, layout, p)
        if storage_.weights == "stochastic":
            index = next(i for i, q in enumerate(group["params"]) if q is param)
            step = float(state["step"]) if "step" in state else 1.0
            c = {**c, "rounding_salt": storage.rounding_salt(group["rounding_seed"], index, step)}
        if group["statistics"]:
            statistics.record_coefficients(self, p, c)
        apply_update(update, p, g, tensors, c, flags or {}, group["maximize"], compute_dtype, storage_)

    def _stored_layout(self, group: dict[str, Any]) -> tuple[StateSpec, ...]:
        """The tensors kept per parameter: the layout under the group's storage options (8-bit moments,
        compensation buffers; engine/layout.py ``stored_layout``)."""
        layout = stored_layout(self._layout(group), group)
        return with_statistics(layout, self._update_statistics) if group["statistics"] else layout

    def _storage(self, group: dict[str, Any], layout: tuple[StateSpec, ...], p: Tensor) -> Storage:
        quantized = quantized_moments(applicable(layout, p))
        weights = group["weight_rounding"] if group["weight_rounding"] != "nearest" else None
        return Storage(quantized, weights) if quantized or weights else PLAIN

    def _rounding_salts(self, group: dict[str, Any], ps: list[Tensor], step: Any) -> Tensor:
        """Stochastic rounding: one salt per parameter of the bucket, from the seed, the parameter's index in
        its group and its step (engine/storage.py ``rounding_salt``); float64, where ``step`` is (tensor mode)."""
        position = {id(q): i for i, q in enumerate(group["params"])}
        index = torch.tensor([float(position[id(self._parameter_of(p))]) for p in ps], dtype=torch.float64)
        if isinstance(step, Tensor):
            index = index.to(step.device)
        return storage.rounding_salt(int(group["rounding_seed"]), index, step)

    # ----- internals -----------------------------------------------------------------------------
    def track_statistics(self, enabled: bool = True) -> None:
        """Collect per-step statistics from now on (``enabled=False``: stop; off costs nothing): read them as
        :attr:`statistics` after ``step()`` (engine/statistics.py)."""
        statistics.track(self, enabled)

    @property
    def statistics(self) -> dict[str, Any]:
        """The last step's statistics: ``{"params": {name: {"update_norm", "weight_norm", "update_to_weight",
        "<state>_norm", ...}}, "groups": [{"lr", "update_norm", ...}]}``, for the groups that track them."""
        return statistics.read(self)

    def _collect(self, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
        """The group's params that have gradients, and the gradients, checked."""
        params, grads = [], []
        stand_ins = self._stand_ins()
        names = group.get("param_names") or []
        for index, p in enumerate(group["params"]):
            if id(p) in stand_ins:  # sharded, stepped whole on its owner (None: on another rank)
                p = stand_ins[id(p)]
                if p is None:
                    continue
            if p.grad is None:
                continue
            if p.grad.is_sparse and self._sparse_update is None:
                raise ValueError(
                    f"{type(self).__name__} does not support sparse gradients ({_label(names, index)}, shape "
                    f"{tuple(p.shape)}); use stochopt.LazyAdam, or nn.Embedding(sparse=False)"
                )
            if torch.is_complex(p):
                raise TypeError(
                    f"{type(self).__name__} got a complex parameter ({_label(names, index)}, dtype {p.dtype}); "
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
                if group["state_dtype"] == storage.INT8 and sharded.is_sharded(p):
                    raise ValueError(
                        f"{type(self).__name__}: state_dtype='int8' keeps block scales of the whole tensor, and "
                        f"this parameter (shape {tuple(p.shape)}) is sharded (DTensor); use state_dtype=torch."
                        "bfloat16 for sharded parameters"
                    )
                fresh.add(id(p))
                for spec in applicable(self._stored_layout(group), p):
                    state[spec.name] = new_state_tensor(spec, p, group["state_dtype"], self._on_device(group, p))
        return fresh

    def _on_device(self, group: dict[str, Any], p: Tensor) -> bool:
        """Scalar state (step counters) lives on the parameter's device, not the CPU: capturable, and fused off
        the CPU (as torch.optim keeps them), so that the step reads nothing on the host (tensor mode)."""
        return bool(group["capturable"]) or (bool(group["fused"]) and p.device.type != "cpu")

    def _tensor_mode(self, group: dict[str, Any], p: Tensor) -> bool:
        return self._on_device(group, p) or torch.compiler.is_compiling()

    def _names(self, group: dict[str, Any]) -> dict[int, str]:
        """The names of the group's parameters by ``id`` (those of their whole-matrix stand-ins included), where
        the optimizer was given named parameters; else empty."""
        stand_ins = self._stand_ins()
        names = {}
        for p, name in zip(group["params"], group.get("param_names") or []):
            names[id(p)] = name
            if stand_ins.get(id(p)) is not None:
                names[id(stand_ins[id(p)])] = name
        return names

    def _nonfinite_found(self, work: list[tuple[dict[str, Any], list[Tensor], list[Tensor]]]) -> bool:
        checked = [(group, params, grads) for group, params, grads in work if group["nonfinite"] and grads]
        # sharded parameters: every rank joins the decision (one that holds no gradient to check included),
        # because a non-finite value may sit in one rank's shard only and all must skip or raise alike
        policed = [p for group, _, _ in work if group["nonfinite"] for p in group["params"]]
        if not checked and not any(sharded.is_sharded(p) for p in policed):
            return False
        dense = [g.coalesce()._values() if g.is_sparse else g for _, _, grads in checked for g in grads]
        norms = torch._foreach_norm([sharded.local(g) for g in dense], float("inf")) if dense else []
        found = bool(norms) and not bool(torch.stack([n.to("cpu", torch.float32) for n in norms]).isfinite().all())
        if not sharded.any_found(found, policed):
            return False
        if any(group["nonfinite"] == "raise" for group, _, _ in work):
            bad = next((i for i, n in enumerate(norms) if not torch.isfinite(n)), None)
            names = [self._names(group).get(id(p)) for group, params, _ in checked for p in params]
            if bad is None:
                where = "a gradient on another rank"
            elif names[bad] is not None:
                where = f"the gradient of {names[bad]!r}"
            else:  # built from bare tensors: their place is all there is to name
                where = f"gradient {bad} (counting params with gradients, in group order)"
            raise NonFiniteGradientError(
                f"{type(self).__name__}: {where} holds inf or NaN; the step was not taken (nonfinite='raise')"
            )
        self.skipped_steps += 1
        return True

    def _step_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        fresh: set[int],
        amp: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        layout = self._stored_layout(group)
        counted = STEP in layout
        tensor_mode = self._tensor_mode(group, params[0])
        int8 = group["state_dtype"] == storage.INT8
        buckets: dict[tuple[Any, ...], list[int]] = defaultdict(list)
        for i, p in enumerate(params):
            # Number mode: the step counters are CPU tensors (no device synchronization to read one); a layout
            # without STEP (torch's SGD keeps none) is told 1 on the update that created its state, else 2.
            # Tensor mode reads nothing: the counters stay on the device, one coefficient row per parameter.
            step = None if tensor_mode else int(self.state[p]["step"].item()) if counted else int(id(p) not in fresh)
            quantized = int8 and storage.quantized_param(p)  # 8-bit codes, or (small) float moments
            buckets[(p.device, p.dtype, step, grads[i].is_sparse, p.dim() > 1, quantized)].append(i)
        for (device, dtype, step, sparse, matrix, _), indices in buckets.items():
            names = [spec.name for spec in applicable(layout, params[indices[0]]) if spec.shape != "scalar"]
            ps = [params[i] for i in indices]
            gs = [grads[i] for i in indices]
            states = [self.state[p] for p in ps]
            originals = ps
            if any(sharded.is_sharded(p) for p in ps):  # elementwise: each rank steps its own shard
                ps, gs = [sharded.local(p) for p in ps], [sharded.local(g) for g in gs]
                states = [sharded.local_state(s) for s in states]
            compute_dtype = compute_dtype_for(ps[0], group["state_dtype"])
            state_dtype = state_dtype_for(ps[0], group["state_dtype"])
            stored = self._storage(group, layout, ps[0])
            if sparse and group["statistics"]:
                raise ValueError(f"{type(self).__name__}: statistics=True does not cover sparse gradients' updates")
            if sparse and stored != PLAIN:
                raise ValueError(
                    f"{type(self).__name__}: sparse gradients update rows of the state in place, which "
                    f"state_dtype={group['state_dtype']!r} / weight_rounding={group['weight_rounding']!r} cannot "
                    "store (8-bit blocks and rounded weights are written whole); use dense gradients"
                )
            # torch's kernels count steps themselves; without a counter (SGD) they are told the first step
            # torch's kernels know neither the cautious mask nor a decay without the lr
            plain_math = not group["cautious"] and not group["decouple_lr"] and not group["statistics"]
            native = group["fused"] and (counted or not tensor_mode) and plain_math and stored == PLAIN
            native = native and self._native_fits(device, dtype, state_dtype, states, tensor_mode)
            compiled = not sparse and not native and (bool(group["fused"]) or tensor_mode)
            if amp is not None and not (native or compiled) and not _host_unscale(gs, amp):
                continue  # found_inf: the step is skipped (GradScaler lowers the scale)
            if counted:
                torch._foreach_add_([s["step"] for s in states], 1.0)
            if tensor_mode:
                step = _step_vector(states, originals, fresh, counted)
            else:
                step += 1
            in_kernel_amp = amp if native or compiled else None
            advanced = [spec.name for spec in layout if spec.shape == "scalar" and spec.name != "step"]
            before = [{n: s[n].clone() for n in advanced} for s in states] if in_kernel_amp and advanced else []
            with scalars.tensor_mode() if tensor_mode else nullcontext():
                self._advance(group, step, states)
                c = self._coefficients(group, step, states)
                if stored.weights == "stochastic":
                    c["rounding_salt"] = self._rounding_salts(group, originals, step)
            if group["statistics"]:
                for i, p in enumerate(originals):
                    statistics.record_coefficients(self, p, coefficient_row(c, i))
            flags = self._flags(group, step, matrix)
            if self._cautious_supported:
                flags = {**flags, "cautious": bool(group["cautious"])}
            centralized = group["centralize_gradients"] and matrix and not sparse
            if centralized and not compiled:  # the compiled kernel centralizes g itself
                gs = [centralize(g.to(compute_dtype)) for g in gs]
            eager = partial(self._run_eager, group, flags, names, compute_dtype, c, stored)
            if sparse:
                for i, (p, g, s) in enumerate(zip(ps, gs, states)):
                    g = -g if group["maximize"] else g
                    self._sparse_update(p, g, {n: s[n] for n in names}, coefficient_row(c, i), **flags)
            elif native:
                with scalars.tensor_mode() if tensor_mode else nullcontext():  # a tensor lr stays a tensor
                    self._native_fused(group, ps, gs, states, flags, step, *(in_kernel_amp or (None, None)))
            elif compiled:
                fused.run_compiled(
                    type(self)._update, flags, names, compute_dtype, ps, gs, states, c, centralized, in_kernel_amp,
                    stored, maximize=group["maximize"], options=self._compile_options, staged=self._staged,
                    flatten=self._flatten,
                )  # fmt: skip
            elif group["foreach"] or (group["foreach"] is None and device.type != "cpu"):
                eager(ps, gs, states, multi_tensor=True)
            elif group["foreach"] is None:
                # The CPU default: small tensors in one multi-tensor call (per-tensor dispatch would dominate),
                # large ones one by one (a multi-tensor call would hold every temporary at once, for no gain).
                small = [i for i, p in enumerate(ps) if p.numel() < SMALL_TENSOR_NUMEL]
                large = [i for i, p in enumerate(ps) if p.numel() >= SMALL_TENSOR_NUMEL]
                for subset, multi in ((small, True), (large, False)):
                    if subset:
                        eager(*pick((ps, gs, states), subset), multi_tensor=multi)
            else:
                eager(ps, gs, states, multi_tensor=False)
            if in_kernel_amp is not None:  # a step skipped for found_inf is not counted, nor its scalar state moved
                found = in_kernel_amp[1]
                if counted:
                    torch._foreach_sub_([s["step"] for s in states], found.to(states[0]["step"].device))
                for s, old in zip(states, before):
                    for n, value in old.items():
                        s[n].copy_(torch.where(found.to(value.device) > 0, value, s[n]))

    def _run_eager(
        self,
        group: dict[str, Any],
        flags: dict[str, Any],
        names: list[str],
        compute_dtype: torch.dtype,
        c: dict[str, float],
        stored: Storage,
        ps: list[Tensor],
        gs: list[Tensor],
        states: list[dict[str, Tensor]],
        *,
        multi_tensor: bool,
    ) -> None:
        def run(p: Any, g: Any, state: dict[str, Any], coefficients: dict[str, Any]) -> None:
            apply_update(self._update, p, g, state, coefficients, flags, group["maximize"], compute_dtype, stored)

        if multi_tensor:
            for chunk in _round_trip_chunks(ps, states, names, compute_dtype):
                cps, cgs, cstates = pick((ps, gs, states), chunk)
                tl_state = {n: TensorList(s[n] for s in cstates) for n in names}
                run(TensorList(cps), TensorList(cgs), tl_state, coefficient_rows(c, chunk))
            return
        for i, (p, g, s) in enumerate(zip(ps, gs, states)):
            run(p, g, {n: s[n] for n in names}, coefficient_row(c, i))

    def _native_fits(
        self, device: torch.device, dtype: torch.dtype, state_dtype: torch.dtype, states: list, tensor_mode: bool
    ) -> bool:
        # torch's fused kernels (CPU and CUDA) take float32 steps on the parameter's device and state of the
        # parameter's dtype; traced by the user's torch.compile, the update is traced like any other code
        return (
            self._native_fused is not None
            and self.use_native_fused
            and device.type in ("cpu", "cuda")
            and state_dtype == dtype
            and not torch.compiler.is_compiling()
            and states[0].get("step", torch.empty((), dtype=torch.float32)).dtype == torch.float32
        )


def _storage_options(group: dict[str, Any]) -> dict[str, Any]:
    """The storage options of a group: they stay this optimizer's when it loads a state_dict saved under
    others (the saved state is converted, engine/layout.py ``convert_saved``)."""
    return {k: group[k] for k in ("state_dtype", "weight_rounding", "rounding_seed")}


def _label(names: list[str], index: int) -> str:
    """A parameter in an error message: its name where the optimizer has names, else its place."""
    return repr(names[index]) if index < len(names) else f"param {index} of its group"


def _amp_scaling(grad_scale: Tensor | None, found_inf: Tensor | None) -> tuple[Tensor, Tensor] | None:
    """GradScaler's ``(scale, found_inf)`` for this step, or None. GradScaler sets no grad_scale when the user
    has already unscaled the gradients (``scaler.unscale_(opt)``): the scale is then 1."""
    if found_inf is None:
        return None
    return (grad_scale if grad_scale is not None else torch.ones_like(found_inf)), found_inf


def _host_unscale(gs: list[Tensor], amp: tuple[Tensor, Tensor]) -> bool:
    """The eager paths' mixed precision: False where found_inf is set (one host read), else the gradients are
    unscaled in place, as ``GradScaler.unscale_`` does, and True."""
    scale, found_inf = amp
    if bool(found_inf.item()):
        return False
    torch._foreach_mul_(gs, scale.reciprocal().to(gs[0].device))
    return True


def _step_vector(states: list[dict[str, Tensor]], ps: list[Tensor], fresh: set[int], counted: bool) -> Tensor:
    """Tensor mode: the bucket's step numbers as a float64 tensor on the parameters' device (engine/scalars.py);
    without a STEP counter in the layout, 1 on the update that created the state, else 2."""
    device = ps[0].device
    if counted:
        return torch.stack([s["step"] for s in states]).to(device, torch.float64)
    return torch.tensor([1.0 if id(p) in fresh else 2.0 for p in ps], dtype=torch.float64, device=device)


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
