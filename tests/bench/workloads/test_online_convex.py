"""Reddi et al. (2018), Theorem 1: Adam with beta1 = 0, beta2 = 1/(1+C^2) drifts to the worst point x = +1 of the
online problem; AMSGrad (same hyperparameters, running max of v) reaches the workload's target."""

from __future__ import annotations

import pytest
import torch

import stochopt
from stochopt.bench.workloads import load_workload


def run(amsgrad: bool, lr: float = 0.01, seed: int = 0) -> tuple[list[float], float]:
    workload = load_workload("online_convex")
    workload.setup()
    model = workload.init_model(seed)
    optimizer = stochopt.Adam(model.parameters(), lr=lr, betas=workload.paper_betas, amsgrad=amsgrad)
    batches = workload.train_batches(1, seed)
    values = []
    for step in range(1, workload.max_steps + 1):
        loss = workload.loss(model, next(batches))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        workload.after_step(model)
        assert -1.0 <= float(model.x.detach()) <= 1.0  # the projection keeps x feasible
        if step % workload.eval_every == 0:
            with torch.no_grad():
                values.append(workload.evaluate(model))
    return values, float(model.x.detach())


def test_adam_never_reaches_the_target_and_amsgrad_does(seed=1):
    workload = load_workload("online_convex")
    assert workload.paper_betas == (0.0, 0.1)
    adam, adam_x = run(amsgrad=False, seed=seed)
    amsgrad, amsgrad_x = run(amsgrad=True, seed=seed)
    assert min(adam) > workload.target and adam_x == 1.0  # Adam ends at the worst feasible point
    assert adam[-1] == pytest.approx(2 * (workload.C - 2) / 3)
    assert amsgrad[-1] <= workload.target and amsgrad_x < -0.97


def test_losses_follow_the_three_cycle_and_the_metric_is_zero_at_the_optimum():
    workload = load_workload("online_convex", C=4.0)
    model = workload.init_model(0)
    with torch.no_grad():
        model.x.fill_(0.5)
    assert [workload.loss(model, t).item() for t in (1, 2, 3, 4)] == [2.0, -0.5, -0.5, 2.0]
    model.x.data.fill_(-1.0)
    assert workload.evaluate(model) == 0.0
    with pytest.raises(ValueError, match="C must be > 2"):
        load_workload("online_convex", C=2.0)
    with pytest.raises(ValueError, match="must be 1, got 4"):
        workload.train_batches(4, 0)
