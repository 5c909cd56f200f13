"""Convex workloads: ill-conditioned least squares with a known optimum, and logistic regression on real data."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from stochopt.bench.workloads.base import Batch, Workload
from stochopt.bench.workloads.common import seeded, shuffled_batches, stored_target
from stochopt.extras import require


class LeastSquares(Workload):
    r"""The seeds' finite-sum problem, ill-conditioned:

    .. math:: f(w) = \frac{1}{n}\sum_{i=1}^n f_i(w), \qquad f_i(w) = \tfrac12 (a_i^\top w - b_i)^2,

    with rows :math:`a_i = D Q^\top z_i` (:math:`z_i \sim N(0, I)`, :math:`Q` a random rotation, :math:`D` scales
    log-spaced so that the Hessian :math:`A^\top A / n` has condition number about ``condition``) and
    :math:`b = A w_\star + \sigma\varepsilon`. The rotation keeps the ill-conditioning off the coordinate axes, where
    a diagonal preconditioner would remove it for free. The optimum :math:`w^\ast` solves the normal equations
    (float64, closed form), so the metric is the exact relative suboptimality

    .. math:: \frac{f(w) - f(w^\ast)}{f(0) - f(w^\ast)},

    1 at the origin and 0 at the optimum.
    """

    name = "least_squares"
    metric = "relative suboptimality"
    target = stored_target("least_squares")
    max_steps = 3000
    eval_every = 50
    batch_size = 32
    description = "ill-conditioned finite-sum least squares (rotated, condition 1e4) with a closed-form optimum"

    def __init__(self, n: int = 1024, dim: int = 32, condition: float = 1e4, noise: float = 0.1) -> None:
        if n < dim:
            raise ValueError(f"n must be at least dim={dim} so that the optimum is unique, got n={n!r}")
        if condition < 1:
            raise ValueError(f"condition must be >= 1, got {condition!r}")
        self.n, self.dim, self.condition, self.noise = n, dim, condition, noise

    def setup(self) -> None:
        gen = torch.Generator().manual_seed(0)  # the problem is fixed; the run seed varies init and batches only
        z = torch.randn(self.n, self.dim, generator=gen, dtype=torch.float64)
        rotation, _ = torch.linalg.qr(torch.randn(self.dim, self.dim, generator=gen, dtype=torch.float64))
        scales = torch.logspace(0, -0.5 * math.log10(self.condition), self.dim, dtype=torch.float64)
        a = (z * scales) @ rotation.T
        w_star = torch.randn(self.dim, generator=gen, dtype=torch.float64)
        b = a @ w_star + self.noise * torch.randn(self.n, generator=gen, dtype=torch.float64)
        self.a64, self.b64 = a, b
        self.optimum = torch.linalg.solve(a.T @ a, a.T @ b)
        self.f_opt = self.objective(self.optimum)
        self.f_zero = self.objective(torch.zeros(self.dim, dtype=torch.float64))
        self.a, self.b = a.float(), b.float()

    def objective(self, w: torch.Tensor) -> float:
        """f(w) in float64 over the whole data set."""
        residual = self.a64 @ w.to(torch.float64).reshape(-1) - self.b64
        return 0.5 * float(residual.square().mean())

    def init_model(self, seed: int, sparse: bool = False) -> nn.Module:
        with seeded(seed):
            return nn.Linear(self.dim, 1, bias=False)

    def train_batches(self, batch_size: int, seed: int) -> Iterator[Batch]:
        return shuffled_batches((self.a, self.b), batch_size, seed)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        a, b = batch
        return 0.5 * (model(a).squeeze(-1) - b).square().mean()

    def evaluate(self, model: nn.Module) -> float:
        return (self.objective(model.weight.detach()) - self.f_opt) / (self.f_zero - self.f_opt)


class Logistic(Workload):
    r"""Binary logistic regression on scikit-learn's bundled breast-cancer data (569 tumours, 30 features),
    standardized with the training split's statistics; a fixed seeded 80/20 split. Loss and metric are the mean
    log loss :math:`-\frac1n\sum_i [y_i \log \sigma(x_i^\top w + c) + (1-y_i)\log(1-\sigma(x_i^\top w + c))]`,
    the metric on the validation split (the data are nearly separable, so validation loss has an optimum in time,
    not only in parameters: a run must get there without overshooting into overconfidence).
    """

    name = "logistic"
    metric = "validation log loss"
    target = stored_target("logistic")
    max_steps = 500
    eval_every = 5  # the optimum in time comes within tens of steps: a coarser cadence could not tell runs apart
    batch_size = 32
    description = "logistic regression on scikit-learn's breast-cancer data, standardized"

    def setup(self) -> None:
        require("sklearn", feature="the breast-cancer dataset")
        from sklearn.datasets import load_breast_cancer

        data = load_breast_cancer()
        x = torch.tensor(data.data, dtype=torch.float32)
        y = torch.tensor(data.target, dtype=torch.float32)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        cut = round(0.8 * len(x))
        train, val = order[:cut], order[cut:]
        mean, std = x[train].mean(0), x[train].std(0)
        self.x_train, self.y_train = (x[train] - mean) / std, y[train]
        self.x_val, self.y_val = (x[val] - mean) / std, y[val]

    def init_model(self, seed: int, sparse: bool = False) -> nn.Module:
        with seeded(seed):
            return nn.Linear(self.x_train.shape[1], 1)

    def train_batches(self, batch_size: int, seed: int) -> Iterator[Batch]:
        return shuffled_batches((self.x_train, self.y_train), batch_size, seed)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        x, y = batch
        return F.binary_cross_entropy_with_logits(model(x).squeeze(-1), y)

    def evaluate(self, model: nn.Module) -> float:
        return float(self.loss(model, (self.x_val, self.y_val)))
