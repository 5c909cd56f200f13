"""Gradient accumulation: k micro-batches give the gradient of one batch k times larger.

Each micro-batch's mean loss is weighted by its share of the examples, n_i / N, so that the accumulated gradient
is the gradient of the mean loss over all N examples even when the last micro-batch is smaller. Under
DistributedDataParallel (or anything else with a ``no_sync()`` context) the gradient all-reduce runs only with
the last micro-batch's backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from stochopt.engine import checks

Batch = Any  # a tensor, or a tuple/list/dict of tensors whose first dimension is the example dimension


def batch_size(batch: Batch) -> int:
    """Examples in a batch: the first dimension of its first tensor."""
    if isinstance(batch, Tensor):
        if batch.ndim == 0:
            raise ValueError("a batch tensor must have an example dimension; got a 0-d tensor")
        return batch.shape[0]
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    for item in items:
        if isinstance(item, (Tensor, Mapping, tuple, list)):
            return batch_size(item)
    raise TypeError(f"cannot tell the number of examples of a batch of type {type(batch).__name__}; pass sizes=")


def split_batch(batch: Batch, micro_batch_size: int) -> Iterator[Batch]:
    """Chunks of ``micro_batch_size`` examples along the first dimension (the last may be smaller)."""
    micro_batch_size = checks.count("micro_batch_size", micro_batch_size, 1)
    total = batch_size(batch)
    for start in range(0, total, micro_batch_size):
        yield _slice(batch, start, start + micro_batch_size)


def _slice(batch: Batch, start: int, stop: int) -> Batch:
    if isinstance(batch, Tensor):
        return batch[start:stop]
    if isinstance(batch, Mapping):
        return type(batch)({k: _slice(v, start, stop) for k, v in batch.items()})
    if isinstance(batch, (tuple, list)):
        return type(batch)(_slice(v, start, stop) for v in batch)
    return batch  # non-tensor leaves (flags, names) are shared by every micro-batch


def accumulate_gradients(
    model: nn.Module,
    micro_batches: Iterable[Batch],
    loss_fn: Callable[[Batch], Tensor],
    *,
    sizes: Sequence[int] | None = None,
) -> Tensor:
    r"""Backpropagate :math:`\sum_i (n_i / N)\, \ell_i` one micro-batch at a time and return it (detached).

    ``loss_fn(micro_batch)`` returns the *mean* loss over the micro-batch's examples (the usual reduction);
    ``sizes`` gives :math:`n_i` when the first dimension of the batch's first tensor is not its example count.
    Gradients add to whatever ``.grad`` holds, as ``backward`` does: zero them before, step after::

        optimizer.zero_grad()
        loss = accumulate_gradients(model, split_batch((x, y), 64), lambda b: F.cross_entropy(model(b[0]), b[1]))
        optimizer.step()

    ``model`` is only used for its ``no_sync()`` (DDP, FSDP): the all-reduce then runs once, after the last
    micro-batch. Every micro-batch is held until the end, since :math:`N` must be known before the first
    backward; a DataLoader's batches are references, so this costs no copies.
    """
    batches = list(micro_batches)
    if not batches:
        raise ValueError("micro_batches is empty")
    counts = [batch_size(b) for b in batches] if sizes is None else list(sizes)
    if len(counts) != len(batches):
        raise ValueError(f"sizes has {len(counts)} entries for {len(batches)} micro-batches")
    for i, n in enumerate(counts):
        checks.count(f"sizes[{i}]", n, 1)
    total = sum(counts)
    no_sync = getattr(model, "no_sync", None)
    accumulated = None
    for i, (micro, n) in enumerate(zip(batches, counts)):
        last = i == len(batches) - 1
        with no_sync() if (no_sync is not None and not last) else contextlib.nullcontext():
            loss = loss_fn(micro)
            if not isinstance(loss, Tensor) or loss.ndim != 0:
                raise TypeError(f"loss_fn must return a 0-d tensor (the mean loss), got {_describe(loss)}")
            weighted = loss * (n / total)
            weighted.backward()
        term = weighted.detach()
        accumulated = term if accumulated is None else accumulated + term
    return accumulated


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__
