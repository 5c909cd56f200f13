"""Every registered workload: data, a model, a batch, a finite loss with gradients, a finite metric; determinism;
and on the cheap ones a short training run that must lower the loss."""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch

import stochopt
from stochopt.bench.workloads import WORKLOADS, load_workload


@functools.cache
def ready(name: str):
    workload = load_workload(name)
    workload.setup()
    return workload


def step_once(workload, model, batch, lr=1e-3):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loss = workload.loss(model, batch)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    workload.after_step(model)
    return loss


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_one_batch_gives_a_finite_scalar_loss_with_gradients_and_a_finite_metric(name):
    workload = ready(name)
    model = workload.init_model(0)
    batch = next(workload.train_batches(workload.batch_size, 0))
    loss = workload.loss(model, batch)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g.to_dense()).all() for g in grads)
    assert any(g.to_dense().abs().sum() > 0 for g in grads)
    with torch.no_grad():
        value = workload.evaluate(model)
    assert isinstance(value, float) and math.isfinite(value)


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_same_seed_same_init_batches_and_curve_other_seed_differs(name):
    workload = ready(name)

    def trajectory(seed):
        model = workload.init_model(seed)
        init = [p.detach().clone() for p in model.parameters()]
        batches = list(itertools.islice(workload.train_batches(workload.batch_size, seed), 3))
        losses = [step_once(workload, model, b).item() for b in batches]
        with torch.no_grad():
            return init, batches, losses, workload.evaluate(model)

    a, b, c = trajectory(3), trajectory(3), trajectory(4)
    for x, y in zip(a[0], b[0]):
        assert torch.equal(x, y)
    assert a[2] == b[2] and a[3] == b[3]
    assert all(torch.equal(flat(x), flat(y)) for x, y in zip(a[1], b[1]))
    if name != "online_convex":  # its stream is the time index: the seed only moves the start point
        assert not all(torch.equal(flat(x), flat(y)) for x, y in zip(a[1], c[1]))
    assert any(not torch.equal(x, y) for x, y in zip(a[0], c[0]))


def test_bad_batch_size_is_a_clear_error():
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        next(ready("logistic").train_batches(0, 0))
    with pytest.raises(ValueError, match="at most the 455 training examples, got 1000"):
        next(ready("logistic").train_batches(1000, 0))


def flat(batch) -> torch.Tensor:
    """A batch (a tuple of tensors, or the online problem's time index) as one float64 vector, for comparison."""
    if isinstance(batch, tuple):
        return torch.cat([torch.as_tensor(t).reshape(-1).double() for t in batch])
    return torch.tensor([float(batch)], dtype=torch.float64)


def train(name: str, steps: int, make):
    workload = ready(name)
    model = workload.init_model(0)
    optimizer = make(model.parameters())
    batches = workload.train_batches(workload.batch_size, 0)
    with torch.no_grad():
        before = workload.evaluate(model)
    for _ in range(steps):
        loss = workload.loss(model, next(batches))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        workload.after_step(model)
    with torch.no_grad():
        return before, workload.evaluate(model)


@pytest.mark.parametrize(
    "name, steps, make, factor",
    [
        ("least_squares", 300, lambda p: stochopt.SGD(p, lr=0.1, momentum=0.9), 0.05),
        ("logistic", 100, lambda p: stochopt.AdamW(p, lr=1e-2), 0.5),
        ("digits_mlp", 150, lambda p: stochopt.AdamW(p, lr=3e-3), 0.2),
        ("autoencoder", 300, lambda p: stochopt.AdamW(p, lr=1e-2), 0.6),
        ("char_gpt", 60, lambda p: stochopt.AdamW(p, lr=1e-2), 0.85),
    ],
)
def test_short_training_lowers_the_metric(name, steps, make, factor):
    before, after = train(name, steps, make)
    assert after < factor * before, (before, after)
