"""PowerSGD through torch's own hook, counted in the same statistics, and one way to choose any hook by name."""

# no `from __future__ import annotations`: DDP compares the hooks' annotations with the real types
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as torch_powersgd

from stochopt.distributed.sparse import (
    AllReduceState,
    RandomKState,
    SignState,
    TopKState,
    allreduce_hook,
    randomk_hook,
    sign_hook,
    topk_hook,
)
from stochopt.distributed.state import CompressionState, allreduce_bytes


class PowerSGDState(CompressionState):
    """Vogels, Karimireddy & Jaggi 2019, "PowerSGD: Practical Low-Rank Gradient Compression for Distributed
    Optimization", arXiv:1905.13727, as torch implements it (``torch_state``, a
    ``torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook.PowerSGDState``): each matrix gradient M (n x m)
    travels as P = M Q (n x rank) and Q = M^T P (m x rank), each all-reduced, with error feedback and warm
    start; vectors (biases) and matrices that would not shrink ``min_compression_rate`` times are all-reduced
    whole. The first ``start_iter`` steps are plain all-reduce (torch needs at least 2 with error feedback or warm
    start, past DDP's bucket rebuild)."""

    def __init__(
        self,
        process_group: dist.ProcessGroup | None = None,
        rank: int = 2,
        start_iter: int = 2,
        min_compression_rate: float = 2.0,
        error_feedback: bool = True,
        warm_start: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(process_group)
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive int, got {rank!r}")
        self.torch_state = torch_powersgd.PowerSGDState(
            process_group, matrix_approximation_rank=rank, start_powerSGD_iter=start_iter,
            min_compression_rate=min_compression_rate, use_error_feedback=error_feedback, warm_start=warm_start,
            random_seed=seed,
        )  # fmt: skip


def powersgd_hook(state: PowerSGDState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    inner = state.torch_state
    compressing = inner.iter >= inner.start_powerSGD_iter
    before = inner.total_numel_after_compression
    future = torch_powersgd.powerSGD_hook(inner, bucket)
    # torch counts, per bucket, the entries of the uncompressed tensors plus those of P and Q: three
    # all-reduces whose ring bytes add up to one all-reduce of all of them
    numel = inner.total_numel_after_compression - before if compressing else bucket.buffer().numel()
    state.count(bucket, allreduce_bytes(numel * bucket.buffer().element_size(), state.group.size()))
    return future


Hook = Callable[[Any, dist.GradBucket], torch.futures.Future]

COMPRESSIONS: dict[str, tuple[type[CompressionState], Hook]] = {
    "none": (AllReduceState, allreduce_hook),
    "topk": (TopKState, topk_hook),
    "randomk": (RandomKState, randomk_hook),
    "sign": (SignState, sign_hook),
    "powersgd": (PowerSGDState, powersgd_hook),
}


def compression_hook(name: str, process_group: dist.ProcessGroup | None = None, **options: Any) -> tuple[Any, Hook]:
    """``state, hook = compression_hook("topk", density=0.01)``: the state (with ``.stats``) and the hook of
    ``none`` (counted plain all-reduce), ``topk``, ``randomk``, ``sign`` or ``powersgd``."""
    if name not in COMPRESSIONS:
        raise ValueError(f"unknown compression {name!r}; known: {', '.join(COMPRESSIONS)}")
    cls, hook = COMPRESSIONS[name]
    try:
        return cls(process_group=process_group, **options), hook
    except TypeError as err:
        raise TypeError(f"compression {name!r}: {err}") from None


def register_compression(
    model: nn.parallel.DistributedDataParallel, name: str, process_group: dist.ProcessGroup | None = None, **options
) -> CompressionState:
    """Register the named compression hook on a DDP model and return its state (read ``state.stats``)."""
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError(f"model must be a DistributedDataParallel, got {type(model).__name__}")
    state, hook = compression_hook(name, process_group, **options)
    model.register_comm_hook(state, hook)
    return state
