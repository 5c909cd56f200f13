"""Tiny workloads for the benchmark's tests (a few milliseconds per run); also the "bring your own workload by
import path" example: ``tiny_workloads:TinyRegression``."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from stochopt.bench.workloads.base import Workload


class TinyRegression(Workload):
    """Noisy linear regression, 8 features: validation MSE; the noise floor is 0.01."""

    name = "tiny_regression"
    metric = "validation MSE"
    target = 0.05
    max_steps = 60
    eval_every = 5
    batch_size = 16

    def __init__(self, features: int = 8) -> None:
        self.features = int(features)

    def setup(self) -> None:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(self.features, 1, generator=g)
        x = torch.randn(320, self.features, generator=g)
        y = x @ w + 0.1 * torch.randn(320, 1, generator=g)
        self.x, self.y, self.x_val, self.y_val = x[:256], y[:256], x[256:], y[256:]

    def init_model(self, seed: int, sparse: bool = False) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Linear(self.features, 1)

    def train_batches(self, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(seed)
        while True:
            idx = torch.randint(0, len(self.x), (batch_size,), generator=g)
            yield self.x[idx], self.y[idx]

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(model(x), y)

    def evaluate(self, model: nn.Module) -> float:
        return nn.functional.mse_loss(model(self.x_val), self.y_val).item()


class TinyClassifier(TinyRegression):
    """A two-layer MLP on a linearly separable problem: validation error rate."""

    name = "tiny_classifier"
    metric = "error rate"
    target = 0.1
    max_steps = 40

    def setup(self) -> None:
        super().setup()
        self.y, self.y_val = (self.y > 0).float(), (self.y_val > 0).float()

    def init_model(self, seed: int, sparse: bool = False) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(self.features, 16), nn.Tanh(), nn.Linear(16, 1))

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return nn.functional.binary_cross_entropy_with_logits(model(x), y)

    def evaluate(self, model: nn.Module) -> float:
        return ((model(self.x_val) > 0).float() != self.y_val).float().mean().item()


class Exploding(TinyRegression):
    """A loss that becomes non-finite after a few steps whatever the optimizer does: a failed run, not a crash."""

    name = "exploding"

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        self.calls = getattr(self, "calls", 0) + 1
        loss = super().loss(model, batch)
        return loss * float("inf") if self.calls > 7 else loss


class NoMetric(TinyRegression):
    """Trains, but its validation metric is never finite: a workload nothing can calibrate."""

    name = "no_metric"

    def evaluate(self, model: nn.Module) -> float:
        return float("nan")


class SignDescent(torch.optim.Optimizer):
    """A user's own optimizer, benchmarked by import path (``tiny_workloads:SignDescent``): p -= lr * sign(g)."""

    def __init__(self, params, lr: float = 0.01) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"])


class SlowRegression(TinyRegression):
    """TinyRegression that takes long enough per run for a test to kill the process in the middle of a trial."""

    name = "slow_regression"
    target = 0.0  # never reached: every trial runs its whole budget

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        import time

        time.sleep(0.005)
        return super().loss(model, batch)


class ShortRegression(TinyRegression):
    """TinyRegression with a 20-step budget, for runs that must not stop early (calibration)."""

    name = "short_regression"
    max_steps = 20


class Interrupted(TinyRegression):
    """Raises KeyboardInterrupt (as Ctrl-C would) in the middle of its ``interrupt_at``-th training step overall."""

    name = "interrupted"
    target = 0.0  # never reached: every trial runs its whole budget
    interrupt_at: int | None = None
    calls = 0

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        type(self).calls += 1
        if type(self).calls == self.interrupt_at:
            raise KeyboardInterrupt
        return super().loss(model, batch)
