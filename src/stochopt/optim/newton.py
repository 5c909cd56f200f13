r"""Deterministic second-order baselines for small convex finite-sum problems
:math:`f(x) = \frac1n \sum_i f_i(x)`: Newton's method with the exact Hessian (:class:`Newton`, a
``torch.optim.Optimizer`` driven by a closure like ``torch.optim.LBFGS``), and torch's own L-BFGS
(``torch.optim.LBFGS``, not rewritten), run the same way so that their loss curves compare with the
stochastic optimizers'."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

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
    # logaddexp(0, z) = log(1 + e^z) exactly; softplus switches to z above 20, which drops the curvature there
    return lambda x: torch.logaddexp(torch.zeros(()), -y * (a @ x)).mean() + 0.5 * l2 * x.square().sum()


def gradient_and_hessian(loss: Tensor, params: list[Tensor]) -> tuple[Tensor, Tensor]:
    """The flat gradient g and the exact Hessian H of ``loss`` over ``params`` (flattened and concatenated in
    order), by double backward: g with ``create_graph``, then every row of H at once as the vector-Jacobian
    products of g with the rows of the identity (``is_grads_batched``: torch vmaps the second backward)."""
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True, materialize_grads=True)
    g = torch.cat([x.reshape(-1) for x in grads])
    n = g.numel()
    if not g.requires_grad:  # the loss is at most linear in every parameter
        return g.detach(), g.new_zeros(n, n)
    eye = torch.eye(n, dtype=g.dtype, device=g.device)
    rows = torch.autograd.grad(g, params, eye, is_grads_batched=True, allow_unused=True)
    # a parameter that g does not depend on has no rows (materialize_grads would not batch its zeros)
    blocks = [g.new_zeros(n, p.numel()) if r is None else r.reshape(n, -1) for r, p in zip(rows, params)]
    return g.detach(), torch.cat(blocks, dim=1).detach()


def newton_direction(hessian: Tensor, grad: Tensor, damping: Tensor) -> Tensor:
    r""":math:`d = -(H + \mathrm{diag}(\mu))^{-1} g` in float64: by Cholesky where :math:`H + \mathrm{diag}(\mu)`
    is positive definite, else (singular or indefinite) by its pseudo-inverse, the minimum-norm solution."""
    a = hessian.double()
    a = 0.5 * (a + a.T) + torch.diag(damping.double())  # the batched rows agree with H^T only to rounding
    factor, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return -torch.cholesky_solve(grad.double()[:, None], factor)[:, 0]
    return -(torch.linalg.pinv(a, hermitian=True) @ grad.double())


def armijo_backtracking(
    loss_at: Callable[[float], float], f0: float, slope: float, c1: float, shrink: float, max_backtracks: int
) -> float | None:
    r"""The first :math:`t` of :math:`1, \beta, \beta^2, \ldots` (``shrink`` = :math:`\beta`, at most
    ``max_backtracks`` reductions) with :math:`f(x + t p) \le f(x) + c_1 t\, \nabla f^\top p` (``slope`` =
    :math:`\nabla f^\top p`); None if there is none. ``loss_at(t)`` evaluates :math:`f(x + t p)`; a NaN loss
    fails the test, so the search backs off from it."""
    t = 1.0
    for _ in range(max_backtracks + 1):
        if loss_at(t) <= f0 + c1 * t * slope:
            return t
        t *= shrink
    return None


class Newton(Optimizer):
    r"""Newton's method with the exact Hessian, for small problems (a deterministic baseline; Nocedal & Wright
    2006, "Numerical Optimization", ch. 3 and 6). All parameters of all groups form one vector :math:`x`:

    .. math::
        d_k = -(\nabla^2 f(x_k) + \mathrm{diag}(\mu))^{-1} \nabla f(x_k), \qquad
        x_{k+1} = x_k + t_k\, \eta \odot d_k

    with :math:`\mu` and :math:`\eta` each parameter's group ``damping`` and ``lr`` (so a group with lr = 0
    stays where it is), and :math:`t_k` from Armijo backtracking: the first of :math:`1, \beta, \beta^2,
    \ldots` with :math:`f(x_k + t p_k) \le f(x_k) + c_1 t \nabla f(x_k)^\top p_k`, :math:`p_k = \eta \odot d_k`
    (``line_search=False``: :math:`t_k = 1`). With the line search on, a direction that does not descend
    (an indefinite Hessian, or groups with different lr) is replaced by :math:`p_k = -\eta \odot \nabla f`; if no
    :math:`t` passes within ``max_backtracks`` halvings the parameters stay where they are. The system is solved
    in float64, by Cholesky, or by the pseudo-inverse where :math:`H + \mathrm{diag}(\mu)` is not positive
    definite. On a quadratic, one undamped step is the exact minimizer.

    Like ``torch.optim.LBFGS``, ``step(closure)`` needs a closure that re-evaluates the loss; the gradient and
    the Hessian are taken from the returned loss by double backward (:func:`gradient_and_hessian`), so the
    closure should return the loss without calling ``backward``, or call ``loss.backward(create_graph=True)``
    (a plain ``backward()`` frees the graph that the second derivatives need, and is refused). The Hessian has
    n^2 entries for n parameters in all: more than ``max_params`` parameters are refused (default 5000: a
    200 MB float64 Hessian). ``step`` returns the loss at the starting point; the last step's size ``t``,
    the number of steps ``n_iter`` and of closure calls ``func_evals`` are kept in ``state`` of the first
    parameter, as LBFGS keeps its own. No step is taken (``converged``) once the gradient's largest entry is
    at most ``tolerance_grad``.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1.0,
        damping: float = 0.0,
        line_search: bool = True,
        *,
        max_params: int = 5000,
        c1: float = 1e-4,
        shrink: float = 0.5,
        max_backtracks: int = 40,
        tolerance_grad: float = 0.0,
    ) -> None:
        checks.flag("line_search", line_search)
        self.max_params = checks.count("max_params", max_params, 1)
        checks.positive("c1", c1)
        if not c1 < 1.0:
            raise ValueError(f"c1 must be in (0, 1), got {c1!r}")
        checks.positive("shrink", shrink)
        if not shrink < 1.0:
            raise ValueError(f"shrink must be in (0, 1), got {shrink!r}")
        checks.nonnegative("tolerance_grad", tolerance_grad)
        self.line_search, self.c1, self.shrink = line_search, float(c1), float(shrink)
        self.max_backtracks = checks.count("max_backtracks", max_backtracks, 0)
        self.tolerance_grad = float(tolerance_grad)
        super().__init__(checks.checked_params(params), dict(lr=lr, damping=damping))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        checks.check_group_params(param_group, self.param_groups)
        for key, value in self.defaults.items():
            param_group.setdefault(key, value)
        checks.nonnegative("lr", param_group["lr"])
        checks.nonnegative("damping", param_group["damping"])
        params = [param_group["params"]] if isinstance(param_group["params"], Tensor) else param_group["params"]
        for p in params:
            if p.is_complex():
                raise TypeError(f"Newton needs real parameters, got one of dtype {p.dtype}")
        total = sum(p.numel() for group in self.param_groups for p in group["params"])
        total += sum(p.numel() for p in params)
        if total > self.max_params:
            raise ValueError(
                f"Newton forms the {total} x {total} Hessian of all {total} parameters, above max_params="
                f"{self.max_params}; it is meant for small problems (raise max_params if the memory allows)"
            )
        super().add_param_group(param_group)

    def _flat(self, key: str, params: list[Tensor]) -> Tensor:
        """Each parameter's group value of ``key``, repeated over its entries, in float64."""
        values = [float(g[key]) for g in self.param_groups for p in g["params"] if p.requires_grad]
        counts = torch.tensor([p.numel() for p in params])
        return torch.repeat_interleave(torch.tensor(values, dtype=torch.float64), counts).to(params[0].device)

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:  # type: ignore[override]
        if closure is None:
            raise ValueError(
                "Newton needs a closure that re-evaluates and returns the loss, as torch.optim.LBFGS does: "
                "opt.step(lambda: loss_fn(model(x), y))"
            )
        params = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
        if not params:
            raise ValueError("Newton has no parameter that requires grad")
        state = self.state[params[0]]
        for key, start in (("n_iter", 0), ("func_evals", 0), ("t", 0.0), ("converged", False)):
            state.setdefault(key, start)
        with torch.enable_grad():
            loss = closure()
        state["func_evals"] += 1
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise TypeError(f"the closure must return the loss as a one-element tensor, got {loss!r}")
        if not loss.requires_grad:
            raise ValueError("the closure's loss does not depend on the parameters through autograd (no grad_fn)")
        f0 = float(loss.detach())
        if not math.isfinite(f0):
            raise ValueError(f"the closure's loss is {f0} at the start of Newton step {state['n_iter'] + 1}")
        try:
            g, h = gradient_and_hessian(loss, params)
        except RuntimeError as err:
            if "second time" not in str(err):
                raise
            raise ValueError(
                "Newton needs the loss's graph for second derivatives, but the closure's backward() freed it: "
                "return the loss without calling backward, or call loss.backward(create_graph=True)"
            ) from err
        if not (torch.isfinite(g).all() and torch.isfinite(h).all()):
            raise ValueError(f"non-finite gradient or Hessian at Newton step {state['n_iter'] + 1} (loss {f0})")
        state["converged"] = bool(g.abs().max() <= self.tolerance_grad)
        if not state["converged"]:
            state["t"] = self._move(params, g, h, f0, closure, state)
            state["n_iter"] += 1
        for p in params:  # a backward(create_graph=True) in the closure left a graph in .grad: drop it
            if p.grad is not None and p.grad.requires_grad:
                p.grad = p.grad.detach()
        return loss

    @torch.no_grad()
    def _move(
        self, params: list[Tensor], g: Tensor, h: Tensor, f0: float, closure: Callable[[], Tensor], state: dict
    ) -> float:
        """Take the step; returns its size t (0 where the line search found none)."""
        lr = self._flat("lr", params)
        direction = lr * newton_direction(h, g, self._flat("damping", params))
        slope = float(g.double() @ direction)
        if self.line_search and slope >= 0:  # not a descent direction: fall back to the gradient's
            direction = -lr * g.double()
            slope = float(g.double() @ direction)
        start = [p.detach().clone() for p in params]
        sizes = [p.numel() for p in params]

        def place(t: float) -> None:
            for p, x, d in zip(params, start, direction.split(sizes)):
                p.copy_(x.double() + t * d.view(p.shape))

        def loss_at(t: float) -> float:
            place(t)
            state["func_evals"] += 1
            with torch.enable_grad():
                return float(closure().detach())

        if not self.line_search:
            place(1.0)
            return 1.0
        t = armijo_backtracking(loss_at, f0, slope, self.c1, self.shrink, self.max_backtracks)
        if t is None:
            for p, x in zip(params, start):
                p.copy_(x)
            return 0.0
        return t  # the parameters are at the accepted trial point already


def newton(
    loss_fn: LossFn,
    x0: Tensor,
    steps: int = 20,
    damping: float = 0.0,
    line_search: bool = True,
    tol: float = 0.0,
) -> BaselineRun:
    """:class:`Newton` on one tensor ``x`` (the class holds the math), recorded like the other baselines:
    ``steps`` steps from ``x0`` of ``loss_fn``, stopping early once the gradient's largest entry is at most
    ``tol``."""
    checks.count("steps", steps, 0)
    x = x0.detach().clone().requires_grad_()
    opt = Newton([x], damping=damping, line_search=line_search, tolerance_grad=tol)
    run = BaselineRun("newton", [float(loss_fn(x.detach()))])
    for _ in range(steps):
        opt.step(lambda: loss_fn(x))
        if opt.state[x]["converged"]:
            break
        run.losses.append(float(loss_fn(x.detach())))
    run.x = x.detach()
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
    w_star = torch.randn(d, k, generator=gen, dtype=torch.float64)  # drawn before the noise: the measured instance
    y = x @ w_star + 0.01 * torch.randn(n, k, generator=gen, dtype=torch.float64)
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
