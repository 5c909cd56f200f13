r"""Compressing DDP communication hooks with error feedback: top-k and random-k sparsification and scaled sign.

Register with ``ddp_model.register_comm_hook(state, hook)``. Each rank adds the residual of earlier steps to its
gradient, sends a compressed part and keeps the rest as the new residual (error feedback; Stich, Cordonnier &
Jaggi 2018, "Sparsified SGD with Memory", arXiv:1809.07599; Karimireddy et al. 2019, "Error Feedback Fixes
SignSGD", arXiv:1901.09847):

.. math::
    a_t = e_{t-1} + g_t, \qquad \Delta_t = C(a_t), \qquad e_t = a_t - \Delta_t, \qquad
    \bar g_t = \tfrac{1}{W} \textstyle\sum_{r} \Delta_t^{(r)}

so :math:`\sum_{s \le t} \Delta_s + e_t = \sum_{s \le t} g_s` on every rank: nothing is dropped, only delayed.
Residuals live per bucket index (:class:`~stochopt.distributed.state.BucketMemory`). Every state counts its bytes
in ``state.stats`` (:class:`~stochopt.distributed.state.CommStats`).
"""

# no `from __future__ import annotations`: DDP compares the hooks' annotations with the real types
import math

import torch
import torch.distributed as dist

from stochopt.distributed.state import (
    BucketMemory,
    CompressionState,
    allgather_bytes,
    allreduce_bytes,
    check_float_bucket,
    pack_bits,
    pack_indices,
    unpack_bits,
    unpack_indices,
)

Future = torch.futures.Future[torch.Tensor]  # the exact annotation DDP's register_comm_hook accepts


class AllReduceState(CompressionState):
    """Plain averaging all-reduce (what DDP does without a hook), counted in the same statistics."""


def allreduce_hook(state: AllReduceState, bucket: dist.GradBucket) -> Future:
    buffer = bucket.buffer()
    state.count(bucket, allreduce_bytes(buffer.numel() * buffer.element_size(), state.group.size()))
    buffer.div_(state.group.size())  # before the sum, as torch's own allreduce_hook, so results are identical
    return dist.all_reduce(buffer, group=state.group, async_op=True).get_future().then(lambda f: f.value()[0])


class ErrorFeedbackState(CompressionState):
    """Base of the error-feedback hooks: ``error_feedback=False`` drops what is not sent instead of keeping it."""

    def __init__(self, process_group: dist.ProcessGroup | None = None, error_feedback: bool = True) -> None:
        super().__init__(process_group)
        if not isinstance(error_feedback, bool):
            raise TypeError(f"error_feedback must be a bool, got {error_feedback!r}")
        self.error_feedback = error_feedback
        self.residuals = BucketMemory()

    def residual(self, param: torch.Tensor) -> torch.Tensor:
        """What this rank still owes for ``param`` (the part of its gradients not yet sent)."""
        return self.residuals.of(param)

    def corrected(self, bucket: dist.GradBucket, gradient: torch.Tensor) -> torch.Tensor:
        """:math:`a_t = e_{t-1} + g_t`, held in the residual buffer itself (what is sent is then taken out of it)."""
        if not self.error_feedback:
            return gradient.clone()
        residual = self.residuals.get(bucket)
        return residual.add_(gradient)


def _check_density(density: float, name: str = "density") -> float:
    if not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {density!r}")
    return float(density)


class TopKState(ErrorFeedbackState):
    r"""Top-k sparsification: each rank sends the :math:`k = \lceil \text{density} \cdot d \rceil` entries of
    :math:`a_t` largest in magnitude (values, and indices packed at :math:`\lceil \log_2 d \rceil` bits), all-gathered.

    Deep gradient compression options (Lin et al. 2018, arXiv:1712.01887): ``momentum`` m > 0 moves momentum into
    the hook (momentum correction: :math:`u_t = m u_{t-1} + g_t`, :math:`a_t = e_{t-1} + u_t`, and entries sent are
    cleared from both u and e, "momentum factor masking"; use the optimizer without momentum then), and
    ``warmup_steps`` lowers the density geometrically from ``warmup_density`` to ``density`` over the first steps.
    """

    def __init__(
        self,
        density: float,
        process_group: dist.ProcessGroup | None = None,
        error_feedback: bool = True,
        momentum: float = 0.0,
        warmup_steps: int = 0,
        warmup_density: float = 0.25,
    ) -> None:
        super().__init__(process_group, error_feedback)
        self.density = _check_density(density)
        self.warmup_density = _check_density(warmup_density, "warmup_density")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be a non-negative int, got {warmup_steps!r}")
        self.momentum = float(momentum)
        self.warmup_steps = warmup_steps
        self.momenta = BucketMemory()

    def current_density(self) -> float:
        if self.step >= self.warmup_steps:
            return self.density
        return self.warmup_density * (self.density / self.warmup_density) ** (self.step / self.warmup_steps)


def _k(density: float, numel: int) -> int:
    return min(numel, max(1, math.ceil(density * numel)))


def topk_hook(state: TopKState, bucket: dist.GradBucket) -> Future:
    gradient = check_float_bucket(bucket)
    world, numel = state.group.size(), gradient.numel()
    if state.momentum:
        velocity = state.momenta.get(bucket).mul_(state.momentum).add_(gradient)
        acc = state.corrected(bucket, velocity)
    else:
        acc = state.corrected(bucket, gradient)
    k = _k(state.current_density(), numel)
    indices = acc.abs().topk(k, sorted=False).indices
    values = acc[indices]
    acc[indices] = 0  # the new residual (a no-op on the copy when error feedback is off)
    if state.momentum:
        velocity[indices] = 0
    wire = torch.cat([values.view(torch.uint8), pack_indices(indices, numel)])
    gathered = [torch.empty_like(wire) for _ in range(world)]
    state.count(bucket, allgather_bytes(wire.numel(), world))
    value_bytes = k * gradient.element_size()

    def decode(fut: torch.futures.Future) -> torch.Tensor:
        fut.value()  # raises the all-gather's error (a rank died or timed out) instead of reading garbage
        gradient.zero_()
        for chunk in gathered:
            sent = chunk[:value_bytes].view(gradient.dtype).div(world)  # divided first, as the dense all-reduce
            gradient.index_add_(0, unpack_indices(chunk[value_bytes:], k, numel), sent)
        return gradient

    return dist.all_gather(gathered, wire, group=state.group, async_op=True).get_future().then(decode)


class RandomKState(ErrorFeedbackState):
    r"""Random-k sparsification: k random entries of :math:`a_t`, the same on every rank (drawn from a generator
    seeded by ``seed``, the step and the bucket index), so only the k values travel, in one all-reduce, and
    no indices. Unscaled, as in Stich et al. 2018 (with error feedback the unbiasing factor d/k is not needed)."""

    def __init__(
        self,
        density: float,
        process_group: dist.ProcessGroup | None = None,
        error_feedback: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(process_group, error_feedback)
        self.density = _check_density(density)
        self.seed = int(seed)

    def indices(self, bucket_index: int, numel: int) -> torch.Tensor:
        # the same seed on every rank, a new draw for every step and bucket
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.step) * 4099 + bucket_index)
        return torch.randperm(numel, generator=gen)[: _k(self.density, numel)]


def randomk_hook(state: RandomKState, bucket: dist.GradBucket) -> Future:
    gradient = check_float_bucket(bucket)
    world = state.group.size()
    acc = state.corrected(bucket, gradient)
    indices = state.indices(bucket.index(), gradient.numel()).to(gradient.device)
    values = acc[indices].div_(world)
    acc[indices] = 0
    state.count(bucket, allreduce_bytes(values.numel() * values.element_size(), world))

    def decode(fut: torch.futures.Future) -> torch.Tensor:
        gradient.zero_()
        gradient[indices] = fut.value()[0]
        return gradient

    return dist.all_reduce(values, group=state.group, async_op=True).get_future().then(decode)


class SignState(ErrorFeedbackState):
    r"""Scaled sign (EF-SignSGD, Karimireddy et al. 2019): per parameter tensor :math:`a` of d entries,
    :math:`C(a) = \frac{\lVert a \rVert_1}{d} \operatorname{sign}(a)`, sent as 1 bit per entry (packed into bytes; a
    zero counts as +) plus one scale per tensor, all-gathered."""


def sign_hook(state: SignState, bucket: dist.GradBucket) -> Future:
    gradient = check_float_bucket(bucket)
    world, numel = state.group.size(), gradient.numel()
    sizes = [p.numel() for p in bucket.parameters()]
    acc = state.corrected(bucket, gradient)
    scales = torch.stack([part.abs().mean() for part in acc.split(sizes)])
    positive = acc >= 0
    acc.sub_(_signed(positive, scales, sizes))
    wire = torch.cat([scales.view(torch.uint8), pack_bits(positive)])
    gathered = [torch.empty_like(wire) for _ in range(world)]
    state.count(bucket, allgather_bytes(wire.numel(), world))
    scale_bytes = scales.numel() * scales.element_size()

    def decode(fut: torch.futures.Future) -> torch.Tensor:
        fut.value()  # raises the all-gather's error
        gradient.zero_()
        for chunk in gathered:
            rank_scales = chunk[:scale_bytes].view(gradient.dtype).div(world)
            gradient.add_(_signed(unpack_bits(chunk[scale_bytes:], numel), rank_scales, sizes))
        return gradient

    return dist.all_gather(gathered, wire, group=state.group, async_op=True).get_future().then(decode)


def _signed(positive: torch.Tensor, scales: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    magnitude = torch.repeat_interleave(scales, torch.tensor(sizes, device=scales.device))
    return torch.where(positive, magnitude, -magnitude)
