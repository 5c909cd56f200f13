r"""Mixed precision: autocast and loss scaling (:class:`MixedPrecision`), and float32 master weights for
bfloat16/float16 parameters (:class:`MasterWeights`), with the memory each part costs (:meth:`MasterWeights.memory`).

The seeds' arithmetic for mixed-precision Adam: 2 bytes of half-precision weights, 2 of gradients, and 12 of
optimizer states (a float32 master copy of the weights, Adam's two float32 moments): 16 bytes per parameter.
A half-precision weight cannot hold a small update (bfloat16 keeps 8 significant bits, so an update below
1/512 of the weight rounds away); the float32 master copy accumulates it, and the model sees it rounded.
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
        clip_gradients(model.parameters(), max_norm=1.0)
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
    """Bytes of the model states: ``params`` and ``grads`` as the model holds them, the float32
    ``master_weights``, the inner ``optimizer_state``, and ``step_buffers``: the float32 gradient copies that
    exist only during ``step()``."""

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
    """

    _PARAM_KEYS = ("master_weight",)
    _NESTED_KEYS = ("master_weights",)

    def __init__(self, optimizer: Optimizer) -> None:
        super().__init__(optimizer)
        if any(optimizer.state.values()):
            raise ValueError("MasterWeights: wrap the optimizer before its first step (its state is not empty)")
        self._model_params: dict[Tensor, Tensor] = {}  # master -> model parameter
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
        return master

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        self.optimizer.add_param_group({**param_group, "params": [self._master_of(p) for p in params]})

    def __repr__(self) -> str:
        return f"MasterWeights({self.optimizer!r})"

    @torch.no_grad()
    def pull_gradients(self) -> None:
        """Copy the model's gradients into the masters' (float32), once per step: a second call (GradScaler's
        step after its unscale_) keeps the unscaled copies. ``step()`` calls it when it has not run."""
        if self._pulled:
            return
        for master, p in self._model_params.items():
            master.grad = None if p.grad is None else p.grad.to(torch.float32)
        self._pulled = True

    def release_gradients(self) -> None:
        """Free the float32 gradient copies; the next :meth:`pull_gradients` copies afresh."""
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
        return TrainingMemory(
            params=sum(p.nbytes for p in model_params),
            grads=sum(p.nbytes for p in model_params),  # a gradient has its parameter's dtype and size
            master_weights=sum(m.nbytes for m in self._model_params),
            optimizer_state=sum(t.nbytes for t in state),
            step_buffers=sum(m.nbytes for m in self._model_params),
            num_params=sum(p.numel() for p in model_params),
        )
