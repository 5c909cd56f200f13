"""Optimizer-state sharding (ZeRO stage 1, Rajbhandari et al. 2020, arXiv:1910.02054) with any stochopt optimizer,
through torch's ``ZeroRedundancyOptimizer``, and checkpoints that consolidate, save, load and resume it; for FSDP2
(``fully_shard``) models the same two functions write and read sharded checkpoints with
``torch.distributed.checkpoint``.

Each rank keeps the optimizer state of its share of the parameters only and broadcasts its updated parameters
after the step. A checkpoint gathers the shards to rank 0 (``consolidate_state_dict``), which writes one file
holding the full state; loading gives every rank the full state, of which ZeRO keeps its own shard, so a run
may resume on the same number of ranks, or unsharded."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from stochopt.registry import optimizer_entry

if TYPE_CHECKING:
    from torch.distributed.optim import ZeroRedundancyOptimizer


def _zero_class() -> type:
    # imported on use: torch.distributed.optim pulls in FSDP and TorchScript, 2 s of every rank's start-up
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return ZeroRedundancyOptimizer


def zero_optimizer(params: Any, optimizer: str | type[Optimizer], **hyperparameters: Any) -> ZeroRedundancyOptimizer:
    """``zero_optimizer(model.parameters(), "adamw", lr=1e-3)``: a registered stochopt optimizer (by name) or
    any optimizer class, its state sharded over the default process group."""
    cls = optimizer_entry(optimizer).cls if isinstance(optimizer, str) else optimizer
    if not (isinstance(cls, type) and issubclass(cls, Optimizer)):
        raise TypeError(f"optimizer must be a registered name or a torch.optim.Optimizer class, got {optimizer!r}")
    return _zero_class()(params, optimizer_class=cls, **hyperparameters)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _module(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def is_fully_sharded(model: nn.Module) -> bool:
    """The model's parameters are DTensor shards (FSDP2's ``fully_shard``)."""
    from stochopt.engine.sharded import is_sharded

    return any(is_sharded(p) for p in model.parameters())


def save_checkpoint(
    path: str | Path, model: nn.Module, optimizer: Optimizer, step: int, extra: dict[str, Any] | None = None
) -> None:
    """Write model, optimizer (consolidated when sharded) and step to ``path`` from rank 0.

    Collective when the optimizer is a ``ZeroRedundancyOptimizer`` or a process group exists: every rank calls
    it. The file is written to a temporary name and renamed, so an interrupted save leaves the last checkpoint
    whole; the closing barrier keeps any rank from reading it before it exists.

    An FSDP2 model (``fully_shard``; DTensor parameters) is saved with ``torch.distributed.checkpoint`` instead:
    ``path`` becomes a directory in which every rank writes its shards of the model and of the optimizer state
    (``get_state_dict``), so that :func:`load_checkpoint` loads it on any number of processes, one included."""
    path = Path(path)
    if is_fully_sharded(model):
        _save_sharded(path, model, optimizer, step, extra or {})
        return
    if "torch.distributed.optim" in sys.modules and isinstance(optimizer, _zero_class()):
        optimizer.consolidate_state_dict(to=0)
    if _rank() == 0:
        payload = {"model": _module(model).state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                   "extra": extra or {}}  # fmt: skip
        tmp = path.with_name(path.name + ".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, path)
    _barrier()


#: the step and the caller's extra entries of a sharded checkpoint, beside torch.distributed.checkpoint's files
_META = "stochopt_meta.pt"


def _save_sharded(path: Path, model: nn.Module, optimizer: Optimizer, step: int, extra: dict[str, Any]) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    tmp = path.with_name(path.name + ".tmp")
    if _rank() == 0 and tmp.exists():
        shutil.rmtree(tmp)
    _barrier()
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp)
    _barrier()
    if _rank() == 0:  # the last checkpoint stays whole until the new one is complete
        torch.save({"step": step, "extra": extra}, tmp / _META)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        os.replace(tmp, path)
    _barrier()


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: Optimizer) -> tuple[int, dict[str, Any]]:
    """Restore what :func:`save_checkpoint` wrote (on every rank) and return ``(step, extra)``; a sharded
    optimizer keeps its shard of the full state. A directory is a ``torch.distributed.checkpoint`` checkpoint
    of an FSDP2 model, loaded into ``model`` whether it is sharded (on any number of processes) or not."""
    path = Path(path)
    if path.is_dir():
        return _load_sharded(path, model, optimizer)
    if not path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    _module(model).load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    return payload["step"], payload["extra"]


def _load_sharded(path: Path, model: nn.Module, optimizer: Optimizer) -> tuple[int, dict[str, Any]]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(_module(model), optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(_module(model), optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    meta = torch.load(path / _META, weights_only=True)
    return meta["step"], meta["extra"]
