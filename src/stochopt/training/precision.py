r"""Mixed precision: autocast and loss scaling (:class:`MixedPrecision`), and float32 master weights for
bfloat16/float16 parameters (:class:`MasterWeights`), with the memory each part costs (:meth:`MasterWeights.memory`).

The seeds' arithmetic for mixed-precision Adam: 2 bytes of half-precision weights, 2 of gradients, and 12 of
optimizer states (a float32 master copy of the weights, Adam's two float32 moments): 16 bytes per parameter.
A half-precision weight cannot hold a small update (bfloat16 keeps 8 significant bits, so an update below
1/512 of the weight rounds away); the float32 master copy accumulates it, and the model sees it rounded. The same
holds for gradients summed over micro-batches in a bfloat16 ``.grad``: ``accumulate_in_float32=True`` sums them
in the masters' float32 gradients instead (Megatron-LM's ``main_grad``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from stochopt.engine import sharded
from stochopt.optim.wrapper import OptimizerWrapper, indexed_tensors

LOW_PRECISION = (torch.bfloat16, torch.float16)


class MixedPrecision:
    """Autocast in bfloat16 on the CPU and float16 on CUDA (or ``dtype``), with a GradScaler exactly when the
    dtype is float16, whose narrow exponent range needs loss scaling::

        mp = MixedPrecision("cuda")
        with mp.autocast():
            loss = loss_fn(model(x), y)
        mp.backward(loss)
        mp.unscale_(optimizer)            # only when clipping: the gradients are scaled until then
        clip_gradients(model.parameters(), max_norm=1.0)  # opt.master_parameters() under accumulate_in_float32
        mp.step(optimizer)                # skips the step when the scaled gradients overflowed

    ``enabled=False`` turns it into plain float32 training with the same calls.
    """

    def __init__(self, device_type: str = "cpu", dtype: torch.dtype | None = None, enabled: bool = True) -> None:
        if device_type not in ("cpu", "cuda", "xpu", "mps"):
            raise ValueError(f"device_type must be 'cpu', 'cuda', 'xpu' or 'mps'; got {device_type!r}")
        dtype = dtype if dtype is not None else (torch.bfloat16 if device_type == "cpu" else torch.float16)
        if dtype not in LOW_PRECISION:
            raise ValueError(f"dtype must be torch.bfloat16 or torch.float16, got {dtype}")
        self.device_type, self.dtype, self.enabled = device_type, dtype, bool(enabled)
        self.scaler = torch.amp.GradScaler(device_type, enabled=self.enabled and dtype == torch.float16)

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)

    def backward(self, loss: Tensor) -> None:
        self.scaler.scale(loss).backward()

    def unscale_(self, optimizer: Optimizer) -> None:
        _pull_master_gradients(optimizer)
        self.scaler.unscale_(optimizer)

    def step(self, optimizer: Optimizer, closure: Callable[[], Any] | None = None) -> Any:
        _pull_master_gradients(optimizer)
        result = self.scaler.step(optimizer) if closure is None else self.scaler.step(optimizer, closure)
        self.scaler.update()
        if isinstance(optimizer, MasterWeights):
            optimizer.release_gradients()  # also after a step the scaler skipped for overflow
        return result

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scaler.load_state_dict(state_dict)


def _pull_master_gradients(optimizer: Optimizer) -> None:
    # GradScaler unscales and checks the gradients of the optimizer's own params: the masters, under MasterWeights
    if isinstance(optimizer, MasterWeights):
        optimizer.pull_gradients()


@dataclass(frozen=True)
class TrainingMemory:
    """Bytes of the model states: ``params`` as the model holds them, ``grads`` as they live between backward
    and step (the model's dtype; under ``accumulate_in_float32`` the masters' float32 gradients, 4 bytes per
    parameter, and the model's half-precision gradient of one parameter at a time, not counted), the float32
    ``master_weights``, the inner ``optimizer_state``, and ``step_buffers``: the float32 gradient copies that
    exist only during ``step()`` (none under ``accumulate_in_float32``: the float32 gradients are ``grads``)."""

    params: int
    grads: int
    master_weights: int
    optimizer_state: int
    step_buffers: int
    num_params: int

    @property
    def total(self) -> int:
        """The model states outside a step (the seeds' "16 bytes per parameter" for Adam)."""
        return self.params + self.grads + self.master_weights + self.optimizer_state

    @property
    def peak(self) -> int:
        """The model states during a step: ``total`` and the step's buffers."""
        return self.total + self.step_buffers

    @property
    def bytes_per_param(self) -> float:
        return self.total / self.num_params


class MasterWeights(OptimizerWrapper):
    """Float32 master weights for the bfloat16/float16 parameters of any optimizer.

    Build the optimizer on the model's half-precision parameters, then wrap it before its first step::

        model = model.to(torch.bfloat16)
        opt = MasterWeights(torch.optim.AdamW(model.parameters(), lr=1e-3))

    The wrapper swaps each half-precision parameter in the optimizer's groups for a float32 copy (the master),
    so the optimizer's state is float32 too. ``step()`` copies the model's gradients into float32 (freed again
    after the step), steps the masters, and writes them back rounded into the model's parameters. Float32
    parameters pass through untouched. ``param_groups`` are the inner optimizer's, so schedulers work; the
    state_dict holds each master in its parameter's state (``master_weight``). With a closure, it is evaluated
    once, before the step (optimizers that re-evaluate it, such as L-BFGS, are not supported).

    ``accumulate_in_float32=True`` (default False, the behaviour above) sums the gradients of several backward
    passes (micro-batches of gradient accumulation) in float32: a hook on each half-precision parameter
    (``register_post_accumulate_grad_hook``) adds the parameter's gradient into its master's float32 ``.grad``
    as soon as a backward has produced it, and frees it (``p.grad = None``). A bfloat16 ``.grad`` would instead
    round every partial sum to 8 significant bits. The float32 gradient then lives from the first backward to
    the step (``memory().grads``), in place of the bfloat16 gradient and of the step's float32 copy. The
    model's half-precision parameters hold no gradient after backward: clip (or inspect) the optimizer's own
    parameters, ``opt.master_parameters()``, after ``opt.pull_gradients()`` (or ``mp.unscale_(opt)``), not
    ``model.parameters()``, whose norm would read 0. :meth:`remove_hooks` takes the hooks off.
    """

    _PARAM_KEYS = ("master_weight",)
    _NESTED_KEYS = ("master_weights",)

    def __init__(self, optimizer: Optimizer, accumulate_in_float32: bool = False) -> None:
        super().__init__(optimizer)
        if any(optimizer.state.values()):
            raise ValueError("MasterWeights: wrap the optimizer before its first step (its state is not empty)")
        if not isinstance(accumulate_in_float32, bool):
            raise TypeError(f"MasterWeights: accumulate_in_float32 must be a bool, got {accumulate_in_float32!r}")
        self.accumulate_in_float32 = accumulate_in_float32
        self._model_params: dict[Tensor, Tensor] = {}  # master -> model parameter
        self._masters: dict[Tensor, Tensor] = {}  # model parameter -> master (the hooks' lookup)
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._pulled = False
        for group in self.param_groups:
            group["params"] = [self._master_of(p) for p in group["params"]]
        if not self._model_params:
            raise ValueError(
                "MasterWeights: the optimizer has no bfloat16 or float16 parameters; master weights would only "
                "copy float32 weights (convert the model first: model.to(torch.bfloat16))"
            )

    def _master_of(self, p: Tensor) -> Tensor:
        if p.dtype not in LOW_PRECISION:
            return p
        if sharded.is_sharded(p):
            # masters that are not the module's parameters would be invisible to torch.distributed.checkpoint,
            # which maps optimizer state to parameter names; FSDP2 has this built in
            raise ValueError(
                f"MasterWeights: a {p.dtype} parameter of shape {tuple(p.shape)} is sharded (DTensor, FSDP2); keep "
                "the sharded parameters in float32 and let FSDP2 compute in bfloat16 instead: fully_shard(module, "
                "mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)); the "
                "float32 shards are then the master weights, checkpointed with the optimizer"
            )
        master = p.detach().to(torch.float32, copy=True).requires_grad_(p.requires_grad)
        self._model_params[master] = p
        self._masters[p] = master
        if self.accumulate_in_float32 and p.requires_grad:
            self._hooks.append(p.register_post_accumulate_grad_hook(self._accumulate))
        return master

    @torch.no_grad()
    def _accumulate(self, p: Tensor) -> None:
        # runs once per backward for p, after autograd has summed all of that backward's contributions into
        # p.grad (a parameter used twice included); p.grad holds only this backward's gradient, because the
        # previous one's was moved out here, so no sum is ever rounded to half precision
        master = self._masters[p]
        if master.grad is None:
            master.grad = p.grad.to(torch.float32)
        else:
            master.grad.add_(p.grad)  # float32 += half: computed and stored in float32
        p.grad = None

    def remove_hooks(self) -> None:
        """Take off the hooks of ``accumulate_in_float32``: the gradients are summed in the model's ``.grad`` again
        (and copied to float32 at the step); a float32 sum already made is kept for the next step."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def master_parameters(self) -> list[Tensor]:
        """The tensors the inner optimizer steps, in param-group order: the float32 master of each half-precision
        parameter and the model's own float32 parameters. Clip these (after :meth:`pull_gradients`)."""
        return self._params()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        self.optimizer.add_param_group({**param_group, "params": [self._master_of(p) for p in params]})

    def __repr__(self) -> str:
        return f"MasterWeights({self.optimizer!r})"

    @torch.no_grad()
    def pull_gradients(self) -> None:
        """Copy the model's gradients into the masters' (float32), once per step: a second call (GradScaler's
        step after its ``unscale_``) keeps the unscaled copies. ``step()`` calls it when it has not run. Under
        ``accumulate_in_float32`` the masters already hold the float32 sums; a gradient the hooks did not see
        (set by hand, or summed after :meth:`remove_hooks`) is added to them."""
        if self._pulled:
            return
        for master, p in self._model_params.items():
            if not self.accumulate_in_float32:
                master.grad = None if p.grad is None else p.grad.to(torch.float32)
            elif p.grad is not None:
                self._accumulate(p)
        self._pulled = True

    def release_gradients(self) -> None:
        """Free the float32 gradients (copies, or the sums of ``accumulate_in_float32``); the next
        :meth:`pull_gradients` copies afresh."""
        for master in self._model_params:
            master.grad = None
        self._pulled = False

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.pull_gradients()
        self.optimizer.step()
        with torch.no_grad():
            for master, p in self._model_params.items():
                p.copy_(master)
        self.release_gradients()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.release_gradients()
        self.optimizer.zero_grad(set_to_none)
        for p in self._model_params.values():
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

    def _param_state(self) -> dict[int, dict[str, Tensor]]:
        return {i: {"master_weight": p} for i, p in enumerate(self._params()) if p in self._model_params}

    def _from_nested(self, state_dict: dict[str, Any]) -> tuple[dict[int, dict[str, Tensor]], dict[str, Any]]:
        masters = state_dict["master_weights"]
        return ({i: {"master_weight": t} for i, t in masters.items()} if isinstance(masters, dict) else masters), {}

    def _load_own_state(self, tensors: dict[int, dict[str, Tensor]], scalars: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(tensors, dict):
            raise ValueError(f"state_dict: the master weights must be a dict by parameter index, got {tensors!r}")
        saved = indexed_tensors({i: e["master_weight"] for i, e in tensors.items()}, self._params(), "master weight")
        for master in saved:
            if master not in self._model_params:
                raise ValueError("state_dict: a master weight belongs to a parameter that is float32 here")
        with torch.no_grad():
            for master, value in saved.items():
                master.copy_(value)
                self._model_params[master].copy_(value)
        return {}

    def memory(self) -> TrainingMemory:
        """The bytes each part of the model states takes now (optimizer state appears after the first step)."""
        model_params = [self._model_params.get(p, p) for p in self._params()]
        state = [t for s in self.optimizer.state.values() for t in s.values() if isinstance(t, Tensor)]
        masters = sum(m.nbytes for m in self._model_params)
        # a gradient has its parameter's dtype and size; under accumulate_in_float32 a half-precision parameter's
        # gradient is its master's (float32) from the first backward to the step, and the step copies nothing
        grads = [
            m if m in self._model_params and self.accumulate_in_float32 else p
            for m, p in zip(self._params(), model_params)
        ]
        return TrainingMemory(
            params=sum(p.nbytes for p in model_params),
            grads=sum(g.nbytes for g in grads),
            master_weights=masters,
            optimizer_state=sum(t.nbytes for t in state),
            step_buffers=0 if self.accumulate_in_float32 else masters,
            num_params=sum(p.numel() for p in model_params),
        )
