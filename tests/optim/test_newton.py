"""The deterministic baselines (Newton via torch.func, torch.optim.LBFGS) on the seeds' convex finite-sum problems,
and the ill-conditioned least-squares race of Newton and Shampoo against Adam."""

from __future__ import annotations

import io

import pytest
import torch

from stochopt.optim.newton import (
    Newton,
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
    """Measured (docs/matrix-optimizers.md): Newton 1, L-BFGS 63, Shampoo 37 (lr 3), Adam 233 (lr 1, its best)."""
    race = least_squares_race(steps=400)
    adam, shampoo, newton_steps = race["adam"][0], race["shampoo"][0], race["newton"][0]
    assert adam is not None and shampoo is not None and newton_steps is not None
    assert newton_steps <= 2
    assert 4 * shampoo <= adam, race
    assert race["lbfgs"][0] is not None and race["lbfgs"][0] < adam


# ----- the Newton optimizer class against closed forms and a plain loop from the equations -------------------


def quadratic(seed: int = 0, n: int = 9):
    """f(theta) = 1/2 theta^T A theta - b^T theta with A positive definite; theta = [vec(W) (3 x 2); v (3)]."""
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=gen, dtype=torch.float64)
    a = m @ m.T + torch.eye(n, dtype=torch.float64)
    b = torch.randn(n, generator=gen, dtype=torch.float64)
    w = torch.randn(3, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)

    def loss() -> torch.Tensor:
        theta = torch.cat([w.reshape(-1), v])
        return 0.5 * theta @ a @ theta - b @ theta

    return a, b, w, v, loss


def flat(*tensors: torch.Tensor) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True:UserWarning")
@pytest.mark.parametrize("line_search", [False, True])
@pytest.mark.parametrize("style", ["no backward", "backward(create_graph=True)"])
def test_one_undamped_step_is_the_quadratic_optimum(line_search: bool, style: str) -> None:
    a, b, w, v, loss = quadratic()
    opt = Newton([{"params": [w]}, {"params": [v]}], line_search=line_search)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        value = loss()
        if style != "no backward":
            value.backward(create_graph=True)
        return value

    start_loss = float(loss().detach())
    returned = opt.step(closure)
    assert float(returned.detach()) == start_loss  # step returns the loss at the starting point, as LBFGS does
    torch.testing.assert_close(flat(w, v), torch.linalg.solve(a, b), rtol=1e-10, atol=1e-12)
    assert opt.state[w]["t"] == 1.0 and opt.state[w]["n_iter"] == 1
    assert all(p.grad is None or not p.grad.requires_grad for p in (w, v))  # no graph kept in .grad


def test_groups_scale_and_damp_their_own_blocks() -> None:
    """Per-group damping mu and lr eta: x + eta * d with d = -(A + diag(mu))^-1 g; a group with lr=0 stays."""
    a, b, w, v, loss = quadratic(seed=1)
    frozen = torch.randn(2, dtype=torch.float64, requires_grad=True)
    opt = Newton([{"params": [w], "damping": 0.1, "lr": 0.5}, {"params": [v], "damping": 2.0}], line_search=False)
    opt.add_param_group({"params": [frozen], "lr": 0.0, "damping": 0.3})

    def full() -> torch.Tensor:  # the last term couples the frozen block to the others
        return loss() + (frozen**2).sum() * (1 + w.sum() ** 2)

    for _ in range(3):
        theta, z = flat(w, v), frozen.detach().clone()
        x = torch.cat([theta, z]).requires_grad_()
        ref_f = lambda x: 0.5 * x[:9] @ a @ x[:9] - b @ x[:9] + (x[9:] ** 2).sum() * (1 + x[:6].sum() ** 2)  # noqa: E731
        g, h = torch.func.grad(ref_f)(x), torch.func.hessian(ref_f)(x)
        mu = torch.tensor([0.1] * 6 + [2.0] * 3 + [0.3] * 2, dtype=torch.float64)
        eta = torch.tensor([0.5] * 6 + [1.0] * 3 + [0.0] * 2, dtype=torch.float64)
        expected = x.detach() - eta * torch.linalg.solve(h + torch.diag(mu), g)
        opt.step(full)
        torch.testing.assert_close(flat(w, v, frozen), expected, rtol=1e-10, atol=1e-12)
        assert torch.equal(frozen.detach(), z)


def logistic_reference(x: torch.Tensor, y: torch.Tensor, l2: float, theta: torch.Tensor, damping: float, steps: int):
    """Damped Newton with Armijo backtracking from the equations: for s = sigmoid(X theta), labels in {-1, 1},
    f = mean(softplus(-y X theta)) + l2/2 |theta|^2, g = X^T (s - (y+1)/2) / n + l2 theta,
    H = X^T diag(s (1 - s)) X / n + l2 I, d = -(H + damping I)^-1 g, t = first of 1, 1/2, ... with
    f(theta + t d) <= f(theta) + 1e-4 t g^T d."""
    n = x.size(0)
    f = lambda th: torch.log1p(torch.exp(-y * (x @ th))).mean() + 0.5 * l2 * th @ th  # noqa: E731
    iterates, sizes = [], []
    for _ in range(steps):
        s = torch.sigmoid(x @ theta)
        g = x.T @ (s - (y + 1) / 2) / n + l2 * theta
        h = x.T @ (x * (s * (1 - s))[:, None]) / n + l2 * torch.eye(len(theta), dtype=theta.dtype)
        d = -torch.linalg.solve(h + damping * torch.eye(len(theta), dtype=theta.dtype), g)
        t = 1.0
        while f(theta + t * d) > f(theta) + 1e-4 * t * (g @ d):
            t /= 2
        theta = theta + t * d
        iterates.append(theta)
        sizes.append(t)
    return iterates, sizes


def test_logistic_iterates_equal_the_closed_form_loop() -> None:
    """Weights and bias as two parameters (flattened into one vector), started far out so that the line search
    has to back off; every iterate and step size equals the plain loop's."""
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(80, 4, generator=gen, dtype=torch.float64)
    y = torch.sign(a @ torch.tensor([2.0, -1.0, 0.5, 0.0], dtype=torch.float64) + 0.3)
    x = torch.cat([a, torch.ones(80, 1, dtype=torch.float64)], dim=1)
    theta0 = 4 * torch.randn(5, generator=gen, dtype=torch.float64)
    l2, damping = 1e-2, 1e-3
    expected, sizes = logistic_reference(x, y, l2, theta0, damping, steps=8)
    assert min(sizes) < 1.0 and sizes[-1] == 1.0  # the test exercises both backtracking and full steps

    w = theta0[:4].clone().requires_grad_()
    bias = theta0[4:].clone().requires_grad_()
    opt = Newton([w, bias], damping=damping)
    for theta, t in zip(expected, sizes):
        opt.step(
            lambda: torch.logaddexp(torch.zeros(()), -y * (a @ w + bias)).mean() + 0.5 * l2 * (w @ w + bias @ bias)
        )
        torch.testing.assert_close(flat(w, bias), theta, rtol=1e-10, atol=1e-12)
        assert opt.state[w]["t"] == t


def test_state_dict_round_trip() -> None:
    """Not a quadratic, so that later steps depend on where the earlier ones went."""
    _, _, w, v, _ = quadratic(seed=2)

    def full(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return (p**4).sum() + (q**4).sum() + (p.sum() - q.sum()) ** 2

    opt = Newton([{"params": [w], "damping": 0.5}, {"params": [v], "lr": 0.7}])
    for _ in range(2):
        opt.step(lambda: full(w, v))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    w2, v2 = w.detach().clone().requires_grad_(), v.detach().clone().requires_grad_()
    resumed = Newton([{"params": [w2]}, {"params": [v2]}])  # damping and lr come back from the state_dict
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer))
    assert resumed.param_groups[0]["damping"] == 0.5 and resumed.param_groups[1]["lr"] == 0.7
    for _ in range(3):
        opt.step(lambda: full(w, v))
        resumed.step(lambda: full(w2, v2))
    assert torch.equal(w, w2) and torch.equal(v, v2)
    assert resumed.state[w2]["n_iter"] == opt.state[w]["n_iter"] == 5
    assert resumed.state[w2]["func_evals"] == opt.state[w]["func_evals"]


def test_indefinite_and_singular_hessians() -> None:
    """Negative curvature: the Newton direction ascends, so the step falls back to the gradient and the loss
    still falls, until the iterate reaches the convex basin and Newton converges to the minimizer +-1. A
    parameter the loss ignores makes H singular: the pseudo-inverse leaves it in place."""
    x = torch.tensor([0.1, -0.2], dtype=torch.float64, requires_grad=True)
    ignored = torch.ones(3, dtype=torch.float64, requires_grad=True)
    opt = Newton([x, ignored])
    f = lambda: (x**4 / 4 - x**2 / 2).sum() + 0 * ignored.sum()  # noqa: E731
    losses = [float(f())]
    for _ in range(25):
        opt.step(f)
        losses.append(float(f()))
    assert all(b < a for a, b in zip(losses[:6], losses[1:7]))  # strictly down while far from the minimum
    assert all(b <= a for a, b in zip(losses, losses[1:]))
    torch.testing.assert_close(x.detach(), torch.tensor([1.0, -1.0], dtype=torch.float64))
    assert torch.equal(ignored.detach(), torch.ones(3, dtype=torch.float64))


def test_newton_refuses_what_it_cannot_do() -> None:
    _, _, w, v, loss = quadratic()
    opt = Newton([w, v])
    with pytest.raises(ValueError, match="closure"):
        opt.step()

    def plain_backward() -> torch.Tensor:
        value = loss()
        value.backward()
        return value

    with pytest.raises(ValueError, match="create_graph=True"):
        opt.step(plain_backward)
    with pytest.raises(ValueError, match=r"6000 parameters, above max_params=5000"):
        Newton([torch.zeros(100, 60, requires_grad=True)])
    with pytest.raises(ValueError, match=r"9 parameters, above max_params=8"):
        Newton([w], max_params=8).add_param_group({"params": [v]})
    with pytest.raises(ValueError, match=r"lr.*-0\.5"):
        Newton([w], lr=-0.5)
    with pytest.raises(ValueError, match="damping"):
        Newton([w], damping=float("nan"))
    with pytest.raises(TypeError, match="line_search"):
        Newton([w], line_search="yes")
    with pytest.raises(ValueError, match="c1"):
        Newton([w], c1=1.5)
    with pytest.raises(ValueError, match="requires grad"):
        Newton([torch.zeros(2)]).step(lambda: torch.zeros(()))
    with pytest.raises(ValueError, match="loss is nan"):
        Newton([w]).step(lambda: loss() * float("nan"))
