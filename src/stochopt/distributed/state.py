"""What every compression hook shares: the byte statistics, the per-bucket memory (residuals, momenta) that
survives DDP's bucket rebuild, the bit packing of the wire formats, and the base state of a hook."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist


def allreduce_bytes(nbytes: int, world_size: int) -> int:
    """Bytes one rank sends (and receives) in a ring all-reduce of ``nbytes``: ``2 (W - 1) / W * nbytes``, the
    count of nccl-tests' bus bandwidth (a reduce-scatter then an all-gather, each moving (W - 1)/W of the data)."""
    return -(-2 * (world_size - 1) * nbytes // world_size)


def allgather_bytes(nbytes_per_rank: int, world_size: int) -> int:
    """Bytes one rank sends (and receives) in a ring all-gather of ``nbytes_per_rank`` from every rank:
    ``(W - 1) * nbytes_per_rank``, which grows with W (the reason sparse all-gathers stop scaling)."""
    return (world_size - 1) * nbytes_per_rank


@dataclass
class CommStats:
    """Bytes one rank moved for gradients, per step and in total, beside what a plain dense all-reduce of the
    same buckets would have moved (``dense_*``). Bytes are counted as ring collectives move them
    (:func:`allreduce_bytes`, :func:`allgather_bytes`); for those sent equals received."""

    steps: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    dense_bytes: int = 0
    last_bytes_sent: int = 0
    last_bytes_received: int = 0
    last_dense_bytes: int = 0
    _open: list[int] = field(default_factory=lambda: [0, 0, 0], repr=False)

    def add(self, sent: int, received: int, dense: int) -> None:
        """Count one bucket's collectives."""
        self._open[0] += sent
        self._open[1] += received
        self._open[2] += dense

    def end_step(self) -> None:
        """Close the step: the last bucket of the backward pass has been sent."""
        self.last_bytes_sent, self.last_bytes_received, self.last_dense_bytes = self._open
        self.bytes_sent += self.last_bytes_sent
        self.bytes_received += self.last_bytes_received
        self.dense_bytes += self.last_dense_bytes
        self.steps += 1
        self._open = [0, 0, 0]

    @property
    def compression(self) -> float:
        """Dense bytes over bytes sent, over all steps (inf before anything was sent)."""
        return self.dense_bytes / self.bytes_sent if self.bytes_sent else float("inf")


class BucketMemory:
    """One flat tensor per bucket index, laid out like the bucket's buffer (a residual, a momentum).

    DDP rebuilds its buckets after the first iteration (in the order gradients became ready), so the same
    bucket index can then hold other parameters in another order. When a bucket arrives with parameters that
    differ from the stored layout, every stored tensor is cut per parameter and reassembled in the new layout:
    nothing a parameter accumulated is lost or given to another."""

    def __init__(self) -> None:
        self._flat: dict[int, tuple[tuple[torch.Tensor, ...], torch.Tensor]] = {}
        self._loose: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(param) -> (param, piece)

    def get(self, bucket: dist.GradBucket) -> torch.Tensor:
        params = tuple(bucket.parameters())
        stored = self._flat.get(bucket.index())
        if stored is not None and _same(stored[0], params):
            return stored[1]
        if stored is not None:
            self._cut_all()
        buffer = bucket.buffer()
        flat = torch.zeros_like(buffer)
        for p, piece in zip(params, flat.split([p.numel() for p in params])):
            loose = self._loose.pop(id(p), None)
            if loose is not None:
                piece.copy_(loose[1])
        self._flat[bucket.index()] = (params, flat)
        return flat

    def of(self, param: torch.Tensor) -> torch.Tensor:
        """The stored values of one parameter, shaped like it (zeros if none)."""
        for params, flat in self._flat.values():
            for p, piece in zip(params, flat.split([p.numel() for p in params])):
                if p is param:
                    return piece.view_as(p)
        loose = self._loose.get(id(param))
        return loose[1].view_as(param) if loose is not None else torch.zeros_like(param)

    def _cut_all(self) -> None:
        for params, flat in self._flat.values():
            for p, piece in zip(params, flat.split([p.numel() for p in params])):
                self._loose[id(p)] = (p, piece.clone())
        self._flat.clear()


def _same(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """A 1-D bool tensor as uint8, 8 entries per byte (most significant bit first, zero-padded)."""
    padded = torch.zeros(-(-bits.numel() // 8) * 8, dtype=torch.uint8, device=bits.device)
    padded[: bits.numel()] = bits
    return (padded.view(-1, 8) * _BIT_WEIGHTS.to(bits.device)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` bits of :func:`pack_bits`'s output, as bool."""
    return (packed.unsqueeze(1) & _BIT_WEIGHTS.to(packed.device)).ne(0).view(-1)[:n]


def index_bits(numel: int) -> int:
    """Bits an index into a bucket of ``numel`` entries needs: ceil(log2(numel)), at least 1."""
    return max(1, (numel - 1).bit_length())


def pack_indices(indices: torch.Tensor, numel: int) -> torch.Tensor:
    """Indices below ``numel`` packed at :func:`index_bits` bits each (17 bits for a 100k-entry bucket rather
    than 64), so the bytes counted are the bytes on the wire."""
    shifts = torch.arange(index_bits(numel), device=indices.device)
    return pack_bits(((indices.unsqueeze(1) >> shifts) & 1).bool().view(-1))


def unpack_indices(packed: torch.Tensor, count: int, numel: int) -> torch.Tensor:
    width = index_bits(numel)
    shifts = torch.arange(width, device=packed.device)
    return (unpack_bits(packed, count * width).view(count, width).long() << shifts).sum(1)


class CompressionState:
    """The state a hook is registered with: its process group (None: the default group), its byte
    statistics (``.stats``, a :class:`CommStats`) and the step count (steps end with DDP's last bucket)."""

    def __init__(self, process_group: dist.ProcessGroup | None = None) -> None:
        self.process_group = process_group
        self.stats = CommStats()
        self.step = 0

    @property
    def group(self) -> dist.ProcessGroup:
        return self.process_group if self.process_group is not None else dist.group.WORLD

    def count(self, bucket: dist.GradBucket, sent: int, received: int | None = None) -> None:
        """Record one bucket's bytes beside the dense all-reduce's, and close the step after the last bucket."""
        world = self.group.size()
        buffer = bucket.buffer()
        dense = allreduce_bytes(buffer.numel() * buffer.element_size(), world)
        self.stats.add(sent, sent if received is None else received, dense)
        if bucket.is_last():
            self.stats.end_step()
            self.step += 1


def check_float_bucket(bucket: dist.GradBucket) -> torch.Tensor:
    buffer = bucket.buffer()
    if not buffer.is_floating_point():
        raise TypeError(f"gradient compression needs floating-point gradients, got a bucket of {buffer.dtype}")
    return buffer
