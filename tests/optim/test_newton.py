"""The deterministic baselines (Newton via torch.func, torch.optim.LBFGS) on the seeds' convex finite-sum problems,
and the ill-conditioned least-squares race of Newton and Shampoo against Adam."""

from __future__ import annotations

import pytest
import torch

from stochopt.optim.newton import (
    ill_conditioned_least_squares,
    lbfgs,
    least_squares_race,
    logistic_regression,
    newton,
)


def test_newton_solves_least_squares_in_one_step() -> None:
    loss_fn, w0, f_star = ill_conditioned_least_squares(n=50, d=8, k=3, condition=1e4)
    run = newton(loss_fn, w0, steps=3)
    assert run.losses[1] == pytest.approx(f_star, rel=1e-9)  # a quadratic: the exact Newton step is the optimum
    assert run.steps_to(f_star * (1 + 1e-9)) == 1


def logistic_problem():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(120, 5, generator=gen, dtype=torch.float64)
    truth = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=torch.float64)
    y = torch.sign(a @ truth + torch.randn(120, generator=gen, dtype=torch.float64))
    return logistic_regression(a, y, l2=1e-2), torch.zeros(5, dtype=torch.float64)


def test_newton_and_lbfgs_reach_the_logistic_optimum() -> None:
    loss_fn, x0 = logistic_problem()
    exact = newton(loss_fn, x0, steps=20, tol=1e-12)
    grad = torch.func.grad(loss_fn)(exact.x)
    assert grad.norm() < 1e-10 and len(exact.losses) <= 10  # quadratic convergence: a handful of steps
    quasi = lbfgs(loss_fn, x0, steps=60)
    assert quasi.losses[-1] == pytest.approx(exact.losses[-1], rel=1e-8)  # LBFGS stops at tolerance_change
    damped = newton(loss_fn, x0, steps=30, damping=1e-3, line_search=False)
    assert damped.losses[-1] == pytest.approx(exact.losses[-1], rel=1e-8)
    assert all(b <= a + 1e-15 for a, b in zip(exact.losses, exact.losses[1:]))  # the line search never goes up


def test_bad_arguments_are_named() -> None:
    loss_fn, x0 = logistic_problem()
    with pytest.raises(ValueError, match="damping"):
        newton(loss_fn, x0, damping=-1.0)
    with pytest.raises(TypeError, match="steps"):
        lbfgs(loss_fn, x0, steps=2.5)


def test_shampoo_and_newton_need_far_fewer_steps_than_adam() -> None:
    """Measured (README): Newton 1, L-BFGS 65, Shampoo 37 (lr 3), Adam 233 (lr 1, the best of its grid)."""
    race = least_squares_race(steps=400)
    adam, shampoo, newton_steps = race["adam"][0], race["shampoo"][0], race["newton"][0]
    assert adam is not None and shampoo is not None and newton_steps is not None
    assert newton_steps <= 2
    assert 4 * shampoo <= adam, race
    assert race["lbfgs"][0] is not None and race["lbfgs"][0] < adam
