"""Optimizers torch.optim lacks, against plain reference loops written here from the papers' equations
(float64, 200 steps, every execution path), plus the known reductions between methods."""

from __future__ import annotations

import math

import pytest
import torch

import stochopt
from tests.conftest import assert_same, clone_params, make_params, run, set_grads


def reference_run(params: list[torch.Tensor], steps: int, update) -> None:
    """Apply ``update(t, i, p, g, state)`` to detached float64 copies; the paper's math lives in ``update``."""
    states: list[dict] = [{} for _ in params]
    for t in range(1, steps + 1):
        set_grads(params, t - 1)
        with torch.no_grad():
            for i, p in enumerate(params):
                update(t, p, p.grad.clone(), states[i])


def qhm_ref(lr, beta, nu, wd):
    def update(t, p, g, st):
        g = g + wd * p
        st["b"] = beta * st.get("b", torch.zeros_like(p)) + (1 - beta) * g
        p -= lr * ((1 - nu) * g + nu * st["b"])

    return update


def qhadam_ref(lr, b1, b2, nu1, nu2, eps, wd):
    def update(t, p, g, st):
        g = g + wd * p
        st["m"] = b1 * st.get("m", torch.zeros_like(p)) + (1 - b1) * g
        st["v"] = b2 * st.get("v", torch.zeros_like(p)) + (1 - b2) * g * g
        m_hat, v_hat = st["m"] / (1 - b1**t), st["v"] / (1 - b2**t)
        p -= lr * ((1 - nu1) * g + nu1 * m_hat) / (torch.sqrt((1 - nu2) * g * g + nu2 * v_hat) + eps)

    return update


def adabound_ref(lr, b1, b2, final_lr, gamma, eps, wd, amsbound, lr_at=None):
    """``lr_at(t)``: the lr of step t under a scheduler (None: ``lr`` throughout). As in the authors' adabound
    package, the bounds follow the lr: final_lr * lr_t / lr, lr being the lr the optimizer was built with."""

    def update(t, p, g, st):
        lr_t = lr if lr_at is None else lr_at(t)
        g = g + wd * p
        st["m"] = b1 * st.get("m", torch.zeros_like(p)) + (1 - b1) * g
        st["v"] = b2 * st.get("v", torch.zeros_like(p)) + (1 - b2) * g * g
        v = st["v"]
        if amsbound:
            st["vmax"] = torch.maximum(st.get("vmax", torch.zeros_like(p)), v)
            v = st["vmax"]
        step_size = lr_t * math.sqrt(1 - b2**t) / (1 - b1**t)
        final_lr_t = final_lr * lr_t / lr
        lower = final_lr_t * (1 - 1 / (gamma * t + 1))
        upper = final_lr_t * (1 + 1 / (gamma * t))
        p -= torch.clamp(step_size / (torch.sqrt(v) + eps), lower, upper) * st["m"]

    return update


def lion_ref(lr, b1, b2, wd):
    def update(t, p, g, st):
        m = st.get("m", torch.zeros_like(p))
        u = torch.sign(b1 * m + (1 - b1) * g)
        p.mul_(1 - lr * wd).sub_(lr * u)
        st["m"] = b2 * m + (1 - b2) * g

    return update


REFERENCES = [
    ("QHM", dict(lr=0.05, momentum=0.9, nu=0.7, weight_decay=0.01), qhm_ref(0.05, 0.9, 0.7, 0.01)),
    (
        "QHAdam",
        dict(lr=0.01, betas=(0.9, 0.99), nus=(0.7, 0.9), eps=1e-8, weight_decay=0.01),
        qhadam_ref(0.01, 0.9, 0.99, 0.7, 0.9, 1e-8, 0.01),
    ),
    (
        "AdaBound",
        dict(lr=0.01, betas=(0.9, 0.999), final_lr=0.1, gamma=1e-2, weight_decay=0.01),
        adabound_ref(0.01, 0.9, 0.999, 0.1, 1e-2, 1e-8, 0.01, False),
    ),
    (
        "AdaBound",
        dict(lr=0.01, final_lr=0.1, gamma=1e-2, amsbound=True),
        adabound_ref(0.01, 0.9, 0.999, 0.1, 1e-2, 1e-8, 0.0, True),
    ),
    ("Lion", dict(lr=0.01, betas=(0.9, 0.99), weight_decay=0.1), lion_ref(0.01, 0.9, 0.99, 0.1)),
]


@pytest.mark.parametrize("name,hp,update", REFERENCES, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(REFERENCES)])
def test_matches_reference_loop(name: str, hp: dict, update, path: dict) -> None:
    ours_params = make_params()
    ref_params = clone_params(ours_params)
    opt = getattr(stochopt, name)(ours_params, **hp, **path)
    run(opt, ours_params, 200)
    reference_run(ref_params, 200, update)
    assert_same(ours_params, ref_params, rtol=1e-10, atol=1e-10)


# The scheduler steps after each optimizer step, so step t (from 1) runs at the lr of t - 1 scheduler steps; the
# reference computes that lr from the schedule's formula, not from the scheduler.
SCHEDULED_ADABOUND = {
    "AdaBound-LambdaLR-decay": (
        dict(lr=0.01, betas=(0.9, 0.999), final_lr=0.1, gamma=1e-2, weight_decay=0.01),
        lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 0.98**s),
        lambda t: 0.01 * 0.98 ** (t - 1),
    ),
    "AdaBound-LambdaLR-warmup": (
        dict(lr=0.02, betas=(0.8, 0.99), final_lr=0.05, gamma=5e-2, eps=1e-6),
        lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: min(1.0, (s + 1) / 40)),
        lambda t: 0.02 * min(1.0, t / 40),
    ),
    "AMSBound-StepLR": (
        dict(lr=0.01, final_lr=0.1, gamma=1e-2, weight_decay=0.01, amsbound=True),
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=30, gamma=0.3),
        lambda t: 0.01 * 0.3 ** ((t - 1) // 30),
    ),
}


@pytest.mark.parametrize("case", list(SCHEDULED_ADABOUND))
def test_adabound_under_a_scheduler_matches_reference_loop(case: str, path: dict) -> None:
    """The bounds move with lr / (lr at construction) and the step size with lr, over 150 steps in every path."""
    hp, scheduler, lr_at = SCHEDULED_ADABOUND[case]
    ours_params = make_params()
    ref_params = clone_params(ours_params)
    opt = stochopt.AdaBound(ours_params, **hp, **path)
    run(opt, ours_params, 150, scheduler=scheduler(opt))
    defaults = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsbound=False)
    h = {**defaults, **hp}
    update = adabound_ref(hp["lr"], *h["betas"], h["final_lr"], h["gamma"], h["eps"], h["weight_decay"],
                          h["amsbound"], lr_at=lr_at)  # fmt: skip
    reference_run(ref_params, 150, update)
    assert_same(ours_params, ref_params, rtol=1e-10, atol=1e-10)


REDUCTIONS = [
    # QHM with nu = 1 is EMA momentum: heavy ball with the rate scaled by (1 - beta)
    (("QHM", dict(lr=0.1, momentum=0.9, nu=1.0)), ("SGD", dict(lr=0.1 * (1 - 0.9), momentum=0.9))),
    # QHM with nu = 0 is plain SGD
    (("QHM", dict(lr=0.1, momentum=0.9, nu=0.0)), ("SGD", dict(lr=0.1))),
    # QHAdam with nus = (1, 1) is Adam
    (("QHAdam", dict(lr=0.01, betas=(0.9, 0.999), nus=(1.0, 1.0))), ("Adam", dict(lr=0.01))),
    # AdaBound with both bounds at final_lr (gamma = inf) and beta1 = 0 is SGD at final_lr
    (("AdaBound", dict(lr=0.01, betas=(0.0, 0.999), final_lr=0.05, gamma=math.inf)), ("SGD", dict(lr=0.05))),
    # LazyAdam on dense gradients is Adam
    (("LazyAdam", dict(lr=0.01)), ("Adam", dict(lr=0.01))),
]


@pytest.mark.parametrize("a,b", REDUCTIONS, ids=[f"{a[0]}={b[0]}-{i}" for i, (a, b) in enumerate(REDUCTIONS)])
def test_known_reductions(a, b) -> None:
    pa = make_params()
    pb = clone_params(pa)
    run(getattr(stochopt, a[0])(pa, **a[1]), pa, 200)
    run(getattr(torch.optim, b[0])(pb, **b[1]), pb, 200)
    assert_same(pa, pb, rtol=1e-9, atol=1e-10)


def _sparse_embedding_grads(weight: torch.Tensor, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(step)
    rows = torch.randint(0, weight.shape[0], (6,), generator=gen)  # repeated rows are summed, as in nn.Embedding
    values = torch.randn(6, weight.shape[1], generator=gen, dtype=weight.dtype) + weight.detach()[rows]
    return torch.sparse_coo_tensor(rows[None], values, weight.shape)


@pytest.mark.parametrize("maximize", [False, True])
def test_lazyadam_matches_sparseadam_on_sparse_gradients(maximize: bool) -> None:
    ours = torch.randn(50, 4, dtype=torch.float64, requires_grad=True)
    ref = ours.detach().clone().requires_grad_()
    opt = stochopt.LazyAdam([ours], lr=0.01, betas=(0.8, 0.99), maximize=maximize)
    ref_opt = torch.optim.SparseAdam([ref], lr=0.01, betas=(0.8, 0.99), maximize=maximize)
    untouched = None
    for t in range(200):
        ours.grad = _sparse_embedding_grads(ours, t)
        ref.grad = _sparse_embedding_grads(ref, t)
        if t == 0:
            touched = ours.grad.coalesce()._indices()[0]
            untouched = torch.ones(50, dtype=torch.bool)
            untouched[touched] = False
            before = ours.detach().clone()
        opt.step()
        ref_opt.step()
        if t == 0:  # rows absent from the gradient are not touched, moments included
            assert torch.equal(ours.detach()[untouched], before[untouched])
            assert not opt.state[ours]["exp_avg"][untouched].any()
    assert_same([ours], [ref], rtol=1e-10, atol=1e-12)


def test_lazyadam_embedding_end_to_end() -> None:
    """A model with a sparse embedding and a dense head trains under one LazyAdam."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(100, 8, sparse=True)
    head = torch.nn.Linear(8, 1)
    opt = stochopt.LazyAdam([*emb.parameters(), *head.parameters()], lr=0.05)
    idx = torch.randint(0, 100, (64,))
    target = torch.randn(64, 1)
    losses = []
    for _ in range(50):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(head(emb(idx)), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
