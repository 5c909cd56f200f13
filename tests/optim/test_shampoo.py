"""Shampoo against a float64 reference written here from the equations (explicit eigh-based matrix roots),
per block, with grafting, delayed and infrequent preconditioning; vectors against torch.optim.Adagrad."""

from __future__ import annotations

import math

import pytest
import torch

import stochopt
from tests.conftest import assert_same, clone_params, make_params, run, set_grads


def inverse_fourth_root(mat: torch.Tensor, eps: float) -> torch.Tensor:
    """(M + eps I)^(-1/4) of a symmetric PSD matrix, from its eigendecomposition."""
    w, v = torch.linalg.eigh(mat)
    return v @ torch.diag((w.clamp(min=0) + eps) ** -0.25) @ v.T


def chunks(n: int, max_dim: int) -> list[slice]:
    """Near-equal consecutive blocks of at most max_dim."""
    size = math.ceil(n / math.ceil(n / max_dim))
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


class Reference:
    """One parameter's Shampoo, plainly: blocks as Python lists, roots by inverse_fourth_root."""

    def __init__(self, p: torch.Tensor, hp: dict) -> None:
        self.hp = hp
        self.m = torch.zeros_like(p)
        self.v = torch.zeros_like(p)
        self.recomputations = 0  # how often the roots were computed: the test needs reuse between two of them
        if p.dim() > 1:
            rows, cols = p.shape[0], p[0].numel()
            max_dim = hp.get("max_preconditioner_dim", 10**9)
            self.blocks = [(r, c) for r in chunks(rows, max_dim) for c in chunks(cols, max_dim)]
            self.L = [torch.zeros(r.stop - r.start, r.stop - r.start, dtype=p.dtype) for r, _ in self.blocks]
            self.R = [torch.zeros(c.stop - c.start, c.stop - c.start, dtype=p.dtype) for _, c in self.blocks]
            self.L_root, self.R_root = [None] * len(self.blocks), [None] * len(self.blocks)

    def step(self, p: torch.Tensor, g: torch.Tensor, t: int) -> None:
        hp = self.hp
        lr, (b1, b2), eps = hp["lr"], hp["betas"], hp["eps"]
        w = 1.0 if b2 == 1.0 else 1.0 - b2
        start, freq = hp.get("start_preconditioning_step", 1), hp["precondition_frequency"]
        grafting = hp["grafting"]
        p.mul_(1 - lr * hp.get("weight_decay", 0.0))
        self.m = b1 * self.m + (1 - b1) * g
        M = self.m / (1 - b1**t) if b1 > 0 else g
        self.v = b2 * self.v + w * g * g
        c = 1 - b2**t if grafting == "adam" else 1.0
        D = M / ((self.v / c).sqrt() + hp.get("graft_eps", 1e-8))
        if p.dim() == 1:
            p.sub_(lr * D)
            return
        G, M2, D2 = g.reshape(p.shape[0], -1), M.reshape(p.shape[0], -1), D.reshape(p.shape[0], -1)
        U = torch.zeros_like(G)
        for i, b in enumerate(self.blocks):
            self.L[i] = b2 * self.L[i] + w * G[b] @ G[b].T
            self.R[i] = b2 * self.R[i] + w * G[b].T @ G[b]
            if t >= start and (t - start) % freq == 0:
                self.L_root[i] = inverse_fourth_root(self.L[i], eps)
                self.R_root[i] = inverse_fourth_root(self.R[i], eps)
                self.recomputations += i == 0
            if t < start:
                U[b] = D2[b] if grafting != "none" else M2[b]
                continue
            P = self.L_root[i] @ M2[b] @ self.R_root[i]
            U[b] = P * (D2[b].norm() / P.norm()) if grafting != "none" else P
        p.sub_(lr * U.reshape(p.shape))


def run_both(shapes, hp: dict, steps: int, path: dict | None = None) -> tuple[list, list, stochopt.Shampoo, list]:
    params = make_params(shapes)
    ref_params = clone_params(params)
    opt = stochopt.Shampoo(params, **hp, **(path or {}))
    refs = [Reference(p.detach(), hp) for p in ref_params]
    for t in range(1, steps + 1):
        set_grads(params, t)
        set_grads(ref_params, t)
        opt.step()
        with torch.no_grad():
            for ref, p in zip(refs, ref_params):
                ref.step(p, p.grad, t)
    return params, ref_params, opt, refs


CASES = {
    "sums-no-graft": dict(lr=0.05, betas=(0.0, 1.0), eps=1e-6, precondition_frequency=1, grafting="none"),
    "ema-momentum-decay": dict(lr=0.02, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01, precondition_frequency=1,
                               grafting="none"),
    "blocks-adam-graft": dict(lr=0.01, betas=(0.9, 0.99), eps=1e-10, precondition_frequency=1, grafting="adam",
                              max_preconditioner_dim=4),
    "blocks-adagrad-graft-every-3-from-4": dict(lr=0.05, betas=(0.5, 1.0), eps=1e-10, precondition_frequency=3,
                                                start_preconditioning_step=4, grafting="adagrad",
                                                max_preconditioner_dim=3),
    # the roots are recomputed at steps 5, 15, ..., 95 and reused for the 9 steps in between, while the
    # statistics, the momentum and the grafted norms move every step
    "blocks-adam-graft-every-10-from-5": dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01,
                                              precondition_frequency=10, start_preconditioning_step=5,
                                              grafting="adam", max_preconditioner_dim=4),
}  # fmt: skip

STEPS = 100


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case: str, host_path: dict) -> None:
    """100 steps in every execution path (Shampoo accepts foreach/fused; its matrix work is the same in each)."""
    shapes = [(5, 3), (4, 6), (3, 2, 2, 2), (7,), (6, 10)]
    params, ref_params, opt, refs = run_both(shapes, CASES[case], STEPS, host_path)
    assert min(ref.recomputations for ref, p in zip(refs, params) if p.dim() > 1) >= 2
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-10)
    if "max_preconditioner_dim" in CASES[case]:  # the 6 x 10 matrix is split into blocks
        max_dim = CASES[case]["max_preconditioner_dim"]
        assert opt.state[params[4]]["left"].shape[:2] == (len(chunks(6, max_dim)), len(chunks(10, max_dim)))


def test_grafted_block_steps_have_the_diagonal_steps_norm() -> None:
    """One step from zero state: each block of the change is lr * ||Adam step of the block||."""
    p = make_params([(6, 10)])
    before = p[0].detach().clone()
    opt = stochopt.Shampoo(p, lr=0.1, betas=(0.9, 0.999), grafting="adam", max_preconditioner_dim=4)
    set_grads(p, 0)
    g = p[0].grad.clone()
    opt.step()
    adam_step = g / (g.abs() + 1e-8)  # Adam's first step: m_hat = g, sqrt(v_hat) = |g|
    change = before - p[0].detach()
    for rows in chunks(6, 4):
        for cols in chunks(10, 4):
            torch.testing.assert_close(change[rows, cols].norm(), 0.1 * adam_step[rows, cols].norm())


def test_before_preconditioning_and_for_vectors_it_is_adagrad() -> None:
    params = make_params([(5, 4), (9,)])
    ref_params = clone_params(params)
    opt = stochopt.Shampoo(params, lr=0.1, betas=(0.0, 1.0), start_preconditioning_step=6, graft_eps=1e-10)
    ref = torch.optim.Adagrad(ref_params, lr=0.1, eps=1e-10)
    run(opt, params, 5)
    run(ref, ref_params, 5)
    assert_same(params, ref_params, rtol=1e-12, atol=1e-12)
    set_grads(params, 5)
    set_grads(ref_params, 5)
    opt.step()
    ref.step()
    assert not torch.allclose(params[0], ref_params[0])  # preconditioned from step 6 on
    torch.testing.assert_close(params[1], ref_params[1], rtol=1e-12, atol=1e-12)


def test_roots_are_reused_between_recomputations() -> None:
    params = make_params([(4, 3)])
    opt = stochopt.Shampoo(params, lr=0.01, precondition_frequency=4)
    roots = []
    for t in range(1, 10):
        set_grads(params, t)
        opt.step()
        roots.append(opt.state[params[0]]["left_root"].clone())
    assert all(torch.equal(roots[i], roots[0]) for i in range(1, 4))
    assert not torch.equal(roots[4], roots[3]) and torch.equal(roots[4], roots[7])
    assert not torch.equal(roots[8], roots[7])


def test_bad_options_are_named() -> None:
    params = make_params([(4, 3)])
    with pytest.raises(ValueError, match="grafting"):
        stochopt.Shampoo(params, grafting="sgd")
    with pytest.raises(ValueError, match="betas\\[1\\] < 1"):
        stochopt.Shampoo(params, grafting="adam", betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="precondition_frequency"):
        stochopt.Shampoo(params, precondition_frequency=0)
    with pytest.raises(TypeError, match="max_preconditioner_dim"):
        stochopt.Shampoo(params, max_preconditioner_dim=2.5)
    with pytest.raises(ValueError, match="betas\\[0\\]"):
        stochopt.Shampoo(params, betas=(1.0, 1.0))
