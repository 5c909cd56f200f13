"""Sharded parameters (FSDP2: ``DTensor`` shards over a ``DeviceMesh``), as the engine steps them.

Three ways, chosen per parameter by the optimizer (``EngineOptimizer._whole_tensor``, ``MatrixUpdate``):

- **Elementwise** updates run on each rank's local shard, in every path (the compiled kernel included): the
  parameter, its gradient and its state (``DTensor``s of the parameter's placements, so that memory per rank
  falls with the world size and ``torch.distributed.checkpoint`` reshards them) are handed to the update as
  their local tensors. Nothing is communicated.
- **Whole-tensor** updates (a norm over the tensor, row and column statistics, a matrix function) run on one
  owning rank per parameter: the engine gathers the parameter and its gradient there (``gather``), the
  optimizer steps a plain full-size stand-in (its state, full size, lives on the owner only), and the engine
  scatters the new values back as shards (``scatter``). Owners are assigned once per parameter, in group order,
  to the rank with the fewest elements owned so far: deterministic (every rank computes the same), balanced by
  size, and stable (state never moves between ranks while the optimizer lives).

- **Split** updates (``MatrixUpdate``: Muon's momentum, Newton-Schulz, decayed step) run their elementwise parts
  on the shards, their state sharded; only the matrix function's input goes to the owner (``on_owner``) and
  its result comes back: ``n (w - 1) / w`` elements each way on the owner.

Bytes moved per whole-tensor parameter of ``n`` elements and step: the owner receives ``2 n (w - 1) / w``
(parameter and gradient) and sends ``n (w - 1) / w`` (the new parameter), against nothing for an elementwise one.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def _dtensor_class() -> type | None:
    """``DTensor`` once its module is imported (whoever makes a DTensor imports it), None before, when no tensor
    can be one: importing it here would add a second to every ``import stochopt``."""
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def is_sharded(t: Any) -> bool:
    """``t`` is a ``DTensor`` (a parameter of an FSDP2 module, or one the user distributed)."""
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def local(t: Tensor) -> Tensor:
    """The rank's own part of ``t`` (writing to it writes to ``t``); ``t`` itself when it is a plain tensor."""
    return t._local_tensor if is_sharded(t) else t


def local_state(state: dict[str, Any]) -> dict[str, Any]:
    """A view of a parameter's state with its ``DTensor`` entries as their local tensors (scalar state such as
    step counters is plain and shared)."""
    return {name: local(value) if isinstance(value, Tensor) else value for name, value in state.items()}


def rows_whole(t: Tensor) -> bool:
    """Each rank holds whole rows of ``t`` (sharded along dimension 0, or replicated): a per-row reduction such
    as gradient centralization's is local."""
    return all(p.is_replicate() or (p.is_shard() and p.dim == 0) for p in t.placements)


def check_gatherable(optimizer: str, index: int, p: Tensor) -> None:
    """The whole-tensor path gathers over a one-dimensional mesh, sharded along dimension 0 or replicated (what
    ``fully_shard`` gives); refuse anything else by name rather than gather it wrongly."""
    placement = p.placements[0] if len(p.placements) == 1 else None
    if p.device_mesh.ndim != 1 or not (placement.is_replicate() or (placement.is_shard() and placement.dim == 0)):
        raise ValueError(
            f"{optimizer} updates param {index} (shape {tuple(p.shape)}) as a whole tensor, which the engine gathers "
            f"over a one-dimensional mesh with Shard(0) or Replicate placement; got mesh shape "
            f"{tuple(p.device_mesh.shape)}, placements {tuple(p.placements)}"
        )


def assign_owner(owners: dict[int, int], loads: list[int], p: Tensor) -> int:
    """The rank that steps ``p`` as a whole: assigned on first sight to the least-loaded rank (lowest rank on a
    tie), then kept."""
    key = id(p)
    if key not in owners:
        rank = min(range(len(loads)), key=lambda r: (loads[r], r))
        owners[key] = rank
        loads[rank] += p.numel()
    return owners[key]


def _chunk_rows(rows: int, world: int) -> list[int]:
    """Rows per rank of a ``Shard(0)`` DTensor: ``torch.chunk``'s split, empty chunks at the end."""
    sizes = [len(c) for c in torch.arange(rows).chunk(world)]
    return sizes + [0] * (world - len(sizes))


def gather(t: Tensor, owner: int, moved: list[int], shard: Tensor | None = None) -> Tensor | None:
    """The full tensor of the ``DTensor`` ``t`` on rank ``owner`` (None elsewhere): one gather of equal-sized,
    padded shards. ``shard``: gather this rank's tensor laid out as ``t``'s local one instead of ``t``'s own.
    Adds this rank's bytes sent and received to ``moved``."""
    group = t.device_mesh.get_group()
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    shard = t._local_tensor if shard is None else shard
    if t.placements[0].is_replicate():
        return shard.clone() if rank == owner else None
    sizes = _chunk_rows(t.shape[0], world)
    width = max(sizes)
    padded = shard.new_zeros((width, *t.shape[1:]))
    padded[: shard.shape[0]].copy_(shard)
    received = [torch.empty_like(padded) for _ in range(world)] if rank == owner else None
    dist.gather(padded, received, dst=dist.get_global_rank(group, owner), group=group)
    _count(moved, padded.nbytes, world, rank == owner, to_owner=True)
    if received is None:
        return None
    return torch.cat([part[:size] for part, size in zip(received, sizes)])


def scatter(full: Tensor | None, t: Tensor, owner: int, moved: list[int], shard: Tensor | None = None) -> None:
    """Write the owner's ``full`` into every rank's shard of ``t`` (the inverse of ``gather``), or into ``shard``,
    a tensor laid out as ``t``'s local one; adds this rank's bytes sent and received to ``moved``."""
    group = t.device_mesh.get_group()
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    shard = t._local_tensor if shard is None else shard
    src = dist.get_global_rank(group, owner)
    if t.placements[0].is_replicate():
        buffer = full if rank == owner else torch.empty_like(shard)
        dist.broadcast(buffer, src=src, group=group)
        shard.copy_(buffer)
        _count(moved, buffer.nbytes, world, rank == owner, to_owner=False)
        return
    sizes = _chunk_rows(t.shape[0], world)
    width = max(sizes)
    out = shard.new_empty((width, *t.shape[1:]))
    parts = None
    if rank == owner:
        parts = []
        for piece in full.split(sizes):
            part = out.new_zeros(out.shape)
            part[: piece.shape[0]].copy_(piece)
            parts.append(part)
    dist.scatter(out, parts, src=src, group=group)
    shard.copy_(out[: shard.shape[0]])
    _count(moved, out.nbytes, world, rank == owner, to_owner=False)


def on_owner(fn: Callable[[Tensor], Tensor], shard: Tensor, t: Tensor, owner: int, moved: list[int]) -> Tensor:
    """``fn`` of the whole tensor whose local part on this rank is ``shard`` (laid out as the ``DTensor`` ``t``'s),
    computed on rank ``owner``: the shards are gathered there and the result scattered back in ``shard``'s dtype
    (exact where ``fn`` returns a narrower one, as Newton-Schulz in bfloat16 does). Returns this rank's part."""
    full = gather(t, owner, moved, shard)
    result = fn(full).to(shard.dtype) if full is not None else None
    out = torch.empty_like(shard)
    scatter(result, t, owner, moved, out)
    return out


def _count(moved: list[int], nbytes: int, world: int, is_owner: bool, to_owner: bool) -> None:
    """``moved`` = [sent, received] of this rank: the owner takes (or gives) a piece from (to) every other rank."""
    if is_owner:
        moved[0 if not to_owner else 1] += (world - 1) * nbytes
    else:
        moved[1 if not to_owner else 0] += nbytes


def any_found(found: bool, params: list[Tensor]) -> bool:
    """``found`` on any rank of the sharded ``params``' mesh (every rank must take the same decision about a
    step: a non-finite gradient may sit in one rank's shard only)."""
    mesh = next((p.device_mesh for p in params if is_sharded(p)), None)
    if mesh is None:
        return found
    flag = torch.tensor([float(found)], device=mesh.device_type)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


class ShardBooks:
    """An optimizer's books for its sharded parameters: the owner of each parameter stepped whole (or of each
    matrix function's input) and the elements owned per rank (``owner``), the bytes this rank has sent and
    received (``moved``), and during a step the owners' full-size stand-ins (``gather_stand_ins``, ``scatter``,
    ``release``). Created on the first sharded step: a step with nothing sharded touches nothing."""

    def __init__(self) -> None:
        self.owners: dict[int, int] = {}
        self.loads: list[int] | None = None
        self.moved = [0, 0]
        #: during a step: id(parameter) -> its full-size stand-in on the owner (None on the other ranks)
        self.stand_ins: dict[int, Tensor | None] = {}
        #: during a step: id(stand-in) -> the parameter it stands for
        self.stand_in_for: dict[int, Tensor] = {}

    def owner(self, optimizer: str, params: list[Tensor], p: Tensor) -> int:
        """The rank that does ``p``'s whole-tensor work (``assign_owner``); on first sight ``check_gatherable``
        (``params``: ``p``'s group, for the message), which a parameter's placement cannot change after."""
        if id(p) not in self.owners:
            check_gatherable(optimizer, next(i for i, q in enumerate(params) if q is p), p)
            if self.loads is None:
                self.loads = [0] * p.device_mesh.size()
        return assign_owner(self.owners, self.loads, p)

    def gather_stand_ins(self, state: dict, entries: list[tuple[str, list[Tensor], Tensor]]) -> None:
        """For each (optimizer name, group's params, sharded parameter): the owner gets a plain full-size stand-in
        holding the full gradient, whose state is the parameter's; the other ranks skip the parameter."""
        for optimizer, params, p in entries:
            owner = self.owner(optimizer, params, p)
            full, full_grad = gather(p.detach(), owner, self.moved), gather(p.grad, owner, self.moved)
            if full is not None:
                full.grad = full_grad
                state[full] = state[p]
                self.stand_in_for[id(full)] = p
            self.stand_ins[id(p)] = full

    def scatter(self, state: dict, params: list[Tensor], counted: list[Tensor], step_dtype: Callable) -> None:
        """The owners' new values back into every rank's shard of ``params``; and for ``counted`` (those with a
        step counter) the owner's counter to the other ranks, whose state of the parameter is that counter alone:
        every rank then saves the same ``step`` for it, and torch.distributed.checkpoint finds state for every
        parameter on every rank (it refuses a parameter with none), so that a checkpoint loads on any world size,
        whoever owns the parameter there. ``step_dtype(p)``: the counter's dtype."""
        for p in params:
            scatter(self.stand_ins[id(p)], p, self.owners[id(p)], self.moved)
        if not counted:
            return
        steps = [state[p].get("step") for p in counted]
        owned = [self.stand_ins[id(p)] is not None and step is not None for p, step in zip(counted, steps)]
        values = torch.tensor([float(s) if mine else 0.0 for s, mine in zip(steps, owned)], dtype=torch.float64)
        mesh = counted[0].device_mesh
        values = values.to(mesh.device_type)
        dist.all_reduce(values, group=mesh.get_group())
        for p, mine, value in zip(counted, owned, values.tolist()):
            if not mine:
                state[p]["step"] = torch.tensor(value, dtype=step_dtype(p))

    def release(self, state: dict) -> None:
        """The step is over: the stand-ins and their state entries go (the state itself stays the parameter's)."""
        for stand_in in self.stand_ins.values():
            if stand_in is not None:
                del state[stand_in]
        self.stand_ins, self.stand_in_for = {}, {}
