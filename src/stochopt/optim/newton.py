r"""Deterministic second-order baselines for small convex finite-sum problems
:math:`f(x) = \frac1n \sum_i f_i(x)`: Newton's method with the exact Hessian (torch.func), and torch's own
L-BFGS (``torch.optim.LBFGS``, not rewritten), run the same way so that their loss curves compare with the
stochastic optimizers'."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.func import grad, hessian

from stochopt.engine import checks

LossFn = Callable[[Tensor], Tensor]


@dataclass
class BaselineRun:
    """``losses[k]``: f after k steps (``losses[0]`` at the start); ``x``: the final point."""

    method: str
    losses: list[float] = field(default_factory=list)
    x: Tensor | None = None

    def steps_to(self, target: float) -> int | None:
        """The first step count at which the loss is at most ``target``; None if never."""
        return next((k for k, loss in enumerate(self.losses) if loss <= target), None)


def least_squares(a: Tensor, b: Tensor) -> LossFn:
    r""":math:`f(x) = \frac{1}{2n}\|A x - b\|^2` (``x`` a vector, or a matrix for several right-hand sides)."""
    return lambda x: (a @ x - b).square().sum() / (2 * a.size(0))


def logistic_regression(a: Tensor, y: Tensor, l2: float = 0.0) -> LossFn:
    r""":math:`f(x) = \frac1n \sum_i \log(1 + e^{-y_i a_i^\top x}) + \frac{\lambda}{2}\|x\|^2`, labels in {-1, 1}."""
    return lambda x: torch.nn.functional.softplus(-y * (a @ x)).mean() + 0.5 * l2 * x.square().sum()


def newton(
    loss_fn: LossFn,
    x0: Tensor,
    steps: int = 20,
    damping: float = 0.0,
    line_search: bool = True,
    tol: float = 0.0,
) -> BaselineRun:
    r"""Damped Newton with a backtracking (Armijo) line search:

    .. math::
        d_k = -(\nabla^2 f(x_k) + \mu I)^{-1} \nabla f(x_k), \qquad x_{k+1} = x_k + t_k d_k

    with :math:`t_k` the first of 1, 1/2, 1/4, ... such that
    :math:`f(x_k + t d_k) \le f(x_k) + 10^{-4}\, t\, \nabla f(x_k)^\top d_k` (:math:`t_k = 1` without
    ``line_search``). The gradient and the exact Hessian come from torch.func on the flattened ``x``, so this
    is for problems of at most a few thousand variables. Stops early once :math:`\|\nabla f\| \le` ``tol``.
    """
    checks.count("steps", steps, 0)
    checks.nonnegative("damping", damping)
    checks.nonnegative("tol", tol)
    shape = x0.shape
    flat_fn = lambda v: loss_fn(v.view(shape))  # noqa: E731
    x = x0.detach().reshape(-1).clone()
    run = BaselineRun("newton", [float(flat_fn(x))])
    for _ in range(steps):
        g = grad(flat_fn)(x)
        if float(g.norm()) <= tol:
            break
        h = hessian(flat_fn)(x)
        d = -torch.linalg.solve(h + damping * torch.eye(len(x), dtype=x.dtype, device=x.device), g)
        t, f0, slope = 1.0, run.losses[-1], float(g @ d)
        while line_search and float(flat_fn(x + t * d)) > f0 + 1e-4 * t * slope and t > 1e-10:
            t *= 0.5
        x = x + t * d
        run.losses.append(float(flat_fn(x)))
    run.x = x.view(shape)
    return run


def lbfgs(
    loss_fn: LossFn,
    x0: Tensor,
    steps: int = 20,
    lr: float = 1.0,
    history_size: int = 10,
    line_search_fn: str | None = "strong_wolfe",
    stop_at: float | None = None,
) -> BaselineRun:
    """``torch.optim.LBFGS``, one iteration per step (``max_iter=1``: its curvature pairs persist between calls),
    with the strong-Wolfe line search by default. ``max_eval`` is set to 26: LBFGS's default, 1.25 x max_iter,
    would leave the line search no evaluation at all with one iteration per call, and it would stall."""
    checks.count("steps", steps, 0)
    x = x0.detach().clone().requires_grad_()
    opt = torch.optim.LBFGS(
        [x], lr=lr, max_iter=1, max_eval=26, history_size=history_size, line_search_fn=line_search_fn
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = loss_fn(x)
        loss.backward()
        return loss

    run = BaselineRun("lbfgs", [float(loss_fn(x.detach()))])
    for _ in range(steps):
        opt.step(closure)
        run.losses.append(float(loss_fn(x.detach())))
        if stop_at is not None and run.losses[-1] <= stop_at:
            break
    run.x = x.detach()
    return run


def run_optimizer(
    make: Callable[[list[Tensor]], torch.optim.Optimizer],
    loss_fn: LossFn,
    x0: Tensor,
    steps: int,
    stop_at: float | None = None,
) -> BaselineRun:
    """Any torch optimizer on the same full-batch problem, recorded the same way (for comparisons); stops early
    once the loss is at most ``stop_at``."""
    x = x0.detach().clone().requires_grad_()
    opt = make([x])
    run = BaselineRun(type(opt).__name__.lower(), [float(loss_fn(x.detach()))])
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(x).backward()
        opt.step()
        run.losses.append(float(loss_fn(x.detach())))
        if stop_at is not None and run.losses[-1] <= stop_at:
            break
    run.x = x.detach()
    return run


def ill_conditioned_least_squares(
    n: int = 200, d: int = 20, k: int = 10, condition: float = 1e3, seed: int = 0
) -> tuple[LossFn, Tensor, float]:
    r"""The seeds' finite-sum least squares, ill-conditioned and not axis-aligned: :math:`X = U \Sigma V^\top`
    (n x d, random orthogonal U, V; singular values log-spaced over ``condition``, so the Hessian's condition
    number is ``condition``^2), k right-hand sides :math:`Y = X W^* + 0.01\,\xi`, in float64. Returns the loss
    of the d x k matrix W, the start W = 0, and the optimal loss (from ``torch.linalg.lstsq``)."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, d, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    x = u @ torch.diag(torch.logspace(0, -torch.log10(torch.tensor(condition)).item(), d, dtype=torch.float64)) @ v.T
    x = x * n**0.5
    noise = 0.01 * torch.randn(n, k, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(d, k, generator=gen, dtype=torch.float64) + noise
    loss_fn = least_squares(x, y)
    return loss_fn, torch.zeros(d, k, dtype=torch.float64), float(loss_fn(torch.linalg.lstsq(x, y).solution))


def least_squares_race(
    tolerance: float = 1e-4, steps: int = 1000, seed: int = 0
) -> dict[str, tuple[int | None, float | None]]:
    """Steps to reach f* + ``tolerance`` (f0 - f*) on :func:`ill_conditioned_least_squares`: Newton, L-BFGS, and
    Adam and Shampoo each at the best learning rate of a grid of the same size (0.03-1 for Adam, 0.3-10 for
    Shampoo, whose grafted step takes larger rates). Returns {method: (steps or None, learning rate)}."""
    from stochopt.optim.adam import Adam
    from stochopt.optim.shampoo import Shampoo

    loss_fn, w0, f_star = ill_conditioned_least_squares(seed=seed)
    target = f_star + tolerance * (float(loss_fn(w0)) - f_star)
    out: dict[str, tuple[int | None, float | None]] = {
        "newton": (newton(loss_fn, w0, 10).steps_to(target), None),
        "lbfgs": (lbfgs(loss_fn, w0, steps, stop_at=target).steps_to(target), 1.0),
    }
    grids = {
        "adam": ([0.03, 0.1, 0.3, 1.0], lambda lr: lambda p: Adam(p, lr=lr)),
        "shampoo": ([0.3, 1.0, 3.0, 10.0], lambda lr: lambda p: Shampoo(p, lr=lr, betas=(0.0, 1.0),
                                                                          precondition_frequency=1)),
    }  # fmt: skip
    for name, (lrs, make) in grids.items():
        counts = {lr: run_optimizer(make(lr), loss_fn, w0, steps, target).steps_to(target) for lr in lrs}
        reached = {lr: n for lr, n in counts.items() if n is not None}
        best = min(reached, key=reached.__getitem__) if reached else None
        out[name] = (reached.get(best) if best is not None else None, best)
    return out
