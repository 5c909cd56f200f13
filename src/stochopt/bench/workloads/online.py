"""The online convex problem on which Adam provably fails (Reddi, Kale & Kumar, 2018, "On the Convergence of Adam
and Beyond", ICLR; Theorem 1)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch
from torch import nn

from stochopt.bench.workloads.base import Batch, Workload
from stochopt.bench.workloads.common import check_batch_size, seeded, stored_target


class _Point(nn.Module):
    """The decision variable x in [-1, 1], a single scalar parameter."""

    def __init__(self, x0: float) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.tensor([x0]))


class OnlineConvex(Workload):
    r"""Reddi et al. (2018), Theorem 1: on :math:`\mathcal F = [-1, 1]` the losses arrive in a cycle of three,

    .. math:: f_t(x) = \begin{cases} C x & t \bmod 3 = 1 \\ -x & \text{otherwise,} \end{cases} \qquad C > 2,

    so the average loss :math:`\frac{C-2}{3}x` is minimized at :math:`x^\ast = -1`. With :math:`\beta_1 = 0` and
    :math:`\beta_2 = 1/(1+C^2)` Adam's second moment forgets the rare large gradient :math:`C` within a step, the two
    gradients :math:`-1` then move x up by more than :math:`C` moved it down, and Adam drifts to the worst point
    :math:`x = +1`; AMSGrad's running maximum :math:`\hat v_t = \max(\hat v_{t-1}, v_t)` remembers :math:`C^2` and
    converges to :math:`-1`. ``paper_betas`` are those hyperparameters.

    A "batch" is the time index t (1, 2, 3, ...; the problem is deterministic, the seed only sets the start
    :math:`x_0 \sim U[-1, 1]`). ``after_step`` projects x back onto [-1, 1]. The metric is the suboptimality of the
    average loss, :math:`\frac{C-2}{3}(x + 1)`: 0 at the optimum, :math:`\frac{2(C-2)}{3}` where Adam ends.
    """

    name = "online_convex"
    metric = "average-loss suboptimality"
    target = stored_target("online_convex")
    max_steps = 3000
    eval_every = 30  # a multiple of the period 3: every evaluation sees x at the same phase of the cycle
    batch_size = 1
    description = "Reddi et al. (2018) online problem f_t(x) = Cx or -x on [-1, 1], where Adam fails and AMSGrad not"

    def __init__(self, C: float = 3.0) -> None:  # noqa: N803 (the paper's name)
        if not C > 2:
            raise ValueError(f"C must be > 2 (otherwise x = +1 is optimal and Adam is right), got {C!r}")
        self.C = float(C)
        self.paper_betas = (0.0, 1.0 / (1.0 + self.C**2))

    def setup(self) -> None:
        """Nothing to load: the losses are defined by the time index."""

    def init_model(self, seed: int, sparse: bool = False) -> nn.Module:
        with seeded(seed):
            return _Point(float(torch.rand(()) * 2 - 1))

    def train_batches(self, batch_size: int, seed: int) -> Iterator[Batch]:
        check_batch_size(batch_size)
        if batch_size != 1:
            raise ValueError(f"batch_size of the online problem is one loss per step, must be 1, got {batch_size!r}")
        return itertools.count(1)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        slope = self.C if batch % 3 == 1 else -1.0
        return slope * model.x.sum()

    def after_step(self, model: nn.Module) -> None:
        with torch.no_grad():
            model.x.clamp_(-1.0, 1.0)

    def evaluate(self, model: nn.Module) -> float:
        return (self.C - 2.0) / 3.0 * (float(model.x.detach()) + 1.0)
