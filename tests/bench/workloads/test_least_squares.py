"""least_squares: the closed-form optimum is the optimum of the finite sum the training loss samples."""

from __future__ import annotations

import torch

from stochopt.bench.workloads import load_workload


def test_the_stored_optimum_zeroes_the_full_gradient_and_the_metric():
    workload = load_workload("least_squares", n=200, dim=12, condition=1e4)
    workload.setup()
    w = workload.optimum.clone().requires_grad_()
    f = 0.5 * (workload.a64 @ w - workload.b64).square().mean()
    (grad,) = torch.autograd.grad(f, w)
    assert grad.abs().max() < 1e-10
    # any perturbation is worse, by exactly the quadratic form of the Hessian A^T A / n
    hessian = workload.a64.T @ workload.a64 / workload.n
    eigenvalues = torch.linalg.eigvalsh(hessian)
    assert 5e3 < eigenvalues[-1] / eigenvalues[0] < 2e4  # the requested conditioning
    d = torch.randn(12, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 1e-2
    gap = workload.objective(workload.optimum + d) - workload.f_opt
    assert abs(gap - 0.5 * float(d @ hessian @ d)) < 1e-12
    model = workload.init_model(0)
    with torch.no_grad():
        model.weight.copy_(workload.optimum.float())
        assert abs(workload.evaluate(model)) < 1e-5
        model.weight.zero_()
        assert workload.evaluate(model) == 1.0


def test_the_minibatch_loss_is_the_objective_sampled():
    workload = load_workload("least_squares", n=64, dim=4)
    workload.setup()
    model = workload.init_model(0).double()
    full = workload.loss(model, (workload.a64, workload.b64))
    assert abs(full.item() - workload.objective(model.weight.detach())) < 1e-12
